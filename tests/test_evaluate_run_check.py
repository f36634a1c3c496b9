"""``evaluate MODEL --run RUN`` checks that MODEL was trained in RUN (after round 26): a model file of
train/export records its run's split (``torchmdx.train.provenance``); another run's model, scored on this
run's test split (which may hold the model's own training structures), is refused in one line unless
``--allow-other-run``; a model file without the record is evaluated with a warning."""

import shutil

import pytest
import torch
import yaml

from torchmdx.cli.main import main
from bad_inputs_common import refused_exactly


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_data):
    """Two tiny runs on the same data with different split seeds (a, b): one epoch each."""
    base = tmp_path_factory.mktemp("runcheck")
    paths = {}
    for name, seed in (("a", 1), ("b", 2)):
        config = {
            "data": {"path": str(shared_data / "md17" / "md17_ethanol_xtb.npz"), "cache_dir": str(base / "cache"),
                     "train_size": 12, "val_size": 4, "test_size": 6, "batch_size": 4, "seed": seed},
            "model": {"embedding_dimension": 8, "num_layers": 1, "num_heads": 2, "num_rbf": 4, "cutoff_upper": 3.0,
                      "backend": "torch", "seed": 0},
            "train": {"lr": 1e-3},
            "trainer": {"max_epochs": 1, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False,
                        "num_sanity_val_steps": 0},
            "run_dir": str(base / f"run_{name}"),
        }
        (base / f"{name}.yaml").write_text(yaml.safe_dump(config))
        assert main(["train", str(base / f"{name}.yaml")]) == 0
        paths[name] = base / f"run_{name}"
        paths[name + "_config"] = base / f"{name}.yaml"
    paths["base"] = base
    return paths


def _evaluate(model, config, run, out, *extra):
    return [str(a) for a in ("evaluate", model, "--data", config, "--run", run, "--out", out, "--no-progress",
                             *extra)]


def test_the_model_file_records_its_run(runs):
    from torchmdx.data.splits import load_split, split_digest
    from torchmdx.nn.model_file import read_training_record

    record = read_training_record(runs["a"] / "model.pt")
    split = load_split(runs["a"] / "splits.npz")
    assert record["run"] == "run_a" and record["run_dir"] == str(runs["a"])
    assert record["split"] == split_digest(split, split.info["hash"]) and len(record["split"]) == 12
    assert record["data"].endswith("md17_ethanol_xtb.npz") and record["sizes"] == {"train": 12, "val": 4, "test": 6}
    assert read_training_record(runs["b"] / "model.pt")["split"] != record["split"]


def test_own_run_evaluates_silently(runs, tmp_path, capsys):
    capsys.readouterr()
    assert main(_evaluate(runs["a"] / "model.pt", runs["a_config"], runs["a"], tmp_path / "r")) == 0
    assert capsys.readouterr().err == ""


def test_another_runs_model_is_refused_in_one_line(runs, tmp_path, capsys):
    from torchmdx.nn.model_file import read_training_record

    a, b = read_training_record(runs["a"] / "model.pt")["split"], read_training_record(runs["b"] / "model.pt")["split"]
    line = (f"error: model.pt was trained in run {runs['a']} (split {a}, data md17_ethanol_xtb.npz), not in --run "
            f"{runs['b']} (split {b}, data md17_ethanol_xtb.npz): the test split of {runs['b']} may hold the model's "
            "training structures, so its errors would come out too good; give the model's own run folder as --run, "
            "leave it out, or pass --allow-other-run to evaluate anyway")
    refused_exactly(capsys, _evaluate(runs["a"] / "model.pt", runs["b_config"], runs["b"], runs["base"] / "r"), line,
                    runs["base"])
    # the same model, its run folder given through the config's run_dir
    capsys.readouterr()
    assert main(["evaluate", str(runs["a"] / "model.pt"), "--data", str(runs["b_config"]), "--out",
                 str(tmp_path / "r"), "--no-progress"]) == 2
    assert "not in run_dir " in capsys.readouterr().err


def test_allow_other_run_evaluates_with_a_warning(runs, tmp_path, capsys):
    from torchmdx.nn.model_file import read_training_record

    capsys.readouterr()
    assert main(_evaluate(runs["a"] / "model.pt", runs["b_config"], runs["b"], tmp_path / "r",
                          "--allow-other-run")) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: model.pt was trained in run {runs['a']} (split ")
    assert err[0].endswith(f"not in --run {runs['b']} (split {read_training_record(runs['b'] / 'model.pt')['split']}, "
                           "data md17_ethanol_xtb.npz): its test split may hold the model's training structures "
                           "(--allow-other-run: evaluating anyway)")
    assert (tmp_path / "r" / "errors.json").is_file()


def test_a_model_file_without_the_record_warns_and_evaluates(runs, tmp_path, capsys):
    payload = torch.load(runs["a"] / "model.pt", weights_only=True)
    del payload["training"]  # as a model file of an earlier torchmdx
    torch.save(payload, tmp_path / "old.pt")
    capsys.readouterr()
    assert main(_evaluate(tmp_path / "old.pt", runs["b_config"], runs["b"], tmp_path / "r")) == 0
    err = capsys.readouterr().err.strip().splitlines()
    from torchmdx.train.provenance import NO_RECORD_REASONS

    assert err == [f"warning: old.pt records no training run, so it cannot be checked that --run {runs['b']}'s split "
                   f"holds none of its training structures ({NO_RECORD_REASONS}); export it again from its run's "
                   "checkpoints folder (RUN/checkpoints/best.ckpt) to record the run"]
    assert (tmp_path / "r" / "errors.json").is_file()


def test_export_records_the_checkpoints_run(runs, tmp_path):
    from torchmdx.nn.model_file import read_training_record

    assert main(["export", str(runs["b"] / "checkpoints" / "last.ckpt"), "-o", str(tmp_path / "b.pt")]) == 0
    assert read_training_record(tmp_path / "b.pt") == read_training_record(runs["b"] / "model.pt")
    # out of its run folder: the checkpoint's own record (round 27; before, the model file recorded no run)
    shutil.copy(runs["b"] / "checkpoints" / "last.ckpt", tmp_path / "moved.ckpt")
    assert main(["export", str(tmp_path / "moved.ckpt"), "-o", str(tmp_path / "moved.pt")]) == 0
    assert read_training_record(tmp_path / "moved.pt") == read_training_record(runs["b"] / "model.pt")


def test_evaluate_reads_the_model_file_once(runs, tmp_path, capsys, monkeypatch):
    """evaluate loaded the model (torch.load), then read the file again for its training record (a second
    torch.load), and load_model's CRC-32 check opened it a third time: now one open and one torch.load, and the
    record of that read still decides (another run's model: the warning naming the model's run)."""
    import builtins
    import io
    import os
    from pathlib import Path

    model = (runs["a"] / "model.pt").resolve()

    def is_model(target) -> bool:
        name = target if isinstance(target, (str, os.PathLike)) else getattr(target, "name", None)  # open file: its name
        return isinstance(name, (str, os.PathLike)) and Path(name).resolve() == model

    loads, opens = [], []

    def counting(real, calls):
        def wrapper(target, *args, **kwargs):
            if is_model(target):
                calls.append(target)
            return real(target, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(torch, "load", counting(torch.load, loads))
    monkeypatch.setattr(builtins, "open", counting(builtins.open, opens))  # torch, and model_file's open
    monkeypatch.setattr(io, "open", counting(io.open, opens))  # zipfile, pathlib
    capsys.readouterr()
    assert main(_evaluate(runs["a"] / "model.pt", runs["b_config"], runs["b"], tmp_path / "r",
                          "--allow-other-run")) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: model.pt was trained in run {runs['a']} (split ")
    assert (len(loads), len(opens)) == (1, 1), (loads, opens)


def test_load_model_keeps_the_files_record(runs, tmp_path):
    from torchmdx.nn.model_file import load_model, read_training_record

    model = load_model(runs["a"] / "model.pt")
    record = model.training_record
    assert record == read_training_record(runs["a"] / "model.pt") and record["run"] == "run_a"
    reference = load_model(runs["a"] / "model.pt")
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in reference.state_dict().items())
    payload = torch.load(runs["a"] / "model.pt", weights_only=True)
    del payload["training"]
    torch.save(payload, tmp_path / "old.pt")
    assert load_model(tmp_path / "old.pt").training_record is None
