"""Bad inputs, round 29 (branch bad29): the Python API as users of ASE, TorchMD-NET, MACE or SchNetPack call it
(``Simulation`` and its ``run`` / ``minimize`` / ``save_restart``); see docs/bad_inputs.md, round 29.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from ase.cluster import Icosahedron

from torchmdx.errors import ConfigError, DataError
from bad_inputs_common import at_most


def lj():
    from torchmdx.nn.analytic import LennardJones

    return LennardJones(0.0104, 3.4)


def argon():
    return Icosahedron("Ar", 2)


# ------------------------------------------------------------------------------ Simulation's arguments
@pytest.mark.parametrize("argument, value, line", [
    ("skin", "0.5", "skin must be a distance >= 0 Å, got '0.5'"),
    ("skin", float("nan"), "skin must be a distance >= 0 Å, got nan"),
    ("check_interval", "10", "check_interval must be a whole number of steps >= 1, got '10'"),
    ("check_interval", 2.5, "check_interval must be a whole number of steps >= 1, got 2.5"),
    ("chain_length", 2.5, "chain_length must be a whole number of thermostats >= 1, got 2.5"),
    ("wrap", "no", "wrap must be True or False, got 'no'"),
])
def test_simulation_arguments_of_the_wrong_kind_are_one_line(argument, value, line):
    """``Simulation(..., skin="0.5")`` or ``check_interval="10"`` were TypeErrors from deep inside, ``check_interval=2.5``
    and ``chain_length=2.5`` ran as 2, ``wrap="no"`` wrapped, ``skin=nan`` said "cutoff must be a positive number"."""
    from torchmdx.md import Simulation

    with pytest.raises(ConfigError) as info:
        Simulation(lj(), argon(), ensemble="nose-hoover", **{argument: value})
    assert str(info.value) == line


def test_simulation_of_a_file_name_says_to_read_it():
    """``Simulation(model, "ar.xyz")`` was "'str' object has no attribute 'copy'"."""
    from torchmdx.md import Simulation

    with pytest.raises(DataError) as info:
        Simulation(lj(), "ar.xyz")
    assert str(info.value) == ("Simulation: structures must be an ase.Atoms or a list of them, got str 'ar.xyz'; "
                               "read the file first (ase.io.read)")


def test_simulation_run_restart_every_below_one_is_refused(tmp_path):
    """``run(5, restart_path=..., restart_every=-3)`` never ended; ``restart_every=0`` was taken as 10 x every."""
    from torchmdx.md import Simulation

    sim = Simulation(lj(), argon())
    for value in (-3, 0):
        with at_most(20), pytest.raises(ConfigError) as info:
            sim.run(5, restart_path=tmp_path / "r.restart.pt", restart_every=value)
        assert str(info.value) == f"restart_every must be a whole number of steps >= 1 (None: 10 x every), got {value}"


def test_simulation_run_reporters_may_be_functions_and_others_are_one_line():
    """``run(n, reporters=[f])`` with a function (as ASE's ``dyn.attach(f)``) was "'function' object has no
    attribute 'report'", a lone function "'function' object is not iterable", an object without ``report`` an
    AttributeError after the first steps."""
    from torchmdx.md import Simulation

    sim = Simulation(lj(), argon())
    steps = []
    sim.run(4, reporters=lambda simulation, observation: steps.append(observation.step), every=2)
    sim.run(2, reporters=[lambda simulation, observation: steps.append(-observation.step)], every=2)
    assert steps == [0, 2, 4, -4, -6]
    for reporters, line in (([object()], "reporters: item 0 (object) has no report(simulation, observation) method; "
                                         "give torchmdx.md.Reporter objects or functions f(simulation, observation)"),
                            (3, "reporters must be a list of Reporter objects (or functions f(simulation, "
                                "observation)), got int 3")):
        with pytest.raises(ConfigError) as info:
            sim.run(2, reporters=reporters)
        assert str(info.value) == line
    assert sim.state.step == 6  # refused before any step


@pytest.mark.parametrize("kwargs, line", [
    ({"fmax": -1}, "fmax must be a force > 0 eV/Å, got -1"),
    ({"fmax": float("nan")}, "fmax must be a force > 0 eV/Å, got nan"),
    ({"fmax": "0.05"}, "fmax must be a force > 0 eV/Å, got '0.05'"),
    ({"max_steps": 2.5}, "max_steps must be a whole number of steps >= 0, got 2.5"),
    ({"max_steps": -1}, "max_steps must be a whole number of steps >= 0, got -1"),
])
def test_simulation_minimize_arguments(kwargs, line):
    """``minimize(fmax=-1)`` or NaN ran every step and said "not converged"; ``max_steps=2.5`` ran 2, -1 none,
    ``fmax="0.05"`` was a TypeError."""
    from torchmdx.md import Simulation

    atoms = argon()
    atoms.positions *= 0.9  # forces above the default fmax
    with pytest.raises(ConfigError) as info:
        Simulation(lj(), atoms).minimize(**kwargs)
    assert str(info.value) == line


# ------------------------------------------------------------------------------ Simulation's structures
def test_simulation_refuses_ase_constraints():
    """A structure with a FixAtoms: the engine moved its atoms while frames() (through ASE's set_positions) showed
    them fixed; ``torchmdx md`` refused such a file, the Python API took it."""
    from ase.constraints import FixAtoms

    from torchmdx.md import Simulation

    atoms = argon()
    atoms.set_constraint(FixAtoms([0, 1, 2]))
    with pytest.raises(ConfigError) as info:
        Simulation(lj(), [argon(), atoms])
    assert str(info.value) == ("Simulation: structure 1: holds constraints (FixAtoms) that the native engine does not "
                               "apply; run ASE's dynamics with torchmdx.Calculator (ASE applies them), or remove them "
                               "(del atoms.constraints)")


def test_simulation_says_the_structures_velocities_are_not_used():
    """Atoms with velocities (ASE's MaxwellBoltzmannDistribution, a trajectory's frame) started from drawn ones,
    silently (ASE's dynamics start from them; ``torchmdx md`` takes them)."""
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    from torchmdx.md import Simulation

    atoms = argon()
    MaxwellBoltzmannDistribution(atoms, temperature_K=50, rng=np.random.default_rng(1))
    sim = Simulation(lj(), atoms, temperature_K=300)
    with pytest.warns(UserWarning) as record:
        sim.initialize()
    assert len(record) == 1
    assert str(record[0].message).startswith("Simulation.initialize: structure 0 carries velocities (ASE momenta) that "
                                             "are not used: without velocities= it draws Maxwell–Boltzmann "
                                             "velocities at 300 K; pass velocities=")
    # given, they are used, silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state = Simulation(lj(), atoms).initialize(velocities=atoms.get_velocities())
    assert np.allclose(state.velocities.numpy(), atoms.get_velocities(), atol=1e-6)


def test_run_md_checks_a_config_built_in_python(tmp_path, monkeypatch):
    """``run_md(MDConfig(...))`` used a directly built config unchecked: ``structure="ar.xyz"`` read a file named "a"
    ("a: structure file not found"), ``dt="fast"`` was a TypeError, a dict "'dict' object has no attribute 'device'",
    a Potential as ``model`` "expected str, bytes or os.PathLike object"."""
    from bad_inputs_common import argon_file, lj_file
    from torchmdx.md import MDConfig, run_md

    monkeypatch.chdir(tmp_path)
    lj_file(tmp_path), argon_file(tmp_path)
    common = dict(model="lj.pt", steps=2, progress=False)
    with pytest.raises(ConfigError) as info:
        run_md(MDConfig(structure="ar.xyz", dt="fast", out="a.extxyz", **common))
    assert str(info.value) == "config key 'md.dt' must be float, got 'fast' (str)"
    with pytest.raises(ConfigError) as info:
        run_md(MDConfig(structure="ar.xyz", friction=5.0, out="a.extxyz", **common))
    assert str(info.value).startswith("config key 'md.friction' sets the Langevin thermostat's friction")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ar.xyz", "lj.pt"]  # refused before any output
    assert run_md(MDConfig(structure="ar.xyz", out="a.extxyz", **common))["steps"] == 2
    assert run_md({"structure": ["ar.xyz"], "out": "b.extxyz", **common})["steps"] == 2
    assert run_md(MDConfig(structure="ar.xyz", out="c.extxyz", **{**common, "model": lj()}))["steps"] == 2
    with pytest.raises(ConfigError) as info:
        run_md(["ar.xyz"])
    assert str(info.value) == "run_md: expected an MDConfig (or a mapping of its keys), got list"


# ------------------------------------------------------------------------------ output file names
@pytest.mark.parametrize("how", ["save_restart", "run"])
def test_restart_path_ending_in_a_slash_is_refused(tmp_path, how):
    """``save_restart("out/")`` (or ``run(restart_path="out/")``) wrote a file named ``out``; ``save_restart("")``
    said ".: is a folder"."""
    from torchmdx.md import Simulation

    sim = Simulation(lj(), argon())
    sim.initialize()
    name = f"{tmp_path}/out/"
    with pytest.raises(ConfigError) as info:
        sim.save_restart(name) if how == "save_restart" else sim.run(5, restart_path=name)
    assert str(info.value) == f"{name}: ends in '/', so it names a folder; give the name of a file to write"
    assert list(tmp_path.iterdir()) == []
    assert sim.state.step == 0  # refused before any step
    with pytest.raises(ConfigError) as info:
        sim.save_restart("")
    assert str(info.value) == "the path to write is empty (''); give the name of a file to write"


# ------------------------------------------------------------------------------ splits from Python
def test_split_unpacks_into_its_three_parts():
    """``train, val, test = random_split(n)`` (TorchMD-NET's ``make_splits`` returns the three index arrays) was
    ``KeyError: 0``; ``random_split(100.0)`` numpy's "axis 0 is out of bounds for array of dimension 0"."""
    from torchmdx.data import random_split

    split = random_split(100, 0.8, 0.1)
    train, val, test = split
    assert (train is split.train) and (val is split.val) and (test is split.test)
    assert [len(train), len(val), len(test)] == [80, 10, 10]
    with pytest.raises(KeyError, match=r"a Split's parts are train, val, test \(split\['train'\] or split.train\), "
                                       "got 0"):
        split[0]
    for bad in (100.0, "100", -1):
        with pytest.raises(DataError) as info:
            random_split(bad)
        assert str(info.value) == ("split: the number of structures must be a whole number >= 0 (e.g. len(dataset)), "
                                   f"got {bad!r}")


# ------------------------------------------------------------------------------ models from Python
@pytest.mark.parametrize("half", ["half", "bfloat16"])
def test_calculator_and_openmm_refuse_a_half_precision_model(half):
    """``Calculator(model.half())`` computed in float16 (-0.162 eV for -0.159, bfloat16 -0.170) without a word
    (``predict`` refuses it); ``build_module`` said the architecture "cannot be exported to TorchScript yet"."""
    import torchmdx
    from bad_inputs_common import tiny_model, water
    from torchmdx.errors import ModelError
    from torchmdx.openmm.errors import OpenMMError
    from torchmdx.openmm.export import build_module

    model = getattr(tiny_model(), half)()
    name = "float16" if half == "half" else "bfloat16"
    with pytest.raises(ModelError) as info:
        torchmdx.Calculator(model)
    assert str(info.value) == (f"the model's weights are {name}, which keep about 3 significant digits (energies off "
                               "by percents); torchmdx computes in float32 or float64: pass dtype='float32' (or "
                               "convert the model with model.float())")
    with pytest.raises(OpenMMError, match=f"^the model's weights are {name}, which keep about 3 significant digits; "
                                          "the OpenMM module computes in float32 or float64"):
        build_module(model, [8, 1, 1])
    atoms = water()
    atoms.calc = torchmdx.Calculator(model, dtype="float32")  # said: computed in float32 (a copy of the weights)
    reference = tiny_model().predict(water())["energy"]
    assert atoms.get_potential_energy() == pytest.approx(reference, abs=0.02)
    assert str(next(model.parameters()).dtype) == f"torch.{name}"  # the caller's model is left as it was


def test_atomref_list_in_the_order_of_the_elements_is_refused():
    """``set_normalisation(elements=[1, 6, 8], atomref=[-13.6, -1029, -2041])``: the list is indexed by Z, so
    hydrogen got carbon's reference and carbon and oxygen none, silently."""
    from bad_inputs_common import tiny_model
    from torchmdx.errors import ModelError

    model = tiny_model()
    before = model.normalisation()
    with pytest.raises(ModelError) as info:
        model.set_normalisation(elements=[1, 6, 8], atomref=[-13.6, -1029.0, -2041.0], scale=2.0)
    assert str(info.value) == (
        "atomref: a list is indexed by atomic number (atomref[1] is H's), and this list of 3 gives -13.6 eV to X "
        "(Z=0), not one of the model's elements (H, C, O), and nothing to C (Z=6) (listed in the order of the "
        "elements?); give {Z: energy}, e.g. {1: -13.6, 6: -1029.0}, or a list with an entry for every Z up to the "
        "largest")
    assert model.normalisation() == before  # nothing of the call was kept
    # indexed by Z (a QM9 table with N and F for a model of H and C too), or a mapping: taken
    model.set_normalisation(atomref=[0, -13.6, 0, 0, 0, 0, -1029.0, -1400.0, -2041.0, -2700.0])
    model.set_normalisation(atomref={1: -13.6, 6: -1029.0, 8: -2041.0})
    assert model.normalisation()["atomref"] == {1: -13.6, 6: -1029.0, 8: -2041.0}
