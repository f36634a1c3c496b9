"""``torchmdx md`` end to end: outputs on the shared sample systems with a small ET model file,
YAML options, restart continuation through the CLI, native vs ASE engine, pressure vs ASE,
replicas, and one-line errors with exit status 2."""

import csv
import json

import numpy as np
import pytest
import torch
from ase import units as ase_units
from ase.calculators.lj import LennardJones as AseLennardJones
from ase.cluster import Icosahedron
from ase.build import bulk
from ase.io import read, write

import torchmdx
from torchmdx.cli.main import main
from torchmdx.md.io import load_restart, read_thermo
from torchmdx.nn.analytic import LennardJones
from torchmdx.nn.base import Potential
from torchmdx.nn.model_file import register_potential

EPS, SIG = 0.0104, 3.4
COLUMNS = ["step", "time_ps", "potential_eV", "kinetic_eV", "total_eV", "temperature_K", "conserved_eV"]


@pytest.fixture(scope="module")
def et_model(tmp_path_factory):
    """A small randomly initialised ET model file (the trained demo model comes later)."""
    model = torchmdx.build_model(
        {"embedding_dimension": 16, "num_layers": 1, "num_heads": 2, "num_rbf": 8, "cutoff_upper": 4.0, "seed": 1}
    )
    path = tmp_path_factory.mktemp("models") / "et.pt"
    model.save(path)
    return path


@pytest.fixture(scope="module")
def lj_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "lj.pt"
    LennardJones(EPS, SIG, shift="energy").save(path)
    return path


def _md(tmp_path, *args):
    return main(["md", *map(str, args), "--no-progress"])


# random ET weights give large forces: short steps and no temperature limit for these runs
SAFE = ["--dt", "0.2", "--max-temperature", "1e7"]


def test_md_on_alanine_dipeptide_writes_all_outputs(tmp_path, shared_data, et_model, capsys):
    out = tmp_path / "ala.extxyz"
    rc = _md(tmp_path, shared_data / "systems" / "alanine_dipeptide.xyz", "--model", et_model, "--steps", 20,
             "--every", 5, "--temperature", 100, "--ensemble", "langevin", "--friction", 5, "--out", out, *SAFE)
    assert rc == 0
    printed = capsys.readouterr().out
    assert "steps/s" in printed and "ns/day" in printed and "eV/atom" in printed
    frames = read(out, index=":")
    assert [f.info["step"] for f in frames] == [0, 5, 10, 15, 20]
    source = read(shared_data / "systems" / "alanine_dipeptide.xyz")
    assert (frames[0].numbers == source.numbers).all() and len(frames[-1]) == 22
    np.testing.assert_allclose(frames[0].positions, source.positions, atol=1e-5)
    assert np.isfinite(frames[-1].get_forces()).all() and frames[-1].get_velocities().std() > 0
    with open(tmp_path / "ala.csv") as f:
        header = next(csv.reader(f))
    assert header == COLUMNS  # one molecule, not periodic: no structure or pressure column
    rows = read_thermo(tmp_path / "ala.csv")
    assert [r["step"] for r in rows] == [0, 5, 10, 15, 20]
    assert rows[2]["time_ps"] == pytest.approx(10 * 0.2e-3)
    for r in rows:
        assert r["total_eV"] == pytest.approx(r["potential_eV"] + r["kinetic_eV"], rel=1e-6)
    assert rows[-1]["potential_eV"] == pytest.approx(frames[-1].get_potential_energy(), rel=1e-6)
    restart = load_restart(tmp_path / "ala.restart.pt")
    assert restart["step"] == 20 and restart["ensemble"] == "langevin"
    summary = json.loads((tmp_path / "ala.summary.json").read_text())
    assert summary["steps"] == 20 and summary["steps_per_s"] > 0 and summary["ns_per_day"] > 0
    assert "energy_drift_eV_per_atom" in summary
    # the thermo plot: a real PNG next to the log, named in the summary
    plot = tmp_path / "ala.png"
    assert summary["plot"] == str(plot)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000


def test_md_on_caffeine_pdb_with_minimisation_and_traj_output(tmp_path, shared_data, et_model, capsys):
    out = tmp_path / "caffeine.traj"
    rc = _md(tmp_path, shared_data / "systems" / "caffeine.pdb", "--model", et_model, "--steps", 10, "--every", 5,
             "--ensemble", "nose-hoover", "--temperature", 50, "--minimize", "--fmax", 0.5, "--minimize-steps", 20,
             "--out", out, *SAFE)
    assert rc == 0
    assert "FIRE:" in capsys.readouterr().out
    frames = read(out, index=":")
    assert [f.info["step"] for f in frames] == [0, 5, 10] and len(frames[0]) == 24
    assert (tmp_path / "caffeine.csv").exists() and (tmp_path / "caffeine.restart.pt").exists()


def test_yaml_config_and_command_line_override(tmp_path, shared_data, et_model):
    config = tmp_path / "md.yaml"
    config.write_text(
        "md:\n"
        f"  structure: {shared_data / 'systems' / 'caffeine.xyz'}\n"
        f"  model: {et_model}\n"
        "  steps: 50\n  every: 2\n  dt: 0.2\n  ensemble: bussi\n  tau: 50\n  max_temperature: 1.0e+7\n"
        f"  out: {tmp_path / 'yaml.extxyz'}\n"
    )
    assert _md(tmp_path, "--config", config, "--steps", 4) == 0  # the command line wins
    assert [r["step"] for r in read_thermo(tmp_path / "yaml.csv")] == [0, 2, 4]


def test_bad_config_key_is_one_line_error(tmp_path, capsys):
    config = tmp_path / "md.yaml"
    config.write_text("md:\n  temprature: 300\n")
    assert _md(tmp_path, "--config", config) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: config key 'md.temprature' does not exist (did you mean 'temperature'?)")
    assert "\n" not in err


def test_threads_option_sets_torch_threads_and_rejects_zero(tmp_path, lj_model, capsys):
    structure = tmp_path / "ar13.xyz"
    write(structure, Icosahedron("Ar", 2))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # the test session runs on one thread: start from another count
        assert _md(tmp_path, structure, "--model", lj_model, "--steps", 2, "--threads", 1,
                   "--out", tmp_path / "t.extxyz") == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert _md(tmp_path, structure, "--model", lj_model, "--threads", 0, "--out", tmp_path / "u.extxyz") == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("error: --threads must be >= 1, got 0") and "\n" not in err.split("error:")[-1]


def test_every_command_line_option_reaches_the_config():
    """Each option's dest is an MDConfig field and arrives in the config (no hand-kept list)."""
    import argparse
    from dataclasses import fields

    from torchmdx.cli import md_cmd
    from torchmdx.md.config import MDConfig

    parser = argparse.ArgumentParser()
    md_cmd.add_arguments(parser)
    names = {f.name for f in fields(MDConfig)}
    dests = {a.dest for a in parser._actions if a.dest not in ("help", "config")}
    assert dests <= names
    args = parser.parse_args(["x.xyz", "--threads", "3", "--no-cuda-graph", "--skin", "0.7", "--no-wrap", "--no-compile"])
    config = md_cmd.config_from_args(args)
    assert (config.threads, config.cuda_graph, config.skin, config.wrap, config.structure, config.compile) == (
        3, False, 0.7, False, ["x.xyz"], "off")
    assert md_cmd.config_from_args(parser.parse_args(["x.xyz", "--compile", "whole"])).compile == "whole"
    assert md_cmd.config_from_args(parser.parse_args(["x.xyz"])).compile == "auto"
    assert md_cmd.config_from_args(parser.parse_args(["x.xyz"])).fuse_integrator == "auto"
    for text, value in (("true", True), ("false", False), ("auto", "auto")):
        assert md_cmd.config_from_args(parser.parse_args(["x.xyz", "--fuse-integrator", text])).fuse_integrator == value


def test_fused_integrator_through_the_cli_gives_the_same_run(tmp_path, shared_data, et_model, capsys, monkeypatch):
    """``--fuse-integrator true`` (the integrator's work compiled, torchmdx.md.integrators_fused)
    writes the trajectory and thermo log of the plain run (Langevin, float64); a bad value is one
    line from argparse."""
    from torchmdx.md import integrators_fused

    used = []
    original = integrators_fused.FusedFunctions.get

    def counting(self, name, *args, **kwargs):
        used.append((name, self.compile))
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(integrators_fused.FusedFunctions, "get", counting)
    structure = shared_data / "systems" / "alanine_dipeptide.xyz"
    common = ["--model", et_model, "--every", 5, "--steps", 15, "--ensemble", "langevin", "--dtype", "float64", *SAFE]
    assert _md(tmp_path, structure, *common, "--out", tmp_path / "plain.extxyz") == 0
    assert not used  # the default runs the eager integrator
    assert _md(tmp_path, structure, *common, "--fuse-integrator", "true", "--out", tmp_path / "fused.extxyz") == 0
    assert len(used) >= 15 and all(compiled for _, compiled in used), used[:3]
    plain, fused = read(tmp_path / "plain.extxyz", ":"), read(tmp_path / "fused.extxyz", ":")
    assert len(plain) == len(fused) == 4
    for a, b in zip(plain, fused):
        np.testing.assert_allclose(b.positions, a.positions, rtol=0, atol=1e-10)
        np.testing.assert_allclose(b.get_velocities(), a.get_velocities(), rtol=0, atol=1e-10)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        _md(tmp_path, structure, *common, "--fuse-integrator", "yes", "--out", tmp_path / "bad.extxyz")
    assert info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1 and "--fuse-integrator" in err[0], err


def test_restart_through_the_cli_continues_bit_for_bit(tmp_path, shared_data, et_model):
    structure = shared_data / "systems" / "alanine_dipeptide.xyz"
    common = ["--model", et_model, "--every", 5, "--ensemble", "langevin", "--temperature", 100, *SAFE]
    assert _md(tmp_path, structure, *common, "--steps", 30, "--out", tmp_path / "full.extxyz") == 0
    assert _md(tmp_path, structure, *common, "--steps", 15, "--out", tmp_path / "part.extxyz") == 0
    # continue to 30 steps in total from the restart file written at step 15
    assert _md(tmp_path, *common, "--steps", 30, "--out", tmp_path / "part.extxyz",
               "--restart", tmp_path / "part.restart.pt") == 0
    full, part = read_thermo(tmp_path / "full.csv"), read_thermo(tmp_path / "part.csv")
    assert [r["step"] for r in part] == [0, 5, 10, 15, 20, 25, 30]
    assert full == part
    full_frames, part_frames = read(tmp_path / "full.extxyz", ":"), read(tmp_path / "part.extxyz", ":")
    assert len(full_frames) == len(part_frames) == 7
    np.testing.assert_array_equal(full_frames[-1].positions, part_frames[-1].positions)


def test_native_and_ase_engines_agree_on_nve(tmp_path, lj_model):
    cluster = Icosahedron("Ar", 2)
    cluster.rattle(0.1, seed=2)
    structure = tmp_path / "ar13.xyz"
    write(structure, cluster)
    common = ["--model", lj_model, "--steps", 100, "--every", 20, "--dt", 5, "--temperature", 40,
              "--dtype", "float64", "--seed", 7]
    assert _md(tmp_path, structure, *common, "--out", tmp_path / "native.extxyz") == 0
    assert _md(tmp_path, structure, *common, "--engine", "ase", "--out", tmp_path / "ase.extxyz") == 0
    native, ase_rows = read_thermo(tmp_path / "native.csv"), read_thermo(tmp_path / "ase.csv")
    assert [r["step"] for r in native] == [r["step"] for r in ase_rows] == [0, 20, 40, 60, 80, 100]
    for a, b in zip(native, ase_rows):
        for key in ("potential_eV", "kinetic_eV", "temperature_K"):
            assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-12), (a["step"], key)
    np.testing.assert_allclose(read(tmp_path / "native.extxyz").positions, read(tmp_path / "ase.extxyz").positions,
                               atol=1e-9)


@pytest.mark.parametrize("ensemble", ["langevin", "bussi", "nose-hoover"])
def test_ase_engine_thermostats(tmp_path, lj_model, ensemble):
    """ASE's integrators through the CLI: outputs written; Bussi and Nosé–Hoover conserve their
    extended energy (ASE's transferred_energy / get_conserved_energy)."""
    cluster = Icosahedron("Ar", 2)
    structure = tmp_path / "ar13.xyz"
    write(structure, cluster)
    assert _md(tmp_path, structure, "--model", lj_model, "--engine", "ase", "--ensemble", ensemble, "--steps", 200,
               "--every", 20, "--dt", 5, "--temperature", 30, "--friction", 10, "--tau", 100, "--dtype", "float64",
               "--out", tmp_path / "t.extxyz") == 0
    rows = read_thermo(tmp_path / "t.csv")
    assert [r["step"] for r in rows] == list(range(0, 201, 20))
    assert all(0 < r["temperature_K"] < 200 for r in rows)
    if ensemble != "langevin":
        conserved = np.array([r["conserved_eV"] for r in rows])
        kinetic = np.array([r["kinetic_eV"] for r in rows])
        assert np.abs(conserved - conserved[0]).max() < 0.05 * np.abs(kinetic - kinetic[0]).max()
    assert load_restart(tmp_path / "t.restart.pt")["step"] == 200


def test_periodic_pressure_matches_ase(tmp_path):
    crystal = bulk("Ar", "fcc", a=5.3, cubic=True).repeat((3, 3, 3))  # 15.9 Å box: cutoff 7 Å fits
    model = tmp_path / "lj7.pt"
    LennardJones(EPS, SIG, cutoff=7.0).save(model)
    structure = tmp_path / "argon.extxyz"
    write(structure, crystal)
    assert _md(tmp_path, structure, "--model", model, "--steps", 10, "--every", 10, "--dt", 5,
               "--temperature", 60, "--dtype", "float64", "--out", tmp_path / "argon_md.extxyz") == 0
    with open(tmp_path / "argon_md.csv") as f:
        assert "pressure_bar" in next(csv.reader(f))
    last_row = read_thermo(tmp_path / "argon_md.csv")[-1]
    frame = read(tmp_path / "argon_md.extxyz", index=-1)
    frame.calc = AseLennardJones(epsilon=EPS, sigma=SIG, rc=7.0, smooth=False)
    stress = frame.get_stress(voigt=False, include_ideal_gas=True)
    pressure_bar = -np.trace(stress) / 3 / (1e5 * ase_units.Pascal)  # eV/Å³ -> bar
    assert last_row["pressure_bar"] == pytest.approx(pressure_bar, rel=1e-8)
    # constant volume: 15.9³ Å³; 108 argon atoms of 39.948 amu, 1 amu = 1.66053904e-24 g, 1 Å³ = 1e-24 cm³
    assert last_row["volume_A3"] == pytest.approx(15.9 ** 3, rel=1e-12)
    assert last_row["density_g_cm3"] == pytest.approx(108 * 39.948 * 1.66053904 / 15.9 ** 3, rel=1e-6)


def _argon_box(tmp_path, rattle=0.05):
    crystal = bulk("Ar", "fcc", a=5.3, cubic=True).repeat((3, 3, 3))
    crystal.rattle(rattle, seed=4)
    structure = tmp_path / "argon_box.extxyz"
    write(structure, crystal)
    model = tmp_path / "lj7.pt"
    LennardJones(EPS, SIG, cutoff=7.0).save(model)
    return crystal, structure, model


@pytest.mark.parametrize("barostat", ["isotropic", "anisotropic"])
def test_ase_engine_npt_equals_ase_langevin_baoab_with_its_own_lj(tmp_path, barostat):
    """--pressure with --engine ase is ASE's LangevinBAOAB barostat on the torchmdx calculator:
    the same run with ASE's own Lennard-Jones calculator (its own stress, its own neighbor
    search) gives the same cell volumes and positions, and 5 kbar compresses the crystal."""
    from ase.md.langevinbaoab import LangevinBAOAB

    from torchmdx.md.system import System

    crystal, structure, model = _argon_box(tmp_path)
    assert _md(tmp_path, structure, "--model", model, "--engine", "ase", "--ensemble", "langevin", "--friction", 5,
               "--pressure", 5000, "--barostat-tau", 500, "--barostat", barostat, "--steps", 60, "--every", 20,
               "--dt", 5, "--temperature", 60, "--dtype", "float64", "--seed", 3,
               "--out", tmp_path / "npt.extxyz") == 0
    rows = read_thermo(tmp_path / "npt.csv")
    assert [r["step"] for r in rows] == [0, 20, 40, 60]

    atoms = crystal.copy()  # the same run, ASE alone
    system = System.from_atoms([atoms], "cpu", torch.float64)
    atoms.set_velocities(system.maxwell_boltzmann(60.0, torch.Generator().manual_seed(3)).numpy())
    atoms.calc = AseLennardJones(epsilon=EPS, sigma=SIG, rc=7.0, smooth=False)
    five_kbar = 5000 * 1e5 * ase_units.Pascal  # eV/Å³
    dyn = LangevinBAOAB(atoms, timestep=5 * ase_units.fs, temperature_K=60, T_tau=200 * ase_units.fs,
                        externalstress=-five_kbar, hydrostatic=barostat == "isotropic", P_tau=500 * ase_units.fs,
                        rng=np.random.default_rng(3))
    volumes = [atoms.get_volume()]
    dyn.attach(lambda: volumes.append(atoms.get_volume()), interval=20)
    dyn.run(60)
    np.testing.assert_allclose([r["volume_A3"] for r in rows], volumes[:1] + volumes[2:], rtol=1e-9)
    last = read(tmp_path / "npt.extxyz", index=-1)
    np.testing.assert_allclose(last.cell.array, atoms.cell.array, rtol=1e-9, atol=1e-9)
    atoms.wrap()
    np.testing.assert_allclose(last.positions, atoms.positions, atol=1e-7)
    assert rows[-1]["volume_A3"] < 0.99 * rows[0]["volume_A3"]
    assert rows[-1]["density_g_cm3"] > rows[0]["density_g_cm3"]
    # the enthalpy column and the restart file's cell
    p = five_kbar
    assert rows[-1]["conserved_eV"] == pytest.approx(rows[-1]["total_eV"] + p * rows[-1]["volume_A3"], rel=1e-12)
    np.testing.assert_allclose(load_restart(tmp_path / "npt.restart.pt")["cell"].numpy(), last.cell.array, rtol=1e-12)
    from PIL import Image

    width, height = Image.open(tmp_path / "npt.png").size  # energy, temperature and density panels
    assert height > 1.1 * width


@pytest.mark.parametrize("barostat", ["isotropic", "anisotropic"])
def test_mtk_npt_conserves_its_energy_and_equals_ase(tmp_path, barostat):
    """--ensemble nose-hoover --pressure: ASE's MTK NPT on the torchmdx calculator. Its conserved
    energy (thermostat, barostat, P V) holds while the volume moves, which needs the stress to
    be the true strain derivative of the energy; the same run with ASE's own LJ agrees."""
    from ase.md.nose_hoover_chain import MTKNPT, IsotropicMTKNPT

    from torchmdx.md.system import System

    crystal, structure, model = _argon_box(tmp_path)
    common = ["--model", model, "--engine", "ase", "--ensemble", "nose-hoover", "--tau", 200, "--pressure", 5000,
              "--barostat-tau", 500, "--barostat", barostat, "--steps", 200, "--every", 20, "--dt", 5,
              "--temperature", 60, "--dtype", "float64", "--seed", 5]
    assert _md(tmp_path, structure, *common, "--out", tmp_path / "mtk.extxyz") == 0
    rows = read_thermo(tmp_path / "mtk.csv")
    volumes = np.array([r["volume_A3"] for r in rows])
    conserved = np.array([r["conserved_eV"] for r in rows])
    kinetic = np.array([r["kinetic_eV"] for r in rows])
    assert np.ptp(volumes) > 0.01 * volumes[0]  # the cell moves
    # (what drift there is comes from the force jump of the energy-shifted LJ at its cutoff and
    # 5 fs steps: ASE's own run below has the same conserved energy)
    assert np.ptp(conserved) < 0.05 * np.ptp(kinetic)

    atoms = crystal.copy()
    system = System.from_atoms([atoms], "cpu", torch.float64)
    atoms.set_velocities(system.maxwell_boltzmann(60.0, torch.Generator().manual_seed(5)).numpy())
    atoms.calc = AseLennardJones(epsilon=EPS, sigma=SIG, rc=7.0, smooth=False)
    integrator = IsotropicMTKNPT if barostat == "isotropic" else MTKNPT
    dyn = integrator(atoms, timestep=5 * ase_units.fs, temperature_K=60, pressure_au=5000 * 1e5 * ase_units.Pascal,
                     tdamp=200 * ase_units.fs, pdamp=500 * ase_units.fs, tchain=3)
    dyn.run(200)
    assert volumes[-1] == pytest.approx(atoms.get_volume(), rel=1e-8)
    assert conserved[-1] == pytest.approx(dyn.get_conserved_energy(), abs=1e-8)


def test_pressure_and_ase_langevin_errors_are_one_line(tmp_path, lj_model, capsys):
    _, box, model = _argon_box(tmp_path)
    cluster = tmp_path / "ar13.xyz"
    write(cluster, Icosahedron("Ar", 2))
    cases = [
        ((box, "--model", model, "--pressure", 1), "needs --engine ase"),
        ((box, "--model", model, "--pressure", 1, "--engine", "ase", "--ensemble", "bussi"),
         "langevin or nose-hoover (NPT) or nve"),
        ((cluster, "--model", lj_model, "--pressure", 1, "--engine", "ase", "--ensemble", "langevin"),
         "periodic in x, y and z"),
        ((box, "--model", model, "--pressure", 1, "--engine", "ase", "--barostat-tau", 0), "--barostat-tau must be > 0"),
        ((box, "--model", model, "--pressure", 1, "--engine", "ase", "--ensemble", "langevin", "--friction", 0),
         "error: --friction must be > 0 1/ps for ASE's Langevin integrator"),
    ]
    for args, message in cases:
        capsys.readouterr()
        assert _md(tmp_path, *args, "--steps", 2, "--out", tmp_path / "bad.extxyz") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_replicas_write_one_trajectory_each(tmp_path, shared_data, et_model):
    out = tmp_path / "rep.extxyz"
    assert _md(tmp_path, shared_data / "systems" / "caffeine.xyz", "--model", et_model, "--steps", 4, "--every", 2,
               "--replicas", 3, "--out", out, *SAFE) == 0
    for k in range(3):
        assert len(read(tmp_path / f"rep.{k}.extxyz", ":")) == 3
    rows = read_thermo(tmp_path / "rep.csv")
    assert [(r["step"], r["structure"]) for r in rows[:3]] == [(0, 0), (0, 1), (0, 2)]
    # same structure, different Maxwell–Boltzmann velocities
    assert len({r["kinetic_eV"] for r in rows[:3]}) == 3


def test_different_molecules_in_one_batch(tmp_path, shared_data, et_model):
    both = tmp_path / "two.extxyz"
    write(both, [read(shared_data / "systems" / "alanine_dipeptide.xyz"), read(shared_data / "systems" / "caffeine.xyz")])
    assert _md(tmp_path, both, "--model", et_model, "--steps", 2, "--every", 2, "--out", tmp_path / "last.extxyz", *SAFE) == 0
    assert len(read(tmp_path / "last.extxyz", 0)) == 24  # default: the last frame only
    assert _md(tmp_path, both, "--index", ":", "--model", et_model, "--steps", 2, "--every", 2,
               "--out", tmp_path / "all.extxyz", *SAFE) == 0
    assert [len(read(tmp_path / f"all.{k}.extxyz", -1)) for k in range(2)] == [22, 24]
    assert sorted({r["structure"] for r in read_thermo(tmp_path / "all.csv")}) == [0, 1]


@register_potential
class NaNAwayLJ(Potential):
    """LJ that turns NaN (energy and forces) once atom 0 is more than ``radius`` Å from
    ``anchor``: a test-only model kind, stateless so that replays see the same NaN."""

    kind = "test_nan_away_lj"

    def __init__(self, anchor=(0.0, 0.0, 0.0), radius: float = 1.0):
        super().__init__()
        self.anchor, self.radius = [float(x) for x in anchor], float(radius)
        self.inner = LennardJones(EPS, SIG)
        self.cutoff = self.inner.cutoff

    def hparams(self):
        return {"anchor": self.anchor, "radius": self.radius}

    def atomic_energies(self, graph):
        anchor = torch.tensor(self.anchor, dtype=graph.pos.dtype)
        away = (graph.pos[0].detach() - anchor).norm() > self.radius
        return self.inner.atomic_energies(graph) * torch.where(away, float("nan"), 1.0)


def test_nan_model_stops_with_exit_status_2_keeping_last_good_frame(tmp_path, capsys):
    import re

    cluster = Icosahedron("Ar", 2)
    structure = tmp_path / "ar13.xyz"
    write(structure, cluster)
    model = tmp_path / "nan.pt"
    NaNAwayLJ(anchor=cluster.positions[0].tolist(), radius=0.3).save(model)  # passed near step 94
    out, restart = tmp_path / "nan.extxyz", tmp_path / "nan.restart.pt"
    rc = _md(tmp_path, structure, "--model", model, "--steps", 400, "--every", 10, "--dt", 5, "--temperature", 100,
             "--dtype", "float64", "--out", out)
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    match = re.match(
        r"error: simulation stopped at step (\d+): the forces are not finite \(NaN/inf\) on atom \d+ of structure 0; "
        r"last good state \(step (\d+)\) kept in the trajectory's last frame and (.+)$", err)
    assert match, err
    bad, good = int(match.group(1)), int(match.group(2))
    assert good == bad - 1 and match.group(3) == str(restart)
    frames = read(out, index=":")
    steps = [f.info["step"] for f in frames]
    assert good > 20 and steps[-1] == good and steps[:-1] == list(range(0, good, 10))
    assert np.isfinite(frames[-1].positions).all() and np.isfinite(frames[-1].get_forces()).all()
    assert np.linalg.norm(frames[-1].positions[0] - cluster.positions[0]) <= 0.3
    assert load_restart(restart)["step"] == good
    assert not (tmp_path / "nan.summary.json").exists()


def test_unknown_element_and_missing_files_are_one_line_errors(tmp_path, shared_data, capsys):
    argon_only = tmp_path / "ar.pt"
    LennardJones({18: EPS}, {18: SIG}).save(argon_only)
    assert _md(tmp_path, shared_data / "systems" / "caffeine.xyz", "--model", argon_only, "--steps", 2,
               "--out", tmp_path / "x.extxyz") == 2
    err = capsys.readouterr().err.strip()
    # the structure file named first (round 8: several files or frames named an atom of the batch)
    assert err.startswith(f"error: {shared_data / 'systems' / 'caffeine.xyz'}: atom 0 is element ") \
        and "it knows: Ar" in err and "\n" not in err
    assert _md(tmp_path, tmp_path / "missing.xyz", "--model", argon_only) == 2
    assert "missing.xyz: structure file not found" in capsys.readouterr().err
    assert _md(tmp_path, shared_data / "systems" / "caffeine.xyz", "--model", tmp_path / "none.pt") == 2
    assert "none.pt: model file not found" in capsys.readouterr().err
    assert _md(tmp_path, shared_data / "systems" / "caffeine.xyz", "--model", argon_only, "--device", "gpu0") == 2
    assert "error: --device 'gpu0' is not a device name" in capsys.readouterr().err
