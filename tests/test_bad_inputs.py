"""Bad inputs to train, evaluate and export (issue 22): each is one ``error:`` line on stderr, a
non-zero exit, and nothing overwritten or deleted. Table-driven: a new command or case is a new
row. (MD cases: tests/test_bad_inputs_md.py.)

Each row: an id, a setup function (tmp_path, fixtures -> CLI arguments), the fragment the error
line must hold, and the files that must come out unchanged (their bytes are compared) or must
not appear.
"""

from pathlib import Path

import pytest
import torch

import torchmdx
from torchmdx.cli.main import main

TINY = {"embedding_dimension": 16, "num_layers": 1, "num_heads": 2, "num_rbf": 8, "cutoff_upper": 4.0,
        "backend": "torch", "seed": 0}


def demo_config(shared_data, tmp_path, **train):
    import yaml

    config = {
        "data": {"path": str(shared_data / "md17" / "md17_ethanol_xtb.npz"), "cache_dir": str(tmp_path / "cache"),
                 "train_size": 24, "val_size": 8, "test_size": 8, "batch_size": 8, "seed": 0},
        "model": dict(TINY),
        "train": {"lr": 1e-3, "lr_warmup_steps": 2, **train},
        "trainer": {"max_epochs": 1, "accelerator": "cpu", "devices": 1, "log_every_n_steps": 1,
                    "enable_progress_bar": False},
        "run_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shared_data):
    """A tiny finished run: (config, run folder)."""
    base = tmp_path_factory.mktemp("trained")
    config = demo_config(shared_data, base)
    assert main(["train", str(config)]) == 0
    return config, base / "run"


@pytest.fixture(scope="module")
def nan_model(tmp_path_factory):
    model = torchmdx.build_model(TINY)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    path = tmp_path_factory.mktemp("nan") / "nan_model.pt"
    from torchmdx.nn.model_file import save_potential

    save_potential(model, path)
    return path


def _copy(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes())
    return dst


def case_export_over_its_input(tmp_path, trained, **_):
    ckpt = _copy(trained[1] / "checkpoints" / "best.ckpt", tmp_path / "best.ckpt")
    return ["export", str(ckpt), "-o", str(ckpt)], "over its own input", [ckpt]


def case_export_over_existing_file(tmp_path, trained, **_):
    existing = tmp_path / "model.pt"
    existing.write_text("keep me")
    return ["export", str(trained[1] / "checkpoints" / "best.ckpt"), "-o", str(existing)], "pass --force", [existing]


def case_export_to_a_folder(tmp_path, trained, **_):
    return ["export", str(trained[1] / "checkpoints" / "best.ckpt"), "-o", str(tmp_path)], "is a folder", []


def case_export_nan_checkpoint(tmp_path, trained, **_):
    ckpt = tmp_path / "nan.ckpt"
    payload = torch.load(trained[1] / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    key = next(k for k, v in payload["state_dict"].items() if k.startswith("model.") and v.is_floating_point())
    payload["state_dict"][key] = torch.full_like(payload["state_dict"][key], float("nan"))
    torch.save(payload, ckpt)
    return ["export", str(ckpt), "-o", str(tmp_path / "out.pt")], "NaN or infinite", [ckpt, tmp_path / "out.pt"]


def case_evaluate_on_missing_gpu(tmp_path, trained, **_):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    return (["evaluate", str(trained[1] / "model.pt"), "--data", str(trained[0]), "--device", "cuda",
             "--out", str(tmp_path / "report")], "no CUDA GPU", [tmp_path / "report"])


def case_evaluate_on_gpu_alias(tmp_path, trained, **_):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    return (["evaluate", str(trained[1] / "model.pt"), "--data", str(trained[0]), "--device", "gpu",
             "--out", str(tmp_path / "report")], "no CUDA GPU", [tmp_path / "report"])


def case_evaluate_on_unknown_device(tmp_path, trained, **_):
    return (["evaluate", str(trained[1] / "model.pt"), "--data", str(trained[0]), "--device", "tpu0"],
            "not a device name", [])


def case_evaluate_out_is_a_file(tmp_path, trained, **_):
    out = tmp_path / "report"
    out.write_text("a file")
    return ["evaluate", str(trained[1] / "model.pt"), "--data", str(trained[0]), "--out", str(out)], "is a file", [out]


def case_evaluate_nan_model(tmp_path, trained, nan_model, **_):
    return (["evaluate", str(nan_model), "--data", str(trained[0]), "--out", str(tmp_path / "report")],
            "NaN or infinite", [tmp_path / "report"])


def case_train_on_missing_gpu(tmp_path, shared_data, **_):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    config = demo_config(shared_data, tmp_path)
    return ["train", str(config), "--set", "trainer.accelerator=gpu"], "no CUDA GPU", [tmp_path / "run"]


def case_train_into_empty_run_dir(tmp_path, shared_data, **_):
    config = demo_config(shared_data, tmp_path)
    return ["train", str(config), "--run-dir", ""], "is empty", [Path("checkpoints")]


def case_train_run_dir_is_a_file(tmp_path, shared_data, **_):
    config = demo_config(shared_data, tmp_path)
    target = tmp_path / "afile"
    target.write_text("x")
    return ["train", str(config), "--run-dir", str(target)], "is a file", [target]


def case_resume_from_empty_last_checkpoint(tmp_path, trained, **_):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for name in ("config.resolved.yaml", "splits.npz"):
        _copy(trained[1] / name, run / name)
    _copy(trained[1] / "checkpoints" / "best.ckpt", run / "checkpoints" / "best.ckpt")
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    return (["train", str(trained[0]), "--run-dir", str(run), "--resume"], "best.ckpt",
            [run / "checkpoints" / "last.ckpt", run / "checkpoints" / "best.ckpt"])


def case_resume_from_truncated_last_checkpoint(tmp_path, trained, **_):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for name in ("config.resolved.yaml", "splits.npz"):
        _copy(trained[1] / name, run / name)
    whole = (trained[1] / "checkpoints" / "last.ckpt").read_bytes()
    (run / "checkpoints" / "last.ckpt").write_bytes(whole[: len(whole) // 2])
    return ["train", str(trained[0]), "--run-dir", str(run), "--resume"], "cannot be read", [run / "checkpoints" / "last.ckpt"]


def case_duplicate_yaml_key(tmp_path, **_):
    config = tmp_path / "dup.yaml"
    config.write_text("data:\n  path: x.npz\n  batch_size: 4\n  batch_size: 8\n")
    return ["train", str(config)], "given twice (lines 3 and 4)", [config]


def case_binary_file_as_config(tmp_path, shared_data, **_):
    return ["train", str(shared_data / "md17" / "md17_ethanol_xtb.npz")], "not a text file", []


def _damaged_npz(tmp_path, shared_data, how):
    whole = (shared_data / "md17" / "md17_ethanol_xtb.npz").read_bytes()
    path = tmp_path / f"{how}.npz"
    if how == "truncated":
        path.write_bytes(whole[:3000])
    elif how == "overwritten":
        damaged = bytearray(whole)
        damaged[2000:2100] = b"x" * 100
        path.write_bytes(bytes(damaged))
    else:
        path.write_bytes(b"")
    return path


def case_data_truncated_npz(tmp_path, shared_data, **_):
    path = _damaged_npz(tmp_path, shared_data, "truncated")
    return ["data", "info", str(path), "--cache-dir", str(tmp_path / "c")], "truncated or damaged", [path]


def case_data_overwritten_npz(tmp_path, shared_data, **_):
    path = _damaged_npz(tmp_path, shared_data, "overwritten")
    return ["data", "info", str(path), "--cache-dir", str(tmp_path / "c")], "Bad CRC-32", [path]


def case_data_empty_npz_as_md17(tmp_path, shared_data, **_):
    path = _damaged_npz(tmp_path, shared_data, "empty")
    return ["data", "info", str(path), "--format", "md17", "--cache-dir", str(tmp_path / "c")], "the file is empty", [path]


def case_data_empty_file_any_format(tmp_path, **_):
    path = tmp_path / "frames.xyz"
    path.write_bytes(b"")
    return ["data", "info", str(path), "--cache-dir", str(tmp_path / "c")], "the file is empty", [path]


def case_data_md17_file_as_qm9(tmp_path, shared_data, **_):
    path = shared_data / "md17" / "md17_ethanol_xtb.npz"
    return (["data", "info", str(path), "--format", "qm9", "--cache-dir", str(tmp_path / "c")],
            "binary data where text was expected", [])


def case_data_unknown_element_symbol(tmp_path, **_):
    path = tmp_path / "unknown.xyz"
    path.write_text("2\nenergy=1.0\nC 0 0 0\nXx 0 0 1\n")
    return ["data", "info", str(path), "--cache-dir", str(tmp_path / "c")], "unknown element symbol 'Xx'", [path]


CASES = [case_export_over_its_input, case_export_over_existing_file, case_export_to_a_folder,
         case_export_nan_checkpoint, case_evaluate_on_missing_gpu, case_evaluate_on_gpu_alias,
         case_evaluate_on_unknown_device, case_evaluate_out_is_a_file, case_evaluate_nan_model,
         case_train_on_missing_gpu, case_train_into_empty_run_dir, case_train_run_dir_is_a_file,
         case_resume_from_empty_last_checkpoint, case_resume_from_truncated_last_checkpoint,
         case_duplicate_yaml_key, case_binary_file_as_config, case_data_truncated_npz, case_data_overwritten_npz,
         case_data_empty_npz_as_md17, case_data_empty_file_any_format, case_data_md17_file_as_qm9,
         case_data_unknown_element_symbol]


def _snapshot(paths):
    return {p: (p.read_bytes() if p.is_file() else "dir" if p.is_dir() else None) for p in paths}


@pytest.mark.parametrize("case", CASES, ids=[c.__name__[5:] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(case, tmp_path, shared_data, trained, nan_model, capsys,
                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)
    args, fragment, kept = case(tmp_path=tmp_path, shared_data=shared_data, trained=trained, nan_model=nan_model)
    before = _snapshot(kept)
    capsys.readouterr()
    status = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert status != 0, args
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert fragment in err[0], err[0]
    assert _snapshot(kept) == before  # unchanged, or still absent


def test_diverged_training_stops_with_one_line_and_exports_nothing(tmp_path, shared_data, capsys):
    config = demo_config(shared_data, tmp_path, lr=50.0, max_nonfinite_steps=2)
    status = main(["train", str(config), "--set", "trainer.max_epochs=3", "--set", "trainer.gradient_clip_val=null"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and err[0].startswith("error: training diverged"), err
    assert "train.lr (now 50)" in err[0]
    assert not (tmp_path / "run" / "model.pt").exists()


def test_unknown_element_in_evaluate_names_the_structure(tmp_path, trained, shared_data, capsys):
    """The trained model knows H, C, O; the ANI-1x sample has nitrogen."""
    data = shared_data / "ani" / "ani1x_xtb.h5"
    status = main(["evaluate", str(trained[1] / "model.pt"), "--data", str(data), "--format", "ani1x",
                   "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "report")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, err
    assert "structure" in err[0] and "(Z=7)" in err[0] and "ani1x_xtb.h5" in err[0], err[0]


def test_training_output_is_what_a_user_needs(tmp_path, shared_data, capsys):
    config = demo_config(shared_data, tmp_path)
    assert main(["train", str(config)]) == 0
    out = capsys.readouterr()
    text = out.out + out.err
    for noise in ("GPU available", "Tip:", "limit_train_batches", "LeafSpec", "IterableDataset", "Sanity Checking"):
        assert noise not in text, noise
    assert "epoch 1/1 |" in text and "parameters" in text


def test_data_paths_are_found_next_to_the_config(tmp_path, shared_data, monkeypatch, capsys):
    """A config's relative data.path is read from the config's folder (from any current folder);
    one not found there nor in the current folder names both places."""
    from torchmdx.train.config import load_run_config

    folder = tmp_path / "project"
    folder.mkdir()
    _copy(shared_data / "md17" / "md17_ethanol_xtb.npz", folder / "ethanol.npz")
    (folder / "run.yaml").write_text("data:\n  path: ethanol.npz\nrun_dir: out\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_run_config(folder / "run.yaml")
    assert Path(cfg.data_config.path).resolve() == (folder / "ethanol.npz").resolve()
    assert cfg.run_dir == "out"  # outputs stay relative to the current folder
    (folder / "bad.yaml").write_text("data:\n  path: missing.npz\n")
    assert main(["train", str(folder / "bad.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(folder) in err[0] and str(elsewhere) in err[0] and "missing.npz" in err[0], err


def test_python_api_bad_inputs_are_one_line_errors(tmp_path, trained, nan_model):
    """load_model and Calculator: training checkpoints, files that are not model files (never
    torch's advice to unpickle them), devices that do not exist, non-finite weights."""
    import pickle

    from torchmdx.errors import ConfigError, ModelError

    ckpt = trained[1] / "checkpoints" / "best.ckpt"
    with pytest.raises(ModelError, match="training checkpoint, not a model file: write one with `torchmdx export"):
        torchmdx.load_model(ckpt)
    with pytest.raises(ModelError, match="a YAML config, not a model file"):
        torchmdx.load_model(trained[0])
    pickled = tmp_path / "object.pt"
    pickled.write_bytes(pickle.dumps({"weights": [1, 2]}))
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    for path, fragment in ((pickled, "a pickled Python object"), (empty, "the file is empty")):
        with pytest.raises(ModelError) as info:
            torchmdx.load_model(path)
        assert fragment in str(info.value) and "weights_only" not in str(info.value)
    with pytest.raises(ModelError, match="hold NaN or infinite values"):
        torchmdx.load_model(nan_model)
    with pytest.raises(ConfigError, match="'tpu0' is not a device name"):
        torchmdx.Calculator(trained[1] / "model.pt", device="tpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            torchmdx.load_model(trained[1] / "model.pt", device="cuda")
