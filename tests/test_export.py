"""``torchmdx export``: a training checkpoint -> a self-contained model file that
``torchmdx.load_model`` reads without the config and that predicts exactly what the checkpoint's
(EMA) weights predict."""

import pytest
import torch
import yaml

from torchmdx.cli.main import main
from torchmdx.nn.model_file import load_model
from torchmdx.train.export import potential_from_checkpoint, read_checkpoint




@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, shared_data):
    """Two short epochs on 32 ethanol structures (enough for EMA and raw weights to differ)."""
    base = tmp_path_factory.mktemp("export")
    config = {
        "data": {"path": str(shared_data / "md17" / "md17_ethanol_xtb.npz"), "cache_dir": str(base / "cache"),
                 "train_size": 32, "val_size": 8, "test_size": 8, "batch_size": 8},
        "model": {"embedding_dimension": 16, "num_layers": 1, "num_heads": 2, "num_rbf": 8, "cutoff_upper": 4.0,
                  "backend": "torch", "seed": 0},
        "train": {"lr": 1e-3, "lr_warmup_steps": 2, "ema_decay": 0.9},
        "trainer": {"max_epochs": 2, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False,
                    "num_sanity_val_steps": 0},
        "run_dir": str(base / "run"),
    }
    (base / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(base / "config.yaml")]) == 0
    return base / "run"


def _batch():
    from ase.build import molecule

    atoms = [molecule("CH3CH2OH"), molecule("CH3OCH3")]
    atoms[0].rattle(0.05, seed=1)
    return atoms


def test_export_round_trip_predicts_identically(run_dir, tmp_path, capsys):
    checkpoint = run_dir / "checkpoints" / "best.ckpt"
    out = tmp_path / "exported.pt"
    assert main(["export", str(checkpoint), "-o", str(out)]) == 0
    assert "elements H, C, O" in capsys.readouterr().out
    loaded = load_model(out)  # no config anywhere
    reference = potential_from_checkpoint(checkpoint)
    a, b = loaded.predict(_batch()), reference.predict(_batch())
    assert torch.equal(torch.as_tensor(a["energy"]), torch.as_tensor(b["energy"]))
    for fa, fb in zip(a["forces"], b["forces"]):
        assert (fa == fb).all()
    # the file carries hyper-parameters, normalisation, elements, cutoff, version
    payload = torch.load(out, weights_only=True)
    ckpt = read_checkpoint(checkpoint)
    assert payload["hparams"]["embedding_dimension"] == 16 and payload["hparams"]["num_layers"] == 1
    assert payload["elements"] == [1, 6, 8] and payload["cutoff"] == 4.0
    assert payload["torchmdx_version"] and payload["kind"] == "et"
    assert torch.equal(payload["state_dict"]["atomref"], ckpt["state_dict"]["model.atomref"])
    assert set(payload["normalisation"]["atomref"]) == {1, 6, 8}
    assert payload["normalisation"]["scale"] == pytest.approx(float(ckpt["state_dict"]["model.scale"]))
    # the run's model.pt is the same export of best.ckpt
    run_model = load_model(run_dir / "model.pt")
    assert torch.equal(torch.as_tensor(run_model.predict(_batch())["energy"]), torch.as_tensor(a["energy"]))


def test_export_uses_ema_weights_unless_asked(run_dir, tmp_path):
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    ckpt = read_checkpoint(checkpoint)
    assert main(["export", str(checkpoint), "-o", str(tmp_path / "ema.pt")]) == 0
    assert main(["export", str(checkpoint), "-o", str(tmp_path / "raw.pt"), "--no-ema"]) == 0
    ema, raw = load_model(tmp_path / "ema.pt"), load_model(tmp_path / "raw.pt")
    name = "representation.embedding.weight"
    assert torch.equal(ema.state_dict()[name], ckpt["state_dict"]["model." + name])
    assert torch.equal(raw.state_dict()[name], ckpt["current_model_state"]["model." + name])
    assert not torch.equal(ema.state_dict()[name], raw.state_dict()[name])


def test_export_reads_the_checkpoint_once(run_dir, tmp_path, monkeypatch):
    """export read the checkpoint (torch.load) for the potential, then again (memory-mapped) for the run record it
    holds: now potential_from_checkpoint keeps the record (``training_record``, as load_model keeps a model
    file's) and the one read decides. The checkpoint is copied out of its run folder, so the record can only
    come from the checkpoint itself."""
    import os
    import shutil
    from pathlib import Path

    from torchmdx.nn.model_file import read_training_record
    from torchmdx.train.export import export_checkpoint
    from torchmdx.train.provenance import checkpoint_run_record

    checkpoint = tmp_path / "best.ckpt"
    shutil.copy(run_dir / "checkpoints" / "best.ckpt", checkpoint)
    stored = checkpoint_run_record(checkpoint)
    assert stored is not None and stored["run"] == "run"
    assert potential_from_checkpoint(checkpoint).training_record == stored
    loads = []
    real_load = torch.load

    def counting(target, *args, **kwargs):
        if isinstance(target, (str, os.PathLike)) and Path(target).resolve() == checkpoint.resolve():
            loads.append(target)
        return real_load(target, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting)
    potential = export_checkpoint(checkpoint, tmp_path / "m.pt")
    monkeypatch.undo()
    assert len(loads) == 1, loads
    assert potential.training_record == stored and read_training_record(tmp_path / "m.pt") == stored


def test_export_of_a_torchmdnet_checkpoint(tmp_path):
    from pathlib import Path

    source = Path(__file__).parent / "data" / "torchmdnet_et_default.ckpt"
    assert main(["export", str(source), "-o", str(tmp_path / "tmdnet.pt")]) == 0
    a, b = load_model(tmp_path / "tmdnet.pt").predict(_batch()), load_model(source).predict(_batch())
    assert torch.equal(torch.as_tensor(a["energy"]), torch.as_tensor(b["energy"]))


def test_export_errors_are_one_line(tmp_path, shared_data, capsys):
    assert main(["export", str(tmp_path / "missing.ckpt"), "-o", str(tmp_path / "m.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path / 'missing.ckpt'}: checkpoint not found"
    assert main(["export", str(shared_data / "md17" / "md17_ethanol_xtb.npz"), "-o", str(tmp_path / "m.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "not a readable checkpoint" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "m.pt").exists()
