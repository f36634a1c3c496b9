"""Self-learning rounds of ``torchmdx slmc``: ``effective.init_from``, ``data.previous_proposals``,
``acceptance_expected`` and ``residual_decomposition`` checked against references computed here."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
import yaml

import torchmdx.lattice.run as run_module
from torchmdx.cli.main import main
from torchmdx.errors import TorchmdxError
from torchmdx.lattice.effective import load_effective, save_effective
from torchmdx.lattice.fermions import DoubleExchangeModel
from torchmdx.lattice.geometry import SquareLattice
from torchmdx.lattice.run import SLMCRun, run_slmc

from test_lattice_run import TINY, _config

BETA = 1.0 / TINY["lattice"]["temperature"]
STEPS, CHAINS = TINY["slmc"]["steps"], TINY["slmc"]["chains"]
NAMES = ("linear", "transformer-1")


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """One run without refits (one effective model per SLMC run) whose every slmc_step is recorded."""
    run_dir = tmp_path_factory.mktemp("first") / "a"
    recorded = []
    original = run_module.slmc_step

    def recording(state, *args, **kwargs):
        new, accept, info = original(state, *args, **kwargs)
        recorded.append({"log_ratio": info["log_ratio"].clone(), "accept": accept.clone(),
                         "proposed": info["proposed"].clone(), "state": new.spins.clone()})
        return new, accept, info

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_module, "slmc_step", recording)
        summary = run_slmc(_config(run_dir, slmc__retrain_every=0), progress=False)
    assert len(recorded) == STEPS * len(NAMES)
    steps = {name: recorded[i * STEPS:(i + 1) * STEPS] for i, name in enumerate(NAMES)}
    return run_dir, summary, steps


def _result(summary, name):
    (r,) = [r for r in summary["models"] if r["name"] == name]
    return r


def _residual(model, spins, omega):
    """β (E_eff - Ω), [steps, chains]."""
    with torch.no_grad():
        return (BETA * (model(spins) - omega)).reshape(STEPS, CHAINS)


# ---------------------------------------------------------------- proposals_<model>.pt

@pytest.mark.parametrize("name", NAMES)
def test_proposals_file_holds_every_proposal_with_its_exact_omega(first, name):
    run_dir, summary, steps = first
    saved = torch.load(run_dir / f"proposals_{name}.pt", weights_only=True)
    assert saved["spins"].shape == (STEPS * CHAINS, 16, 3) and saved["omega"].shape == (STEPS * CHAINS,)
    assert saved["lattice"] == summary["lattice"] and saved["mu"] == summary["mu"]
    # step-major, the very configurations slmc_step proposed
    torch.testing.assert_close(saved["spins"], torch.cat([s["proposed"] for s in steps[name]]), rtol=0, atol=0)
    # a fresh exact diagonalisation of a few of them
    exact = DoubleExchangeModel(SquareLattice(4), 1.0, TINY["lattice"]["J"], TINY["lattice"]["temperature"],
                                saved["mu"])
    pick = torch.tensor([0, 5, STEPS * CHAINS - 1])
    torch.testing.assert_close(saved["omega"][pick], exact.energy(saved["spins"][pick]), rtol=1e-12, atol=1e-12)
    # accepted proposals are the chain's next configuration, rejected ones leave it where it was
    chain = torch.load(run_dir / f"configurations_{name}.pt", weights_only=True)
    states = chain["spins"].reshape(STEPS, CHAINS, 16, 3)
    proposed = saved["spins"].reshape(STEPS, CHAINS, 16, 3)
    omega_states, omega_proposed = chain["omega"].reshape(STEPS, CHAINS), saved["omega"].reshape(STEPS, CHAINS)
    accepted = torch.stack([s["accept"] for s in steps[name]])
    assert 0 < int(accepted.sum()) < STEPS * CHAINS  # both kinds occur (seeded run)
    for t in range(STEPS):
        for c in range(CHAINS):
            if accepted[t, c]:
                assert torch.equal(states[t, c], proposed[t, c]) and omega_states[t, c] == omega_proposed[t, c]
            elif t > 0:
                assert torch.equal(states[t, c], states[t - 1, c]) and omega_states[t, c] == omega_states[t - 1, c]


def test_previous_proposals_join_the_training_data(first, tmp_path):
    run_dir, summary, _ = first
    n_data = TINY["data"]["chains"] * TINY["data"]["sweeps"]
    n_chain = sum(len(torch.load(p, weights_only=True)["spins"]) for p in run_dir.glob("configurations_*.pt"))
    n_prop = sum(len(torch.load(p, weights_only=True)["spins"]) for p in run_dir.glob("proposals_*.pt"))
    assert n_chain == n_prop == len(NAMES) * STEPS * CHAINS
    with_proposals = run_slmc(_config(tmp_path / "b", slmc__retrain_every=0, data__previous_runs=[str(run_dir)],
                                      data__previous_proposals=True), progress=False)
    for r in with_proposals["models"]:
        assert r["fit"]["configurations"] == n_data + n_chain + n_prop, r["name"]
    # the training set holds exactly those configurations with their saved Ω
    cfg = _config(tmp_path / "unused", data__previous_runs=[str(run_dir)], data__previous_proposals=True)
    loaded = run_module.load_previous_runs(cfg)
    spins = torch.cat([s for s, _ in loaded])
    omega = torch.cat([o for _, o in loaded])
    expected = [torch.load(run_dir / f"{kind}_{name}.pt", weights_only=True)
                for name in NAMES for kind in ("configurations", "proposals")]
    assert len(spins) == n_chain + n_prop
    torch.testing.assert_close(torch.sort(omega).values, torch.sort(torch.cat([e["omega"] for e in expected])).values,
                               rtol=0, atol=0)


def test_previous_proposals_without_any_proposals_file_is_one_line(first, tmp_path, capsys):
    run_dir, _, _ = first
    old = tmp_path / "old"
    shutil.copytree(run_dir, old)
    for p in old.glob("proposals_*.pt"):
        p.unlink()
    config = tmp_path / "c.yaml"
    values = {**TINY, "run_dir": str(tmp_path / "run")}
    values["data"] = {**TINY["data"], "previous_runs": [str(old)], "previous_proposals": True}
    config.write_text(yaml.safe_dump(values))
    code = main(["slmc", str(config), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "'data.previous_proposals'" in err, err
    # one folder with proposals is enough
    cfg = _config(tmp_path / "unused", data__previous_runs=[str(old), str(run_dir)], data__previous_proposals=True)
    assert len(run_module.load_previous_runs(cfg)) == 2 * len(NAMES) + len(NAMES)


# ---------------------------------------------------------------- effective.init_from

def test_init_from_starts_the_transformer_from_the_earlier_model(first, tmp_path, monkeypatch):
    run_dir, _, _ = first
    starts = {}
    original = SLMCRun.fit

    def recording(self, model, spins, energies, desc, init_readout=True):
        starts.setdefault(desc, ({k: v.clone() for k, v in model.state_dict().items()}, init_readout))
        return original(self, model, spins, energies, desc, init_readout)

    monkeypatch.setattr(SLMCRun, "fit", recording)
    summary = run_slmc(_config(tmp_path / "c", slmc__retrain_every=0, effective__init_from=str(run_dir)),
                       progress=False)
    trained, _ = load_effective(run_dir / "models" / "transformer-1.pt")
    start, init_readout = starts["fit transformer-1"]
    assert start.keys() == trained.state_dict().keys()
    for key, value in trained.state_dict().items():
        torch.testing.assert_close(start[key], value, rtol=0, atol=0, msg=key)
    assert init_readout is False  # the trained readout is kept
    fit = _result(summary, "transformer-1")["fit"]
    assert fit["init_from"] == str(run_dir / "models" / "transformer-1.pt")
    assert _result(summary, "linear")["fit"]["init_from"] is None
    # without init_from the transformer starts elsewhere (so the comparison above can fail)
    starts.clear()
    run_slmc(_config(tmp_path / "d", slmc__retrain_every=0, slmc__steps=1), progress=False)
    fresh, _ = starts["fit transformer-1"]
    assert any(not torch.equal(fresh[k], v) for k, v in trained.state_dict().items())


def _bad_init(tmp_path, folder, **changes):
    with pytest.raises(TorchmdxError) as info:
        run_slmc(_config(tmp_path / "run", slmc__retrain_every=0, effective__init_from=str(folder), **changes),
                 progress=False)
    message = str(info.value)
    assert "\n" not in message and "'effective.init_from'" in message, message
    return message


def test_init_from_refuses_another_shape_lattice_or_mu_in_one_line(first, tmp_path):
    run_dir, summary, _ = first
    assert "is {" in _bad_init(tmp_path / "heads", run_dir, effective__heads=1)
    assert "another model" in _bad_init(tmp_path / "J", run_dir, lattice__J=4.0)
    # same lattice section, another μ: a copy of the run whose transformer file says so
    other = tmp_path / "other_mu"
    (other / "models").mkdir(parents=True)
    model, meta = load_effective(run_dir / "models" / "transformer-1.pt")
    save_effective(model, other / "models" / "transformer-1.pt", {**meta, "mu": summary["mu"] + 0.1})
    assert "another model" in _bad_init(tmp_path / "mu", other)
    assert "not a folder" in _bad_init(tmp_path / "missing", tmp_path / "nowhere")


# ---------------------------------------------------------------- acceptance_expected

@pytest.mark.parametrize("name", NAMES)
def test_acceptance_expected_is_the_mean_of_min_one_exp_r(first, name):
    run_dir, summary, steps = first
    r = _result(summary, name)
    log_ratio = torch.stack([s["log_ratio"] for s in steps[name]]).numpy()  # [steps, chains]
    accepted = torch.stack([s["accept"] for s in steps[name]]).numpy()
    per_chain = np.minimum(1.0, np.exp(log_ratio)).mean(axis=0)
    assert r["acceptance_expected"] == pytest.approx(per_chain.mean(), rel=1e-12, abs=1e-15)
    assert r["acceptance_expected_error"] == pytest.approx(per_chain.std(ddof=1) / math.sqrt(CHAINS), rel=1e-10,
                                                           abs=1e-15)
    assert 0.0 <= r["acceptance_expected"] <= 1.0
    assert r["acceptance"] == pytest.approx(accepted.mean(), rel=1e-12)
    assert r["log_ratio_std"] == pytest.approx(log_ratio.std(ddof=1), rel=1e-12)
    assert np.all(accepted[log_ratio >= 0])  # a proposal with e^r >= 1 is always accepted
    # the recorded log ratios are β (r(y) - r(x)) with r = E_eff - Ω of the saved model (no refits)
    model, _ = load_effective(run_dir / "models" / f"{name}.pt")
    model = model.double().eval()
    states = torch.load(run_dir / f"configurations_{name}.pt", weights_only=True)
    proposals = torch.load(run_dir / f"proposals_{name}.pt", weights_only=True)
    rx, ry = _residual(model, states["spins"], states["omega"]), _residual(model, proposals["spins"], proposals["omega"])
    np.testing.assert_allclose(log_ratio[1:], (ry[1:] - rx[:-1]).numpy(), rtol=1e-9, atol=1e-9)


def test_acceptance_expected_agrees_with_the_measured_acceptance_on_a_longer_run(tmp_path):
    summary = run_slmc(_config(tmp_path / "long", slmc__retrain_every=0, slmc__steps=60,
                               effective__epochs=1), progress=False)
    for r in summary["models"]:
        assert 0.0 <= r["acceptance_expected"] <= 1.0
        error = math.hypot(r["acceptance_error"], r["acceptance_expected_error"])
        assert abs(r["acceptance"] - r["acceptance_expected"]) <= 4 * error + 1e-12, r["name"]


# ---------------------------------------------------------------- residual_decomposition

@pytest.mark.parametrize("name", NAMES)
def test_residual_decomposition_reproduces_the_log_ratio_spread(first, name):
    run_dir, summary, steps = first
    r = _result(summary, name)
    bx, by, rho = r["beta_rmse_states"], r["beta_rmse_proposals"], r["residual_correlation"]
    assert bx > 0 and by > 0 and -1 <= rho <= 1
    # β·RMS recomputed by hand from the saved model, chain configurations and proposals
    model, _ = load_effective(run_dir / "models" / f"{name}.pt")
    model = model.double().eval()
    states = torch.load(run_dir / f"configurations_{name}.pt", weights_only=True)
    proposals = torch.load(run_dir / f"proposals_{name}.pt", weights_only=True)
    x = _residual(model, states["spins"], states["omega"])[:-1].flatten().numpy()  # the state each proposal left
    y = _residual(model, proposals["spins"], proposals["omega"])[1:].flatten().numpy()
    assert bx == pytest.approx(x.std(ddof=1), rel=1e-9)
    assert by == pytest.approx(y.std(ddof=1), rel=1e-9)
    assert rho == pytest.approx(np.corrcoef(x, y)[0, 1], rel=1e-9, abs=1e-12)
    # s² = β²(RMS_x² + RMS_y² - 2ρ RMS_x RMS_y) against the spread of the recorded log ratios of the same proposals
    log_ratio = torch.stack([s["log_ratio"] for s in steps[name]])[1:].flatten().numpy()
    s = log_ratio.std(ddof=1)
    assert s ** 2 == pytest.approx(bx ** 2 + by ** 2 - 2 * rho * bx * by, rel=1e-9)
    summary_file = json.loads((run_dir / "summary.json").read_text())
    assert _result(summary_file, name)["beta_rmse_states"] == bx
