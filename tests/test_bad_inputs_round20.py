"""Bad inputs, round 20 (branch bad20): round 19's leftovers (``export -o`` names that are not a torch file's,
the ML-region element line without its structure file, md's close-contact warning skipped for a structure with a
far atom) and the hunt's further finds (see docs/bad_inputs.md, round 20).
"""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.io import write

from torchmdx.cli.main import main
from torchmdx.errors import ModelError
from bad_inputs_common import (  # the helpers rounds 17-20 share
    lj_file as _lj,
    argon_file as _argon,
    tiny_model as _tiny_model,
    water as _water,
    refused as _refused,
    refused_exactly as _exact,
)


# ---------------------------------------------------------------------------------- export -o names
def test_export_output_must_be_named_as_a_torch_file(tmp_path, capsys, monkeypatch):
    """``export --openmm -o om`` and ``-o om.xyz`` wrote the TorchScript file under those names (md, ASE or a
    colleague then take it for what the name says); ``export ckpt -o model.yaml`` a model file. Both exports
    take .pt and .pth names (any case) and refuse the rest, naming what the extension means."""
    monkeypatch.chdir(tmp_path)
    _lj(tmp_path)
    _tiny_model().save(tmp_path / "m.pt")
    write(tmp_path / "w.xyz", _water())
    base = ["export", "--openmm", "m.pt", "--structure", "w.xyz", "-o"]
    _exact(capsys, base + ["om"], "error: om: the name has no extension, and this writes an OpenMM module, a torch "
                                  "file; give it a .pt name, e.g. om.pt", tmp_path)
    _exact(capsys, base + ["om.xyz"], "error: om.xyz: .xyz names an XYZ file, and this writes an OpenMM module, a "
                                      "torch file; give it a .pt name, e.g. om.pt", tmp_path)
    _exact(capsys, base + ["om.dat"], "error: om.dat: .dat is not a torch file's extension, and this writes an "
                                      "OpenMM module, a torch file; give it a .pt name, e.g. om.pt", tmp_path)
    _exact(capsys, ["export", "m.pt", "-o", "model.yaml"],
           "error: model.yaml: .yaml names a YAML config, and this writes a model file, a torch file; give it a .pt "
           "name, e.g. model.pt", tmp_path)
    assert main(["export", "--openmm", "lj.pt", "-o", "om.PT"]) == 0  # any case of .pt (and .pth)
    assert (tmp_path / "om.PT").is_file()


# ---------------------------------------------------------------------------------- the ML region's elements
def test_openmm_ml_region_element_line_names_the_structure_file(tmp_path, capsys, monkeypatch):
    """"atom 0 of the ML region is element Ar (Z=18), which the model does not know" named no file; with
    --atoms it counted within the ML region (atom 1 of 0,3 is the structure's atom 3)."""
    monkeypatch.chdir(tmp_path)
    _tiny_model().save(tmp_path / "m.pt")
    _argon(tmp_path)
    write(tmp_path / "wn.xyz", Atoms("OHHN", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0], [3, 3, 3]]))
    _exact(capsys, ["export", "--openmm", "m.pt", "-o", "om.pt", "--structure", "ar.xyz"],
           "error: ar.xyz: atom 0 of the ML region is element Ar (Z=18), which the model does not know (its elements: "
           "H, C, O); leave it out of the ML atoms or use a model trained on Ar", tmp_path)
    _exact(capsys, ["export", "--openmm", "m.pt", "-o", "om.pt", "--structure", "wn.xyz", "--atoms", "0,3"],
           "error: wn.xyz: atom 3 of the ML region is element N (Z=7), which the model does not know (its elements: "
           "H, C, O); leave it out of the ML atoms or use a model trained on N", tmp_path)


# ---------------------------------------------------------------------------------- md close contacts
def test_md_close_contacts_reported_beside_a_far_atom_once_per_file(tmp_path, capsys, monkeypatch):
    """A structure with one atom beyond 1e15 Å got no close-contact warning at all (the whole structure was
    skipped); each replica repeated the warning as "structure 0", "structure 1", naming no file. Now the
    contacts among the in-range atoms are named once per file and frame, with the atoms' numbers in the file."""
    from torchmdx.md.start_checks import close_contacts

    monkeypatch.chdir(tmp_path)
    _lj(tmp_path)
    atoms = _argon(tmp_path, far=1e20)
    from ase.io import read

    atoms = read(atoms)
    atoms.positions[5] = atoms.positions[4] + [0.5, 0, 0]
    write(tmp_path / "close.xyz", atoms)
    expected = ("close.xyz: atoms 4 and 5 (Ar-Ar) are 0.5 Å apart, closer than 1.06 Å (half the sum of their covalent "
                "radii): no model was trained on that; check the structure")
    assert close_contacts([atoms], sources=["close.xyz"]) == [expected]
    assert close_contacts([atoms]) == [expected.replace("close.xyz: atoms 4 and 5", "atoms 4 and 5 of structure 0")]
    capsys.readouterr()
    assert main(["md", "close.xyz", "--model", "lj.pt", "--steps", "0", "--dtype", "float64", "--replicas", "2",
                 "--out", "o/t.extxyz", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.splitlines() == ["warning: " + expected]


# ---------------------------------------------------------------------------------- label: a file twice
def test_label_refuses_a_file_named_twice(tmp_path, capsys, monkeypatch):
    """``label a.xyz a.xyz`` labelled every frame twice (8 of 8 frames from a 4-frame file): copies a random split
    puts in training and test."""
    monkeypatch.chdir(tmp_path)
    _lj(tmp_path)
    write(tmp_path / "w.extxyz", [_water(), _water()])
    base = ["-o", "l.extxyz", "--method", "model:lj.pt", "--no-progress"]
    _exact(capsys, ["label", "w.extxyz", "w.extxyz", *base],
           "error: the structures argument names w.extxyz twice: each frame would be labelled twice, copies that a "
           "random split puts in both training and test; give each file once", tmp_path)
    line = _refused(capsys, ["label", "w.extxyz", "./w.extxyz", *base], [], tmp_path)
    assert "names ./w.extxyz twice (w.extxyz and ./w.extxyz are the same file)" in line


# ---------------------------------------------------------------------------------- data.num_workers
def test_data_num_workers_beyond_the_machine_is_refused(tmp_path, capsys, monkeypatch, shared_data):
    """``data.num_workers: 100000`` forked data-loader processes until the machine ran out (PyTorch only warns
    above the CPU count). At most 4 x the usable CPUs (at least 64)."""
    from torchmdx.devices import usable_cpus, worker_limit

    monkeypatch.chdir(tmp_path)
    source = shared_data / "md17" / "ethanol_snip.xyz"
    (tmp_path / "d.yaml").write_text(f"data:\n  path: {source}\n  num_workers: 100000\n")
    _exact(capsys, ["data", "info", "d.yaml"],
           f"error: config key 'data.num_workers' is 100000, more data-loader worker processes than this machine runs "
           f"usefully (at most {worker_limit()}: 4 x its {usable_cpus()} CPUs, at least 64); each worker is a process: "
           "use at most the CPU count (0: load in the training process)", tmp_path)
    (tmp_path / "d.yaml").write_text(f"data:\n  path: {source}\n  num_workers: {worker_limit()}\n")
    assert main(["data", "info", "d.yaml"]) == 0


# ---------------------------------------------------------------------------------- ANI HDF5 external links
def test_ani_file_with_external_links_is_refused(tmp_path, capsys, monkeypatch):
    """An ANI-1x file assembled from parts with HDF5 external links: the linked groups were dropped without a word
    (10 of 15 conformations read), and a file of links only said "datasets found: none"."""
    import h5py

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)

    def group(g, z, n):
        g["atomic_numbers"] = np.array(z)
        g["coordinates"] = rng.normal(0, 1.5, (n, len(z), 3))
        g["gfn2xtb.energy"] = rng.normal(0, 1, n)
        g["gfn2xtb.forces"] = rng.normal(0, 0.01, (n, len(z), 3))

    with h5py.File(tmp_path / "part.h5", "w") as f:
        group(f.create_group("H2O"), [8, 1, 1], 10)
    with h5py.File(tmp_path / "all.h5", "w") as f:
        group(f.create_group("CH4"), [6, 1, 1, 1, 1], 5)
        f["H2O"] = h5py.ExternalLink("part.h5", "/H2O")
    expected = ("error: all.h5: 'H2O' is an external link to part.h5:/H2O, which is not read (only the groups inside "
                "this file are, and its cache would not see the linked file change); copy the linked groups into one "
                "file (e.g. h5copy), or read the linked file on its own")
    options = ["--energy-key", "gfn2xtb.energy", "--forces-key", "gfn2xtb.forces"]
    _exact(capsys, ["data", "info", "all.h5", "--format", "ani1x", *options], expected, tmp_path)
    _exact(capsys, ["data", "info", "all.h5", *options], expected, tmp_path)  # the format guess too
    capsys.readouterr()
    assert main(["data", "info", "part.h5", *options]) == 0  # the part itself reads


# ---------------------------------------------------------------------------------- bench data's sizes
@pytest.mark.parametrize("args, line", [
    (["--n", "0"], "error: --n must be >= 1, got 0"),
    (["--batch-sizes", "32", "0"], "error: --batch-sizes must be >= 1, got 0"),
    (["--workers", "-1"], "error: --workers must be >= 0, got -1"),
])
def test_bench_data_sizes_are_checked(capfd, args, line):
    """``torchmdx bench data --n 0`` said "/tmp/.../synthetic.h5: not in the ANI-1x layout" (a temporary file);
    ``--batch-sizes 0`` was torch's ValueError traceback after the cache build."""
    capfd.readouterr()
    assert main(["bench", "data", *args]) == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err and err.splitlines() == [line]


# ---------------------------------------------------------------------------------- md: a slab without vacuum
def test_md_slab_without_an_open_direction_vector_is_named_as_such(tmp_path, capsys, monkeypatch):
    """A slab (pbc T T F) written with a zero third cell vector was "frame 0 is periodic ([True, True, False]) but
    has no cell", though its periodic rows are there; the line now says which vector is missing and how to add it.
    A structure periodic in all directions without a cell keeps its line."""
    monkeypatch.chdir(tmp_path)
    _lj(tmp_path)
    cell = [[10.5, 0, 0], [0, 10.5, 0], [0, 0, 0]]
    write(tmp_path / "slab.extxyz", Atoms("Ar2", positions=[[0, 0, 0], [3.8, 0, 0]], cell=cell, pbc=[True, True, False]))
    write(tmp_path / "gas.extxyz", Atoms("Ar2", positions=[[0, 0, 0], [3.8, 0, 0]], pbc=True))
    base = ["--model", "lj.pt", "--steps", "2", "--out", "o/t.extxyz", "--no-progress"]
    _exact(capsys, ["md", "slab.extxyz", *base],
           "error: slab.extxyz: frame 0 is periodic ([True, True, False]) but its cell spans no volume: the open "
           "direction c has no cell vector (rows [[10.5, 0.0, 0.0], [0.0, 10.5, 0.0], [0.0, 0.0, 0.0]] Å); md wraps "
           "atoms with the whole cell: give each open direction a vacuum vector, e.g. atoms.center(vacuum=10.0, "
           "axis=2) in ASE", tmp_path)
    _exact(capsys, ["md", "gas.extxyz", *base],
           "error: gas.extxyz: frame 0 is periodic ([True, True, True]) but has no cell", tmp_path)


# ---------------------------------------------------------------------------------- md: time across a restart
@pytest.mark.parametrize("engine", ["native", "ase"])
def test_md_time_continues_across_a_restart_with_another_time_step(tmp_path, monkeypatch, engine):
    """8 steps at 0.5 fs, then a restart to step 12 at 2 fs: the log and trajectory said 0.004 ps at step 8, then
    0.02 ps at step 10 (step x the new time step); the time now goes on from the restart file's (0.008 ps)."""
    from ase.io import read

    from torchmdx.md.io import read_thermo

    monkeypatch.chdir(tmp_path)
    _argon(tmp_path)
    _lj(tmp_path)
    base = ["--model", "lj.pt", "--out", "o/t.extxyz", "--every", "2", "--no-progress", "--engine", engine]
    assert main(["md", "ar.xyz", "--steps", "8", *base]) == 0
    assert main(["md", "--restart", "o/t.restart.pt", "--steps", "12", "--dt", "2", *base]) == 0
    rows = read_thermo(tmp_path / "o" / "t.csv")
    times = {row["step"]: row["time_ps"] for row in rows}
    assert times[8] == pytest.approx(0.004) and times[10] == pytest.approx(0.008) and times[12] == pytest.approx(0.012)
    frames = {a.info["step"]: a.info["time_ps"] for a in read(tmp_path / "o" / "t.extxyz", ":")}
    assert frames[10] == pytest.approx(0.008) and frames[12] == pytest.approx(0.012)


# ---------------------------------------------------------------------------------- md: restart options
def test_md_restart_refuses_minimize_and_velocities(tmp_path, capsys, monkeypatch):
    """``md --restart r.pt --minimize`` ran without minimizing, ``--velocities draw`` kept the file's velocities:
    both without a word."""
    monkeypatch.chdir(tmp_path)
    _argon(tmp_path)
    _lj(tmp_path)
    base = ["--model", "lj.pt", "--out", "o/t.extxyz", "--no-progress"]
    assert main(["md", "ar.xyz", "--steps", "2", *base]) == 0
    again = ["md", "--restart", "o/t.restart.pt", "--steps", "4", *base]
    _exact(capsys, again + ["--minimize"],
           "error: --minimize relaxes a structure before its dynamics, but --restart o/t.restart.pt continues a run "
           "(its positions and velocities, at step 2): nothing would be minimized; leave --minimize out, or minimize "
           "in a fresh run", tmp_path)
    _exact(capsys, again + ["--velocities", "draw"],
           "error: --velocities draw chooses the initial velocities, but --restart o/t.restart.pt continues a run "
           "with its own velocities (at step 2): leave --velocities out", tmp_path)


# ---------------------------------------------------------------------------------- train: num_nodes
def test_train_num_nodes_outside_a_multi_node_launch_is_refused(tmp_path, capsys, monkeypatch):
    """``trainer.num_nodes: 2`` on one machine wrote the run folder, then waited forever for the other node."""
    from torchmdx.devices import MULTI_NODE_VARIABLES

    monkeypatch.chdir(tmp_path)
    for name in MULTI_NODE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "e.npz", R=_water().positions + rng.normal(0, 0.02, (20, 3, 3)), z=np.array([8, 1, 1]),
             E=rng.normal(0, 1, 20), F=rng.normal(0, 1, (20, 3, 3)))
    (tmp_path / "t.yaml").write_text("data: {path: e.npz, train_size: 12, val_size: 4}\n"
                                     "model: {embedding_dimension: 8, num_layers: 1, num_heads: 2, num_rbf: 4}\n"
                                     "trainer: {max_epochs: 1, num_nodes: 2}\nrun_dir: runs/t\n")
    _exact(capsys, ["train", "t.yaml"],
           "error: config key 'trainer.num_nodes' is 2, but this process was not started by a multi-node launcher (no "
           "SLURM job, torchrun, or NODE_RANK/MASTER_ADDR in the environment): it would wait forever for the other "
           "nodes; set it to 1 on one machine, or launch one process per node (docs/distributed.md)", tmp_path)
    from torchmdx.devices import check_launcher

    monkeypatch.setenv("SLURM_NTASKS", "8")
    check_launcher(2)  # a SLURM job: Lightning reads the ranks from it


# ---------------------------------------------------------------------------------- the Calculator, no atoms
def test_calculator_without_a_structure_says_so(tmp_path):
    """``calc.get_potential_energy()`` before any structure: AttributeError "'NoneType' object has no attribute
    'pbc'" (ASE's own calculators fail alike)."""
    from torchmdx import Calculator

    _tiny_model().save(tmp_path / "m.pt")
    calc = Calculator(tmp_path / "m.pt")
    for call in (calc.get_potential_energy, calc.get_forces):
        with pytest.raises(ModelError) as info:
            call()
        assert str(info.value) == ("Calculator: no structure to compute; give one, calc.get_potential_energy(atoms), "
                                   "or attach the calculator (atoms.calc = calc) and ask the atoms: "
                                   "atoms.get_potential_energy()")
    assert np.isfinite(calc.get_potential_energy(_water()))


# ---------------------------------------------------------------------------------- a disordered CIF
_CIF = """data_test
_cell_length_a 5.64
_cell_length_b 5.64
_cell_length_c 5.64
_cell_angle_alpha 90
_cell_angle_beta 90
_cell_angle_gamma 90
_symmetry_space_group_name_H-M 'P 1'
loop_
_atom_site_label
_atom_site_type_symbol
_atom_site_fract_x
_atom_site_fract_y
_atom_site_fract_z
_atom_site_occupancy
{sites}
Cl1 Cl 0.5 0.5 0.5 1.0
"""


def test_partly_occupied_cif_sites_are_refused(tmp_path, capsys, monkeypatch):
    """A CIF with a site half Na, half K was read by ASE as KCl (one species kept per site) and simulated,
    labelled or exported as that, without a word; a site 0.9 occupied kept its atom whole."""
    monkeypatch.chdir(tmp_path)
    _lj(tmp_path)
    (tmp_path / "dis.cif").write_text(_CIF.format(sites="Na1 Na 0 0 0 0.5\nK1 K 0 0 0 0.5"))
    (tmp_path / "vac.cif").write_text(_CIF.format(sites="Na1 Na 0 0 0 0.9"))
    problem = ("site 0 is disordered (occupancy Na 0.5, K 0.5; ASE kept atom 0 as K): a model computes one ordered "
               "structure, so this one is not the material the file describes; give an ordered structure (one species "
               "per site, e.g. a supercell with that ratio)")
    _exact(capsys, ["md", "dis.cif", "--model", "lj.pt", "--steps", "2", "--out", "o/t.extxyz"],
           f"error: dis.cif: {problem}", tmp_path)
    _exact(capsys, ["label", "dis.cif", "-o", "l.extxyz", "--method", "model:lj.pt"],
           f"error: dis.cif: frame 0: {problem}", tmp_path)
    _exact(capsys, ["export", "--openmm", "lj.pt", "-o", "om.pt", "--structure", "dis.cif"],
           f"error: --structure dis.cif: {problem}", tmp_path)
    line = _refused(capsys, ["md", "vac.cif", "--model", "lj.pt", "--steps", "2", "--out", "o/t.extxyz"], [], tmp_path)
    assert line.startswith("error: vac.cif: site 0 is partly occupied (occupancy Na 0.9; ASE kept atom 0 as Na)")
    from torchmdx.data.ase_format import disordered_site

    (tmp_path / "ord.cif").write_text(_CIF.format(sites="Na1 Na 0 0 0 1.0"))
    from ase.io import read

    assert disordered_site(read(tmp_path / "ord.cif")) is None  # ordered: taken


# ---------------------------------------------------------------------------------- evaluate: options of a file
def test_evaluate_data_file_options_beside_a_config_are_refused(tmp_path, capsys, monkeypatch):
    """``evaluate model.pt --data t.yaml --format ani1x`` (or ``--cache-dir c``) ignored the option: the config's
    data: section chose the format and cache folder, without a word."""
    monkeypatch.chdir(tmp_path)
    _tiny_model().save(tmp_path / "m.pt")
    (tmp_path / "t.yaml").write_text("data: {path: e.npz}\n")
    _exact(capsys, ["evaluate", "m.pt", "--data", "t.yaml", "--format", "ani1x"],
           "error: --format ani1x applies to a data file given as --data, and t.yaml is a config, whose data: section "
           "chooses it: set data.format there, or give the data file as --data", tmp_path)
    _exact(capsys, ["evaluate", "m.pt", "--data", "t.yaml", "--cache-dir", "c"],
           "error: --cache-dir c applies to a data file given as --data, and t.yaml is a config, whose data: section "
           "chooses it: set data.cache_dir there, or give the data file as --data", tmp_path)
