"""Stress labels against energies (branch stresscheck, docs/bad_inputs.md "Stress labels against energies"): a
stress of the other sign or in GPa / kbar read as eV/Å³ is one warning line; labels of ASE's own calculators say
nothing. The data are made here: a 32-atom copper box run by ASE's Berendsen NPT dynamics with the EMT calculator
(the cell moves every frame), and an equation-of-state scan of copper and nickel, written as extxyz.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from torchmdx.cli.main import main
from torchmdx.units import EV_PER_A3_TO_GPA


@pytest.fixture(scope="module")
def npt_frames():
    """30 frames (two 2 fs steps apart) of a 32-atom fcc copper box at 600 K and zero pressure, anisotropic
    Berendsen NPT (cell changes of about 1e-3 per frame), with EMT energies, forces and stress; under a second."""
    from ase import units
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.md.nptberendsen import Inhomogeneous_NPTBerendsen
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    atoms = bulk("Cu", cubic=True).repeat(2)
    atoms.calc = EMT()
    MaxwellBoltzmannDistribution(atoms, temperature_K=600, rng=np.random.default_rng(0))
    dyn = Inhomogeneous_NPTBerendsen(atoms, 2 * units.fs, temperature_K=600, pressure_au=0.0, taut=50 * units.fs,
                                     taup=100 * units.fs, compressibility_au=0.1 / units.GPa)
    frames = []
    for _ in range(30):
        dyn.run(2)
        frames.append((atoms.copy(), atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()))
    return frames


def _write(path, frames, stress_factor=1.0, force_factor=1.0, wrap=False, volume_factor=False):
    """``frames`` (atoms, energy, forces, Voigt stress) as extxyz, the stress times ``stress_factor`` (times the
    cell volume too with ``volume_factor``), the forces times ``force_factor``; ``wrap``: atoms into the cell."""
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    out = []
    for atoms, energy, forces, stress in frames:
        frame = atoms.copy()
        if wrap:
            frame.wrap()
        labels = dict(energy=energy)
        if stress is not None:
            labels["stress"] = stress * stress_factor * (frame.get_volume() if volume_factor else 1.0)
        if forces is not None:
            labels["forces"] = forces * force_factor
        frame.calc = SinglePointCalculator(frame, **labels)
        out.append(frame)
    write(path, out, format="extxyz")
    return path


def _line(path):
    from torchmdx.data.formats import read_structures
    from torchmdx.data.stress_consistency import stress_energy_line

    return stress_energy_line(read_structures(path), path.name)


def test_the_rule_is_exact_to_second_order(tmp_path):
    """E_b - E_a - W_F - W_σ of a rattled copper box and a strained (general, not symmetric: a rotation part too),
    moved copy falls by about 8 (third order) each time the step is halved, as read back from extxyz."""
    from ase.build import bulk
    from ase.calculators.emt import EMT

    from torchmdx.data.formats import read_structures
    from torchmdx.data.stress_consistency import _pair_terms

    rng = np.random.default_rng(5)
    strain, move = rng.normal(0.0, 0.01, (3, 3)), rng.normal(0.0, 0.02, (32, 3))
    start = bulk("Cu", cubic=True).repeat(2)
    start.rattle(0.05, seed=1)
    residuals, changes = [], []
    for scale in (1.0, 0.5, 0.25):
        frames = []
        for k in range(2):
            atoms = start.copy()
            if k:
                atoms.set_cell(np.asarray(atoms.cell) @ (np.eye(3) + scale * strain), scale_atoms=True)
                atoms.positions += scale * move
            atoms.calc = EMT()
            frames.append((atoms, atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()))
        st = read_structures(_write(tmp_path / f"{scale}.extxyz", frames))
        work_f, work_s, d_energy, _ = _pair_terms(st, st.extras["stress"], 0, 1, st.offsets, 1.0, 1.0)
        assert abs(work_s) > 0.1 * abs(d_energy)
        residuals.append(d_energy - work_f - work_s)
        changes.append(d_energy)
    assert abs(residuals[0]) < 0.05 * abs(changes[0])  # a few % of the energy change at the largest step
    assert 6 < residuals[0] / residuals[1] < 10 and 6 < residuals[1] / residuals[2] < 10, residuals


def test_consistent_npt_labels_say_nothing(tmp_path, capsys, monkeypatch, npt_frames):
    """EMT's labels fit the trapezoid rule: slope 1 (1.0005 on these frames), correlation 1; atoms wrapped into the
    cell between frames and forces in Hartree/Bohr (the force check's mistake, fitted by its own factor) leave the
    stress slope as it was."""
    from torchmdx.data.formats import read_structures
    from torchmdx.data.stress_consistency import MIN_PAIRS, stress_slope

    fit = stress_slope(read_structures(_write(tmp_path / "ok.extxyz", npt_frames)))
    assert fit["pairs"] == 29 >= MIN_PAIRS and fit["paired"] == "consecutive"
    assert fit["slope"] == pytest.approx(1.0, abs=0.01) and fit["force_slope"] == pytest.approx(1.0, abs=0.01)
    assert fit["correlation"] > 0.999
    assert _line(tmp_path / "ok.extxyz") is None
    odd = stress_slope(read_structures(_write(tmp_path / "w.extxyz", npt_frames, force_factor=1 / 51.422, wrap=True)))
    assert odd["slope"] == pytest.approx(fit["slope"], rel=1e-5) and odd["force_slope"] == pytest.approx(51.4, rel=0.01)
    assert _line(tmp_path / "w.extxyz") is None
    # nor does data info with a cache (data prepare)
    monkeypatch.chdir(tmp_path)  # the cache's folder, data/cache
    assert main(["data", "prepare", str(tmp_path / "ok.extxyz")]) == 0
    capsys.readouterr()
    assert main(["data", "info", str(tmp_path / "ok.extxyz")]) == 0
    out = capsys.readouterr().out
    assert "data/cache/ok.extxyz" in out and "note" not in out


@pytest.mark.parametrize("name, factor, volume, slope, words", [
    ("neg.extxyz", -1.0, False, -1.0, "(a stress of the other sign: positive under compression"),
    ("gpa.extxyz", EV_PER_A3_TO_GPA, False, 1 / EV_PER_A3_TO_GPA, "(a stress in GPa read as eV/Å³?)"),
    ("kbar.extxyz", -10 * EV_PER_A3_TO_GPA, False, -0.1 / EV_PER_A3_TO_GPA, "(a pressure tensor in kbar (positive "
                                                                             "under compression: VASP's OUTCAR)"),
    ("vir.extxyz", -1.0, True, None, "(a virial -V σ (eV) given as the stress"),
])
def test_stress_of_the_other_sign_or_unit_warns(tmp_path, npt_frames, name, factor, volume, slope, words):
    """The stress negated (a pressure tensor, a virial / V), in GPa, in VASP's kbar, a virial -V σ: one line naming
    the file, the slope and what it looks like."""
    line = _line(_write(tmp_path / name, npt_frames, stress_factor=factor, volume_factor=volume))
    assert line is not None and line.startswith(f"{name}: the stress does not fit the energies: over 29 pairs of "
                                                "consecutive structures whose cell changed a little"), line
    assert words in line and "check the sign and unit of the stress" in line, line
    said = float(re.search(r"the energy changes by (\S+) times the work of the stress", line).group(1))
    volume = np.median([atoms.get_volume() for atoms, *_ in npt_frames])  # the cells breathe by about 2 %
    assert said == pytest.approx(slope if slope is not None else -1 / volume, rel=0.01)


def test_no_cell_change_or_no_stress_says_nothing(tmp_path, npt_frames):
    """Frames of one cell (the force check's pairs) have no stress work, whatever the stress's sign; a file without
    a stress has nothing to check."""
    from torchmdx.data.formats import read_structures
    from torchmdx.data.stress_consistency import stress_slope

    cell = npt_frames[0][0].cell
    fixed = []
    for atoms, energy, forces, stress in npt_frames:
        atoms = atoms.copy()
        atoms.set_cell(cell, scale_atoms=True)  # the labels no longer belong to these positions: nothing is fitted
        fixed.append((atoms, energy, forces, stress))
    path = _write(tmp_path / "nvt.extxyz", fixed, stress_factor=-1.0)
    assert stress_slope(read_structures(path))["pairs"] == 0
    assert _line(path) is None
    plain = _write(tmp_path / "plain.extxyz", [(a, e, f, None) for a, e, f, _ in npt_frames])
    assert _line(plain) is None


def _eos_frames():
    """Copper and nickel boxes (32 atoms) at 12 lattice constants 1 % apart, atoms scaled with the cell, with EMT
    energies and stress and no forces, shuffled: no two consecutive frames are a step apart."""
    from ase.build import bulk
    from ase.calculators.emt import EMT

    frames = []
    for element in ("Cu", "Ni"):
        for k in range(12):
            atoms = bulk(element, cubic=True).repeat(2)
            atoms.set_cell(atoms.cell * (0.94 + 0.01 * k), scale_atoms=True)
            atoms.calc = EMT()
            frames.append((atoms, atoms.get_potential_energy(), None, atoms.get_stress()))
    order = np.random.default_rng(1).permutation(len(frames))
    return [frames[k] for k in order]


def test_shuffled_equation_of_state_is_paired_by_volume(tmp_path):
    """An equation-of-state scan written shuffled, without forces: structures of the same atoms sorted by volume are
    the pairs (22: 11 per element); ASE's stress fits (slope 0.999), the negated one warns."""
    from torchmdx.data.formats import read_structures
    from torchmdx.data.stress_consistency import stress_slope

    frames = _eos_frames()
    fit = stress_slope(read_structures(_write(tmp_path / "eos.extxyz", frames)))
    assert fit["paired"] == "volume" and fit["pairs"] == 22 and fit["force_slope"] is None
    assert fit["slope"] == pytest.approx(1.0, abs=0.01)
    assert _line(tmp_path / "eos.extxyz") is None
    line = _line(_write(tmp_path / "neg.extxyz", frames, stress_factor=-1.0))
    assert line is not None and "over 22 pairs of structures of the same atoms next in volume" in line, line
    assert "the energy changes by -0.999" in line and "a stress of the other sign" in line


def test_stress_in_gpa_warns_in_train_and_data_info(tmp_path, capsys, monkeypatch, npt_frames):
    """Through the command line: one ``warning:`` line at the start of a one-epoch ``train`` with the stress in the
    loss, and a ``note`` line of ``data info`` once the file has a cache (the training built it)."""
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "gpa.extxyz", npt_frames, stress_factor=EV_PER_A3_TO_GPA)
    (tmp_path / "t.yaml").write_text(
        "data: {path: gpa.extxyz, train_size: 24, val_size: 6}\n"
        "model: {embedding_dimension: 8, num_layers: 1, num_heads: 2, num_rbf: 4, cutoff_upper: 3.5}\n"
        "train: {stress_weight: 1.0}\n"
        "trainer: {max_epochs: 1, enable_progress_bar: false, num_sanity_val_steps: 0}\nrun_dir: runs/t\n")
    capsys.readouterr()
    assert main(["train", "t.yaml"]) == 0
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("warning:")]
    assert len(lines) == 1, lines
    assert "gpa.extxyz: the stress does not fit the energies" in lines[0]
    assert "(a stress in GPa read as eV/Å³?)" in lines[0]
    assert main(["data", "info", "gpa.extxyz"]) == 0
    notes = [x for x in capsys.readouterr().out.splitlines() if "the stress does not fit the energies" in x]
    assert len(notes) == 1 and notes[0].startswith("note ") and "(a stress in GPa read as eV/Å³?)" in notes[0]
    # the streamed summary (no cache) keeps no positions: nothing to say
    assert main(["data", "info", "gpa.extxyz", "--cache-dir", "nowhere"]) == 0
    assert "the stress does not fit" not in capsys.readouterr().out
