#!/usr/bin/env python3
"""Make ``ani1x_xtb_large.h5``: a variable-size GFN2-xTB data set in the ANI-1x layout for the
accuracy race (bench/bench_accuracy.py ``--data ani1x-large``).

    PYTHONPATH=/tmp/tblite_pkgs .venv/bin/python bench/make_ani1x_large.py --out .benchdata/ani1x_xtb_large.h5

Needs ``tblite`` (``pip install --target /tmp/tblite_pkgs tblite==0.8.0``, then
``PYTHONPATH=/tmp/tblite_pkgs``) and ASE.

**Molecules.** Every closed-shell molecule (no initial magnetic moment) of ASE's G2 set
(``ase.collections.g2``) made of H, C, N and O only with 3 to ``--max-atoms`` atoms, plus the
H/C/N/O molecules of ``ase.build.molecule``'s extra set (C7NH5, BDA, biphenyl) within the size
limit: with the default 22, 61 molecules of 3-22 atoms, 46 formulas (isomers share a formula).
Radicals (HCO, CH3, C2H5, ...) and the triplet CH2 are left out: ANI-1x is closed-shell.

**Sampling.** Per molecule and per temperature of ``--temperatures`` (default 500, 650, 800 K):
GFN2-xTB Langevin MD (ASE's ``Langevin``, ``--timestep`` 0.5 fs, ``--friction`` 0.02 /fs, one
persistent tblite calculator, velocities from ``thermalize_momenta``, the centre of mass fixed
by ``FixCom``), started from the G2 geometry; ``--equilibrate`` steps (default 1000, 0.5 ps)
are thrown away, then every ``--every``-th step (default 20, 10 fs) is kept until ``--frames``
frames (default 50). So 150 frames a molecule, 9150 in all. MD frames rather than normal-mode
displacements: thermally populated conformations (torsions, ring puckering, anharmonic bond
stretches), as in ANI-1x's own MD-sampled part. A kept frame whose bond graph (pairs closer than
1.25 x the sum of ASE's covalent radii) differs from the starting geometry's (a bond broken or
formed at 800 K) is left out and counted.

**Labels.** Each kept frame's positions are rounded to float32 (the file's coordinate dtype) and
labelled again from scratch by torchmdx's labeller (``torchmdx.md.label.make_labeler``, what
``torchmdx label --method gfn2-xtb`` runs: tblite's ASE calculator, tblite's default accuracy,
iteration limit and electronic temperature), so the stored energy and forces are those of the
stored coordinates and do not depend on the MD's SCF restarts. ASE's eV and eV/Å are divided by
``torchmdx.units.HARTREE_TO_EV`` (the same value as ``ase.units.Hartree`` that tblite's calculator
multiplies by).

**File.** The ANI-1x layout of the shipped ``ani1x_xtb.h5``: one group per (Hill) formula with
``atomic_numbers`` [N] uint8, ``coordinates`` [n, N, 3] float32 Å, ``gfn2xtb.energy`` [n]
float64 Hartree, ``gfn2xtb.forces`` [n, N, 3] float64 Hartree/Å; the file's ``theory`` attribute.
The atoms of every molecule are ordered by decreasing atomic number (stable), so isomers of one
formula share one ``atomic_numbers`` row; a group's attributes name its molecules and their frame
counts, in order. Written to ``<out>.tmp``, then renamed onto ``<out>``.

**Determinism.** Every trajectory's random numbers come from ``default_rng([seed, molecule
index, temperature index])``, tblite runs with one OpenMP thread (``OMP_NUM_THREADS=1`` unless
set), so the file does not depend on ``--workers`` (molecules in parallel processes).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before numpy / tblite load OpenMP: reproducible MD

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from torchmdx.units import HARTREE_TO_EV  # noqa: E402

ELEMENTS = {"H", "C", "N", "O"}
#: ase.build.molecule's molecules outside G2 that are worth taking (H/C/N/O, closed shell)
EXTRA = ("C7NH5", "BDA", "biphenyl")
#: a pair is bonded when closer than this times the sum of the covalent radii
BOND_FACTOR = 1.25
METHOD = "gfn2-xtb"
THEORY = "GFN2-xTB (tblite {version})"


def select_molecules(min_atoms: int = 3, max_atoms: int = 22) -> list[str]:
    """Names (ase.build.molecule) of the closed-shell H/C/N/O molecules of G2 (+ :data:`EXTRA`)
    with ``min_atoms``..``max_atoms`` atoms, in G2's order then the extras."""
    from ase.build import molecule
    from ase.collections import g2

    names = []
    for name in list(g2.names) + list(EXTRA):
        atoms = molecule(name)
        if not set(atoms.get_chemical_symbols()) <= ELEMENTS or not min_atoms <= len(atoms) <= max_atoms:
            continue
        if abs(atoms.get_initial_magnetic_moments().sum()) > 1e-8:
            continue  # radicals / triplets
        names.append(name)
    return names


def ordered_molecule(name: str):
    """The molecule with its atoms in decreasing atomic number (stable): one order per formula."""
    from ase.build import molecule

    atoms = molecule(name)
    order = np.argsort(-atoms.numbers, kind="stable")
    atoms = atoms[order]
    atoms.set_initial_magnetic_moments(None)
    return atoms


def bond_graph(numbers: np.ndarray, positions: np.ndarray) -> np.ndarray:
    from ase.data import covalent_radii

    r = covalent_radii[numbers]
    d = np.linalg.norm(positions[:, None, :] - positions[None, :, :], axis=-1)
    bonded = d < BOND_FACTOR * (r[:, None] + r[None, :])
    np.fill_diagonal(bonded, False)
    return bonded


def sample_molecule(task: tuple) -> dict:
    """MD + labels of one molecule (every temperature): coordinates [k, N, 3] float32 Å, energy
    [k] Hartree, forces [k, N, 3] Hartree/Å, and counts."""
    index, name, opts = task
    from ase import units
    from ase.md.langevin import Langevin
    from ase.constraints import FixCom
    from ase.md.velocitydistribution import Stationary, thermalize_momenta
    from tblite.ase import TBLite

    from torchmdx.md.label import LabelOptions, make_labeler

    label = make_labeler(LabelOptions(method=METHOD))
    start = ordered_molecule(name)
    reference = bond_graph(start.numbers, start.positions)
    coords, energies, forces = [], [], []
    dropped = 0
    reasons = {}  # first changed pair of a dropped frame -> its last distance (Å)
    steps = 0
    t0 = time.perf_counter()
    for t_index, temperature in enumerate(opts["temperatures"]):
        rng = np.random.default_rng([opts["seed"], index, t_index])
        atoms = start.copy()
        atoms.calc = TBLite(method="GFN2-xTB", verbosity=0)
        thermalize_momenta(atoms, temperature_K=temperature, rng=rng)
        Stationary(atoms)
        atoms.set_constraint(FixCom())  # ASE's advice over Langevin's fixcm for small molecules
        dyn = Langevin(atoms, opts["timestep"] * units.fs, temperature_K=temperature,
                       friction=opts["friction"] / units.fs, fixcm=False, rng=rng)
        dyn.run(opts["equilibrate"])
        steps += opts["equilibrate"]
        for _ in range(opts["frames"]):
            dyn.run(opts["every"])
            steps += opts["every"]
            pos32 = atoms.positions.astype(np.float32)
            changed = np.argwhere(np.triu(bond_graph(atoms.numbers, pos32.astype(np.float64)) != reference))
            if len(changed):
                i, j = changed[0]
                d = float(np.linalg.norm(pos32[i].astype(np.float64) - pos32[j]))
                what = "broken" if reference[i, j] else "formed"
                reasons[f"{start[i].symbol}{i}-{start[j].symbol}{j} {what}"] = d
                dropped += 1
                continue
            frame = start.copy()
            frame.positions = pos32.astype(np.float64)
            try:
                energy, force, _ = label(frame)
            except Exception as exc:  # noqa: BLE001 - an SCF that does not converge: leave the frame out
                print(f"  {name} {temperature} K: labelling failed ({type(exc).__name__}: {exc}); frame left out",
                      flush=True)
                dropped += 1
                continue
            coords.append(pos32)
            energies.append(energy / HARTREE_TO_EV)
            forces.append(np.asarray(force, dtype=np.float64) / HARTREE_TO_EV)
    n_atoms = len(start)
    return {"index": index, "name": name, "formula": start.get_chemical_formula(mode="hill"),
            "numbers": start.numbers.astype(np.uint8),
            "coordinates": np.asarray(coords, dtype=np.float32).reshape(-1, n_atoms, 3),
            "energy": np.asarray(energies, dtype=np.float64),
            "forces": np.asarray(forces, dtype=np.float64).reshape(-1, n_atoms, 3),
            "dropped": dropped, "reasons": reasons, "steps": steps, "seconds": time.perf_counter() - t0}


def write_file(out: Path, results: list, attrs: dict) -> dict:
    """One group per formula (molecules in selection order), temp name then rename."""
    import h5py

    groups: dict[str, list] = {}
    for r in sorted(results, key=lambda r: r["index"]):
        if len(r["energy"]):
            groups.setdefault(r["formula"], []).append(r)
    tmp = out.with_name(out.name + ".tmp")
    with h5py.File(tmp, "w") as h5:
        for key, value in attrs.items():
            h5.attrs[key] = value
        for formula in sorted(groups):
            parts = groups[formula]
            numbers = parts[0]["numbers"]
            for p in parts[1:]:
                if not np.array_equal(p["numbers"], numbers):
                    raise SystemExit(f"{p['name']}: atom order differs from {parts[0]['name']} of formula {formula}")
            g = h5.create_group(formula)
            g.create_dataset("atomic_numbers", data=numbers)
            g.create_dataset("coordinates", data=np.concatenate([p["coordinates"] for p in parts]))
            g.create_dataset("gfn2xtb.energy", data=np.concatenate([p["energy"] for p in parts]))
            g.create_dataset("gfn2xtb.forces", data=np.concatenate([p["forces"] for p in parts]))
            g.attrs["molecules"] = ",".join(p["name"] for p in parts)
            g.attrs["frames"] = np.array([len(p["energy"]) for p in parts], dtype=np.int64)
    os.replace(tmp, out)
    return {f: sum(len(p["energy"]) for p in parts) for f, parts in groups.items()}


def check_file(path: Path, frames: int = 3, seed: int = 0) -> int:
    """Read ``path`` through torchmdx's ANI-1x reader and check ``frames`` random conformations:
    the reader's eV and eV/Å are the file's Hartree and Hartree/Å times ``HARTREE_TO_EV``, and a
    fresh GFN2-xTB single point through tblite's own interface (``tblite.interface.Calculator``:
    Bohr in, Hartree and Hartree/Bohr out, not the ASE calculator the labels came from) gives the
    file's energy and forces to 1e-6 relative. 0 when every check holds."""
    import h5py
    from tblite.interface import Calculator

    from torchmdx.data.ani import read_ani1x
    from torchmdx.units import BOHR_TO_ANGSTROM

    st = read_ani1x(path)
    offsets = np.asarray(st.offsets)
    counts = np.diff(offsets)
    pos = np.asarray(st.pos)
    print(f"{path}: torchmdx reads {len(counts)} structures of {counts.min()}-{counts.max()} atoms, "
          f"{len(st.group_names)} formulas, theory {st.metadata.get('theory')!r}", flush=True)
    rng = np.random.default_rng(seed)
    worst = 0.0
    with h5py.File(path, "r") as h5:
        names = sorted(h5)
        for _ in range(frames):
            name = names[rng.integers(len(names))]
            g = h5[name]
            k = int(rng.integers(len(g["gfn2xtb.energy"])))
            numbers = g["atomic_numbers"][()].astype(np.int64)
            xyz = g["coordinates"][k].astype(np.float64)
            e_file, f_file = float(g["gfn2xtb.energy"][k]), g["gfn2xtb.forces"][k]
            hits = [s for s in np.flatnonzero(counts == len(numbers))
                    if np.array_equal(pos[offsets[s]:offsets[s + 1]], xyz)]
            assert len(hits) == 1, f"{name}[{k}]: found {len(hits)} times in the reader's structures"
            s = hits[0]
            a, b = offsets[s], offsets[s + 1]
            assert np.array_equal(np.asarray(st.z)[a:b], numbers)
            unit_e = abs(float(st.energy[s]) - e_file * HARTREE_TO_EV) / abs(e_file * HARTREE_TO_EV)
            unit_f = np.abs(np.asarray(st.forces)[a:b] - f_file * HARTREE_TO_EV).max() / np.abs(f_file * HARTREE_TO_EV).max()
            calc = Calculator("GFN2-xTB", numbers, xyz / BOHR_TO_ANGSTROM)
            calc.set("verbosity", 0)
            result = calc.singlepoint()
            e_new = float(result.get("energy"))
            f_new = -np.asarray(result.get("gradient")) / BOHR_TO_ANGSTROM
            rel_e = abs(e_file - e_new) / abs(e_new)
            rel_f = np.abs(f_file - f_new).max() / np.abs(f_new).max()
            worst = max(worst, rel_e, rel_f, unit_e, unit_f)
            print(f"  {name}[{k}] ({len(numbers)} atoms): E file {e_file:.10f} Eh, tblite {e_new:.10f} Eh "
                  f"(rel {rel_e:.1e}); max |dF| / max |F| {rel_f:.1e} (max |F| {np.abs(f_new).max():.4f} Eh/Å); "
                  f"reader vs file x HARTREE_TO_EV: E rel {unit_e:.1e}, F rel {unit_f:.1e}", flush=True)
    ok = worst <= 1e-6
    print(f"{'OK' if ok else 'FAILED'}: worst relative difference {worst:.1e} (limit 1e-6)", flush=True)
    return 0 if ok else 1


def drop_reasons(result: dict) -> str:
    if not result["reasons"]:
        return ""
    return " (" + ", ".join(f"{k}: {d:.2f} Å" for k, d in result["reasons"].items()) + ")"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / ".benchdata" / "ani1x_xtb_large.h5"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-atoms", type=int, default=22)
    parser.add_argument("--temperatures", default="500,650,800", help="K, comma-separated: one trajectory each")
    parser.add_argument("--frames", type=int, default=50, help="frames kept per trajectory")
    parser.add_argument("--every", type=int, default=20, help="MD steps between kept frames")
    parser.add_argument("--equilibrate", type=int, default=1000, help="MD steps thrown away first")
    parser.add_argument("--timestep", type=float, default=0.5, help="fs")
    parser.add_argument("--friction", type=float, default=0.02, help="1/fs")
    parser.add_argument("--molecules", default=None, help="comma-separated subset of the selection (tests)")
    parser.add_argument("--workers", type=int, default=1, help="processes (molecules in parallel)")
    parser.add_argument("--list", action="store_true", help="print the molecules and stop")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    parser.add_argument("--check", action="store_true",
                        help="check --out instead: torchmdx's reader, units, and a tblite recompute of a few frames")
    args = parser.parse_args(argv)
    if args.check:
        return check_file(Path(args.out), seed=args.seed)

    names = select_molecules(max_atoms=args.max_atoms)
    position = {n: i for i, n in enumerate(names)}  # a molecule's seed index: its place in the whole selection
    if args.molecules:
        wanted = [m.strip() for m in args.molecules.split(",") if m.strip()]
        unknown = [m for m in wanted if m not in names]
        if unknown:
            print(f"error: --molecules {', '.join(unknown)}: not in the selection ({', '.join(names)})", file=sys.stderr)
            return 2
        names = [m for m in names if m in wanted]
    sizes = {n: len(ordered_molecule(n)) for n in names}
    formulas = {ordered_molecule(n).get_chemical_formula(mode="hill") for n in names}
    print(f"{len(names)} molecules, {len(formulas)} formulas, {min(sizes.values())}-{max(sizes.values())} atoms: "
          + ", ".join(f"{n} ({sizes[n]})" for n in names), flush=True)
    if args.list:
        return 0
    out = Path(args.out)
    if out.exists() and not args.force:
        print(f"error: {out} exists; --force replaces it", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    temperatures = [float(t) for t in args.temperatures.split(",")]
    opts = {"seed": args.seed, "temperatures": temperatures, "frames": args.frames, "every": args.every,
            "equilibrate": args.equilibrate, "timestep": args.timestep, "friction": args.friction}
    from importlib.metadata import version

    tasks = [(position[n], n, opts) for n in names]
    # the work of a molecule ~ steps x (atoms, roughly): for the ETA
    weight = {n: max(sizes[n], 3) ** 1.3 for n in names}
    total_weight, done_weight = sum(weight.values()), 0.0
    results = []
    t0 = time.perf_counter()
    if args.workers > 1:
        import multiprocessing as mp

        pool = mp.get_context("fork").Pool(args.workers)
        iterator = pool.imap_unordered(sample_molecule, sorted(tasks, key=lambda t: -weight[t[1]]))
    else:
        pool, iterator = None, map(sample_molecule, tasks)
    for r in iterator:
        results.append(r)
        done_weight += weight[r["name"]]
        elapsed = time.perf_counter() - t0
        eta = elapsed * (total_weight - done_weight) / done_weight
        print(f"[{len(results)}/{len(names)}] {r['name']} ({r['formula']}, {sizes[r['name']]} atoms): "
              f"{len(r['energy'])} frames, {r['dropped']} dropped{drop_reasons(r)}, {r['steps']} MD steps in {r['seconds']:.1f} s "
              f"({1e3 * r['seconds'] / r['steps']:.2f} ms/step); {sum(len(x['energy']) for x in results)} frames, "
              f"{elapsed / 60:.1f} min so far, ~{eta / 60:.1f} min left", flush=True)
    if pool is not None:
        pool.close()
        pool.join()
    attrs = {"theory": THEORY.format(version=version("tblite")), "made_by": "bench/make_ani1x_large.py", "seed": args.seed,
             "temperatures_K": np.array(temperatures), "frames_per_trajectory": args.frames,
             "every_steps": args.every, "equilibrate_steps": args.equilibrate, "timestep_fs": args.timestep,
             "friction_per_fs": args.friction}
    counts = write_file(out, results, attrs)
    total = sum(counts.values())
    atoms = [sizes[r["name"]] for r in results for _ in range(len(r["energy"]))]
    print(f"wrote {out}: {total} structures, {len(counts)} formulas, {min(atoms)}-{max(atoms)} atoms "
          f"(mean {np.mean(atoms):.1f}), {sum(r['dropped'] for r in results)} frames dropped, "
          f"{out.stat().st_size / 1e6:.2f} MB, {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
