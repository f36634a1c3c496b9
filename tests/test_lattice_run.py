"""``torchmdx slmc``: config errors, the run folder, checkpoints and exact resume."""

import json

import pytest
import torch
import yaml

from torchmdx.cli.main import main
from torchmdx.lattice.config import build_slmc_config
from torchmdx.lattice.effective import load_effective
from torchmdx.lattice.run import CHECKPOINT, Interrupted, run_slmc

TINY = {
    "lattice": {"L": 4, "J": 8.0, "temperature": 0.05, "filling": 0.25, "filling_samples": 4},
    "data": {"chains": 3, "thermalize_sweeps": 2, "sweeps": 4},
    "effective": {"layers": [1], "heads": 2, "epochs": 3, "batch_size": 4},
    "slmc": {"chains": 3, "steps": 6, "local_sweeps": 0.5, "retrain_every": 4},
    "checkpoint_every": 2,
}


def _config(run_dir, **changes):
    values = yaml.safe_load(yaml.safe_dump(TINY))
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        values[section][key] = value
    values["run_dir"] = str(run_dir)
    return build_slmc_config(values)


def _outputs(run_dir):
    """Everything a run leaves that must not depend on an interruption (timings aside)."""
    files = {p.name: p.read_bytes() for p in sorted(run_dir.glob("*.csv"))}
    summary = json.loads((run_dir / "summary.json").read_text())
    for r in summary["models"] + [summary["exact_local_mc"]]:
        for key in ("fit_seconds", "slmc_seconds", "seconds", "seconds_per_independent_sample"):
            r.pop(key, None)
    return files, summary


@pytest.mark.parametrize("stop_after", [3, 15])  # in the exact MC stage (6 sweeps); in the transformer's SLMC run
def test_resume_continues_the_chain_exactly(tmp_path, stop_after):
    whole = run_slmc(_config(tmp_path / "whole"), progress=False)
    assert {r["name"] for r in whole["models"]} == {"linear", "transformer-1"}
    with pytest.raises(Interrupted):
        run_slmc(_config(tmp_path / "cut"), progress=False, stop_after=stop_after)
    ck = torch.load(tmp_path / "cut" / CHECKPOINT, weights_only=False)
    assert len(ck["results"]) == (0 if stop_after == 3 else 1)
    with pytest.raises(Exception, match="already holds a run"):
        run_slmc(_config(tmp_path / "cut"), progress=False)
    run_slmc(_config(tmp_path / "cut"), resume=True, progress=False)
    files_whole, summary_whole = _outputs(tmp_path / "whole")
    files_cut, summary_cut = _outputs(tmp_path / "cut")
    assert files_cut.keys() == files_whole.keys() == {"data.csv", "samples_linear.csv", "samples_transformer-1.csv"}
    for name in files_whole:
        assert files_cut[name] == files_whole[name], name
    assert summary_cut == summary_whole
    # the saved models predict the same energies
    spins = torch.nn.functional.normalize(torch.randn(2, 16, 3, dtype=torch.float64), dim=-1)
    for name in ("linear", "transformer-1"):
        a, _ = load_effective(tmp_path / "whole" / "models" / f"{name}.pt")
        b, meta = load_effective(tmp_path / "cut" / "models" / f"{name}.pt")
        with torch.no_grad():
            torch.testing.assert_close(a(spins), b(spins), rtol=0, atol=0)
        assert meta["lattice"]["L"] == 4


def test_run_outputs(tmp_path):
    summary = run_slmc(_config(tmp_path / "r"), progress=False)
    run_dir = tmp_path / "r"
    for name in ("acceptance_vs_layers.png", "structure_factor.png", "summary.json", "config.yaml"):
        assert (run_dir / name).stat().st_size > 0
    rows = (run_dir / "samples_linear.csv").read_text().splitlines()
    assert rows[0] == "step,chain,accepted,omega,energy,filling,e_eff,m,m_stag"
    assert len(rows) == 1 + 6 * 3
    linear = summary["models"][0]
    assert 0.0 <= linear["acceptance"] <= 1.0
    assert linear["refits"] == 1  # retrain_every 4 in 6 steps
    assert summary["mu"] < 0  # below half filling
    assert len(linear["structure_factor"]) == 16
    # S(q) sums to N for unit spins
    assert sum(linear["structure_factor"]) == pytest.approx(16)


def test_resume_refuses_a_changed_config(tmp_path):
    with pytest.raises(Interrupted):
        run_slmc(_config(tmp_path / "r"), progress=False, stop_after=2)
    with pytest.raises(Exception, match="config key 'lattice.J'"):
        run_slmc(_config(tmp_path / "r", lattice__J=4.0), resume=True, progress=False)
    with pytest.raises(Exception, match="nothing to resume"):
        run_slmc(_config(tmp_path / "other"), resume=True, progress=False)


def test_resume_refuses_a_checkpoint_with_pickled_objects(tmp_path):
    """The checkpoint is read with weights_only=True: a file that needs arbitrary unpickling (here
    a Fraction among its values) is one line, not code run at load."""
    import fractions

    from torchmdx.errors import TorchmdxError

    with pytest.raises(Interrupted):
        run_slmc(_config(tmp_path / "r"), progress=False, stop_after=2)
    ck = torch.load(tmp_path / "r" / CHECKPOINT, map_location="cpu", weights_only=True)
    ck["mu"] = fractions.Fraction(1, 3)
    torch.save(ck, tmp_path / "r" / CHECKPOINT)
    with pytest.raises(TorchmdxError, match="not a readable checkpoint"):
        run_slmc(_config(tmp_path / "r"), resume=True, progress=False)


@pytest.mark.parametrize("setting,key", [
    ("lattice.L=5", "lattice.L"),
    ("lattice.L=2", "lattice.L"),
    ("lattice.temperature=0", "lattice.temperature"),
    ("lattice.temperature=-0.1", "lattice.temperature"),
    ("lattice.filling=1.5", "lattice.filling"),
    ("lattice.mu=0.5", "lattice.filling"),  # the config also gives filling: set one of the two
    ("lattice.tempereture=1", "lattice.tempereture"),
    ("effective.n_shells=9", "effective.n_shells"),
    ("effective.layers=[0]", "effective.layers"),
    ("slmc.steps=0", "slmc.steps"),
    ("slmc.chains=99", "slmc.chains"),
])
def test_bad_input_is_one_line_naming_the_key(tmp_path, capsys, setting, key):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({**TINY, "run_dir": str(tmp_path / "run")}))
    code = main(["slmc", str(config), "--set", setting, "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and f"'{key}'" in err, err


def test_previous_runs_add_their_slmc_configurations_to_the_training_data(tmp_path):
    first = run_slmc(_config(tmp_path / "a", slmc__retrain_every=0), progress=False)
    assert first["models"][0]["fit"]["configurations"] == 3 * 4  # data: 3 chains x 4 sweeps
    saved = torch.load(tmp_path / "a" / "configurations_linear.pt", weights_only=True)
    assert saved["spins"].shape == (6 * 3, 16, 3)  # 6 steps x 3 chains
    from torchmdx.lattice.fermions import DoubleExchangeModel
    from torchmdx.lattice.geometry import SquareLattice

    exact = DoubleExchangeModel(SquareLattice(4), 1.0, 8.0, 0.05, saved["mu"])
    torch.testing.assert_close(saved["omega"], exact.energy(saved["spins"]))  # the stored energies are exact
    second = run_slmc(_config(tmp_path / "b", slmc__retrain_every=0, data__previous_runs=[str(tmp_path / "a")]),
                      progress=False)
    assert second["models"][0]["fit"]["configurations"] == 3 * 4 + 2 * 6 * 3
    with pytest.raises(Exception, match="config key 'data.previous_runs'.*another model"):
        run_slmc(_config(tmp_path / "c", data__previous_runs=[str(tmp_path / "a")], lattice__J=4.0), progress=False)
    with pytest.raises(Exception, match="config key 'data.previous_runs'.*no configurations"):
        run_slmc(_config(tmp_path / "d", data__previous_runs=[str(tmp_path / "nowhere")]), progress=False)
