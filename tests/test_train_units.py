"""Pieces of training checked against hand computations: loss terms, epoch-exact error sums,
the EMA recurrence, the learning-rate schedule, the least-squares reference re-fit (on the real
polymer sample: six compositions, five elements), the normalisation from the data, and the
one-line errors of bad configs."""

import dataclasses

import numpy as np
import pytest
import torch
import yaml

from torchmdx.cli.main import main
from torchmdx.train.config import TrainConfig, load_run_config
from torchmdx.train.ema import EMA, _EMAStep, warmed_up_decay
from torchmdx.train.metrics import EpochErrors, loss_terms, weighted_loss




# ------------------------------------------------------------------------------ losses, metrics
def test_loss_terms_match_hand_formulas():
    x = torch.tensor([-0.5, -0.01, -0.004, 0.0, 0.003, 0.02, 2.0], dtype=torch.float64)
    assert torch.equal(loss_terms(x, "mse"), x * x)
    assert torch.equal(loss_terms(x, "l1"), x.abs())
    delta = 0.01
    hand = torch.tensor([0.5 * v * v if abs(v) <= delta else delta * (abs(v) - 0.5 * delta) for v in x.tolist()],
                        dtype=torch.float64)
    assert torch.allclose(loss_terms(x, "huber", delta), hand, rtol=1e-12, atol=0)
    with pytest.raises(ValueError):
        loss_terms(x, "cauchy")


def test_epoch_errors_are_exact_over_uneven_batches():
    rng = np.random.default_rng(3)
    sizes = [5, 5, 2]  # structures per batch
    atoms = [rng.integers(3, 10, size=n) for n in sizes]
    energy_errors = [rng.normal(0, 0.05, size=n) for n in sizes]
    force_errors = [rng.normal(0, 0.2, size=(int(a.sum()), 3)) for a in atoms]
    metric = EpochErrors(loss="huber", huber_delta=0.05, energy_loss="per_atom")
    for e, a, f in zip(energy_errors, atoms, force_errors):
        metric.update(torch.tensor(e), torch.tensor(a), torch.tensor(f, dtype=torch.float32))
    out = metric.compute()
    e, a, f = np.concatenate(energy_errors), np.concatenate(atoms), np.concatenate(force_errors)
    assert out["energy_mae"] == pytest.approx(1000 * np.abs(e).mean(), rel=1e-12)
    assert out["energy_rmse"] == pytest.approx(1000 * np.sqrt((e ** 2).mean()), rel=1e-12)
    assert out["energy_per_atom_mae"] == pytest.approx(1000 * np.abs(e / a).mean(), rel=1e-12)
    assert out["energy_per_atom_rmse"] == pytest.approx(1000 * np.sqrt(((e / a) ** 2).mean()), rel=1e-12)
    f32 = f.astype(np.float32).astype(np.float64)
    assert out["forces_mae"] == pytest.approx(1000 * np.abs(f32).mean(), rel=1e-12)
    assert out["forces_rmse"] == pytest.approx(1000 * np.sqrt((f32 ** 2).mean()), rel=1e-12)
    huber = lambda v: np.where(np.abs(v) <= 0.05, 0.5 * v * v, 0.05 * (np.abs(v) - 0.025))  # noqa: E731
    assert out["energy_loss"] == pytest.approx(huber(e / a).mean(), rel=1e-12)
    assert out["forces_loss"] == pytest.approx(huber(f32).mean(), rel=1e-12)
    assert weighted_loss(out, 0.3, 0.7) == pytest.approx(0.3 * huber(e / a).mean() + 0.7 * huber(f32).mean())
    assert weighted_loss(out, 0.0, 1.0) == pytest.approx(huber(f32).mean())
    # what a mean of per-batch MAEs would give is different (so the check above is meaningful)
    assert np.mean([np.abs(b).mean() for b in energy_errors]) * 1000 != pytest.approx(out["energy_mae"], rel=1e-6)
    metric.reset()
    assert metric.empty
    metric.update(None, torch.tensor([3]), torch.ones(3, 3))
    assert "energy_mae" not in metric.compute() and metric.compute()["forces_mae"] == pytest.approx(1000.0)


# ------------------------------------------------------------------------------ EMA
def test_ema_follows_the_warmed_up_recurrence():
    from torch.optim.swa_utils import AveragedModel

    assert warmed_up_decay(0.99, 0) == pytest.approx(0.1)
    assert warmed_up_decay(0.99, 10) == pytest.approx(11 / 20)
    assert warmed_up_decay(0.99, 10_000) == 0.99
    assert float(warmed_up_decay(0.9, torch.tensor(5))) == pytest.approx(6 / 15)
    module = torch.nn.Linear(2, 1)
    averaged = AveragedModel(module, avg_fn=_EMAStep(0.9), use_buffers=False)
    values = [torch.randn(1, 2) for _ in range(6)]
    expected = None
    for n, value in enumerate(values):
        module.weight.data.copy_(value)
        averaged.update_parameters(module)
        if expected is None:
            expected = value.clone()  # the first update copies
        else:
            d = min(0.9, (1 + n) / (10 + n))  # n = updates before this one
            expected = d * expected + (1 - d) * value
        assert torch.allclose(averaged.module.weight, expected, atol=1e-6)
    with pytest.raises(ValueError):
        EMA(1.0)


# ------------------------------------------------------------------------------ schedule
def _module(**train):
    from torchmdx.train.module import PotentialModule

    model = {"embedding_dimension": 8, "num_layers": 1, "num_heads": 2, "num_rbf": 4, "backend": "torch", "seed": 0}
    return PotentialModule(model=model, train={"force_weight": 1.0, **train})


def test_learning_rate_schedule():
    plateau = _module(lr=1e-3, lr_warmup_steps=10, lr_schedule="plateau")
    assert plateau.scheduled_lr(0) == pytest.approx(1e-4)
    assert plateau.scheduled_lr(4) == pytest.approx(5e-4)
    assert plateau.scheduled_lr(9) == pytest.approx(1e-3)
    assert plateau.scheduled_lr(10) == pytest.approx(1e-3)  # warm-up hands over at lr
    assert plateau.scheduled_lr(11) is None  # then ReduceLROnPlateau owns it
    cosine = _module(lr=1e-3, lr_min=1e-5, lr_warmup_steps=10, lr_schedule="cosine", lr_cosine_steps=110)
    assert cosine.scheduled_lr(10) == pytest.approx(1e-3)
    assert cosine.scheduled_lr(60) == pytest.approx(0.5 * (1e-3 + 1e-5))
    assert cosine.scheduled_lr(110) == pytest.approx(1e-5)
    assert cosine.scheduled_lr(500) == pytest.approx(1e-5)
    none = _module(lr=1e-3, lr_warmup_steps=0, lr_schedule="constant")
    assert none.scheduled_lr(0) is None


# ------------------------------------------------------------------------------ references
@pytest.fixture(scope="module")
def polymer_dataset(tmp_path_factory, shared_data):
    from torchmdx.data import H5Dataset, build_cache

    cache = build_cache(shared_data / "polymer" / "polymers_xtb.extxyz", "ase",
                        tmp_path_factory.mktemp("polycache"), group_key="polymer")
    return H5Dataset(cache)


def test_reference_refit_is_the_least_squares_solution(polymer_dataset):
    """Six polymer compositions (H, C, N, O, Cl): the correction added to the atomic references
    equals numpy's least-squares fit of the residuals E_ref - E_pred on the element counts, and
    afterwards the residuals are orthogonal to every element's counts (normal equations)."""
    from torchmdx.nn.potential import ETPotential
    from torchmdx.train.evaluate import predict
    from torchmdx.train.module import fit_reference_correction

    model = ETPotential(embedding_dimension=8, num_layers=1, num_heads=2, num_rbf=8, cutoff_upper=4.0,
                        backend="torch", seed=1)
    model.set_normalisation(atomref={1: -13.0, 6: -60.0, 7: -70.0, 8: -100.0, 17: -130.0}, scale=0.7)
    indices = np.arange(0, 900, 15)  # 60 structures, every family
    before = model.atomref.detach().clone()
    first = predict(model, polymer_dataset, indices, batch_size=30)
    residual = first["energy_ref"] - first["energy_pred"]
    st = polymer_dataset.structures
    counts = np.zeros((len(indices), 18))
    for row, s in enumerate(indices):
        np.add.at(counts[row], st.z[st.offsets[s]:st.offsets[s + 1]], 1)
    present = np.flatnonzero(counts.sum(axis=0))
    assert list(present) == [1, 6, 7, 8, 17]
    expected, *_ = np.linalg.lstsq(counts[:, present], residual, rcond=None)
    assert fit_reference_correction(model, polymer_dataset, indices, batch_size=17)
    delta = (model.atomref - before).numpy()
    assert np.allclose(delta[present], expected, rtol=1e-7, atol=1e-7)
    assert np.all(delta[np.setdiff1d(np.arange(18), present)] == 0)
    after = predict(model, polymer_dataset, indices, batch_size=30)
    new_residual = after["energy_ref"] - after["energy_pred"]
    assert np.abs(counts[:, present].T @ new_residual).max() < 1e-6 * np.abs(counts[:, present].T @ residual).max()


def test_normalisation_from_the_training_split(tmp_path, shared_data):
    """scale = RMS of the training forces when training on forces (energy std per atom for
    energy-only), and the initial reference fit leaves zero mean residual on the training set."""
    from torchmdx.train.evaluate import predict
    from torchmdx.train.run import prepare

    config = {"data": {"path": str(shared_data / "md17" / "md17_ethanol_xtb.npz"), "cache_dir": str(tmp_path / "c"),
                       "train_size": 50, "val_size": 10, "test_size": 0},
              "model": {"embedding_dimension": 8, "num_layers": 1, "num_heads": 2, "num_rbf": 8, "backend": "torch"},
              "run_dir": str(tmp_path / "run")}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    cfg = load_run_config(path)
    datamodule, module = prepare(cfg)
    train = datamodule.split["train"]
    st = datamodule.dataset.structures
    forces = np.concatenate([st.forces[st.offsets[s]:st.offsets[s + 1]] for s in train])
    assert float(module.model.scale) == pytest.approx(np.sqrt((forces.astype(np.float64) ** 2).mean()), rel=1e-6)
    assert module.model.elements == [1, 6, 8]
    p = predict(module.model, datamodule.dataset, train, batch_size=25)
    assert abs((p["energy_ref"] - p["energy_pred"]).mean()) < 1e-6
    energy_only = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, force_weight=0.0))
    energy_only.data_config, energy_only.model_config = cfg.data_config, cfg.model_config
    _, module = prepare(energy_only)
    assert float(module.model.scale) == pytest.approx(datamodule.energy_std_per_atom, rel=1e-9)


# ------------------------------------------------------------------------------ bad configs
def _config(tmp_path, shared_data, **sections):
    config = {"data": {"path": str(shared_data / "md17" / "md17_ethanol_xtb.npz"), "cache_dir": str(tmp_path / "c")},
              "model": {"embedding_dimension": 8, "num_layers": 1, "num_heads": 2},
              "run_dir": str(tmp_path / "run")}
    for key, value in sections.items():
        if isinstance(value, dict):
            config.setdefault(key, {}).update(value)
        else:
            config[key] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("sections, overrides, expected", [
    ({"train": {"lrr": 0.001}}, [], "config key 'train.lrr' does not exist (did you mean 'lr'?); allowed:"),
    ({"train": {"lr": "fast"}}, [], "config key 'train.lr' must be float, got 'fast' (str)"),
    ({"model": {"num_layer": 2}}, [], "config key 'model.num_layer' does not exist (did you mean 'num_layers'?)"),
    ({"trainer": {"max_epochs": "ten"}}, [], "config key 'trainer.max_epochs' must be int | null, got 'ten'"),
    ({"optimizer": {"lr": 1}}, [], "config key 'optimizer' does not exist; allowed: data, model, run_dir, train, trainer"),
    ({"train": {"loss": "cauchy"}}, [], "config key 'train.loss' must be one of 'mse', 'l1', 'huber', got 'cauchy'"),
    ({"train": {"energy_weight": 0, "force_weight": 0}}, [], "config key 'train.force_weight' and energy_weight (and stress_weight) are all 0"),
    ({"data": {"path": "no/such/file.npz"}}, [], "data.path 'no/such/file.npz' not found (looked in"),
    ({}, ["train.lr=fast"], "config key 'train.lr' must be float, got 'fast' (str)"),
    ({}, ["data.batch_size=0"], "config key 'data.batch_size' must be at least 1, got 0"),
    ({}, ["train.lr"], "--set 'train.lr': expected section.key=value"),
])
def test_bad_configs_give_one_line_errors(tmp_path, shared_data, capsys, sections, overrides, expected):
    path = _config(tmp_path, shared_data, **sections)
    argv = ["train", str(path)] + [a for o in overrides for a in ("--set", o)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and expected in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing ran


def test_missing_config_file_and_nothing_to_resume(tmp_path, shared_data, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: config file not found" in capsys.readouterr().err
    path = _config(tmp_path, shared_data)
    assert main(["train", str(path), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "--resume:" in err and "last.ckpt not found" in err and len(err.strip().splitlines()) == 1


def test_train_config_validation_names_the_key():
    from torchmdx.config import from_dict
    from torchmdx.errors import ConfigError

    with pytest.raises(ConfigError, match=r"config key 'train.lr_factor' must be between 0 and 1, got 1.5"):
        from_dict(TrainConfig, {"lr_factor": 1.5}, "train")
    with pytest.raises(ConfigError, match=r"config key 'train.ema_decay' must be in \[0, 1\) or null"):
        from_dict(TrainConfig, {"ema_decay": 1.0}, "train")
    cfg = from_dict(TrainConfig, {"energy_weight": 0, "scale": 0.5}, "train")
    assert cfg.refits_atomref and cfg.scale == 0.5
    assert not from_dict(TrainConfig, {}, "train").refits_atomref


def test_data_max_z_takes_the_models_meaning(tmp_path, shared_data):
    """data.max_z and model.max_z both count embedding rows (atomic numbers 0..max_z-1): the data
    layer follows the model, its reference table has max_z entries and goes into the model as is."""
    from torchmdx.errors import ConfigError, DataError
    from torchmdx.train.run import prepare

    polymers = {"path": str(shared_data / "polymer" / "polymers_xtb.extxyz"), "cache_dir": str(tmp_path / "c"),
                "train_size": 60, "val_size": 10, "test_size": 0}
    model = {"embedding_dimension": 8, "num_layers": 1, "num_heads": 2, "num_rbf": 8, "backend": "torch"}
    cfg = load_run_config(_config(tmp_path, shared_data, data=polymers, model={**model, "max_z": 18}))
    assert cfg.data_config.max_z == 18 and cfg.to_dict()["data"]["max_z"] == 18
    datamodule, module = prepare(cfg)
    refs = datamodule.atomic_references
    assert refs.shape == (18,) and module.model.atomref.shape == (18,)
    present = sorted(datamodule.elements)
    assert present == [1, 6, 7, 8, 17] and bool((refs[present] != 0).all())
    # the model keeps the fitted table (up to the untrained network's offset folded into it)
    assert torch.count_nonzero(module.model.atomref[[z for z in range(18) if z not in present]]) == 0
    # 17 rows cannot embed chlorine: the data layer says so before anything is built
    with pytest.raises(DataError, match=r"element Cl \(Z=17\) in structure \d+ is beyond the model's range "
                                        r"\(max_z=17: atomic numbers below 17\)"):
        prepare(load_run_config(_config(tmp_path, shared_data, data=polymers, model={**model, "max_z": 17})))
    # an explicit data.max_z must agree with the model's
    assert load_run_config(_config(tmp_path, shared_data, data={**polymers, "max_z": 18},
                                   model={**model, "max_z": 18})).data_config.max_z == 18
    with pytest.raises(ConfigError, match=r"config key 'data.max_z' is 50 but model.max_z is 18; both count "
                                          r"embedding rows"):
        load_run_config(_config(tmp_path, shared_data, data={**polymers, "max_z": 50}, model={**model, "max_z": 18}))
