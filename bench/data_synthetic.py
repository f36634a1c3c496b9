"""Synthetic raw datasets of ``bench/bench_data.py`` (written to temporary folders, never shipped):
small ANI-1x / MD17 / extxyz files for the throughput table, and the layouts at scale (ANI-1x of
8..23-atom formulas, MACE's MPtrj layout as extxyz and as an ASE database), each written frame by
frame so that memory does not grow with the size."""

from __future__ import annotations

from pathlib import Path

import numpy as np

ELEMENTS = np.array([1, 6, 7, 8])


def synthetic_ani1x(path: Path, n: int, seed: int = 0) -> None:
    import h5py

    rng = np.random.default_rng(seed)
    per_group = 200
    with h5py.File(path, "w") as h5:
        made, g = 0, 0
        while made < n:
            count = min(per_group, n - made)
            natoms = int(rng.integers(5, 31))
            z = np.sort(rng.choice(ELEMENTS, size=natoms, p=[0.5, 0.3, 0.1, 0.1]))
            grp = h5.create_group(f"mol{g:05d}")
            grp["atomic_numbers"] = z.astype(np.uint8)
            grp["coordinates"] = (rng.normal(size=(count, natoms, 3)) * 1.5).astype(np.float32)
            grp["wb97x_dz.energy"] = -40.0 * natoms + rng.normal(size=count) * 0.01
            grp["wb97x_dz.forces"] = rng.normal(size=(count, natoms, 3)) * 0.05
            made += count
            g += 1


def synthetic_md17(path: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    natoms = 21
    np.savez(path, R=rng.normal(size=(n, natoms, 3)), z=rng.choice(ELEMENTS, size=natoms),
             E=rng.normal(size=(n, 1)) - 400000.0, F=rng.normal(size=(n, natoms, 3)))


def synthetic_extxyz(path: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    with open(path, "w") as out:
        for k in range(n):
            natoms = int(rng.integers(5, 31))
            z = rng.choice(["H", "C", "N", "O"], size=natoms)
            out.write(f"{natoms}\nProperties=species:S:1:pos:R:3:forces:R:3 energy={-40.0 * natoms:.6f} "
                      f"family=f{k % 50} pbc=\"F F F\"\n")
            for s, p, f in zip(z, rng.normal(size=(natoms, 3)), rng.normal(size=(natoms, 3))):
                out.write(f"{s} {p[0]:.6f} {p[1]:.6f} {p[2]:.6f} {f[0]:.6f} {f[1]:.6f} {f[2]:.6f}\n")


#: per-element energies of the synthetic file (Hartree; roughly those of wB97x/6-31G(d))
REFS_HARTREE = np.zeros(9)
REFS_HARTREE[[1, 6, 7, 8]] = [-0.60, -38.08, -54.71, -75.19]


def synthetic_ani1x_scale(path: Path, n: int, seed: int = 0, per_formula: int = 250) -> dict:
    """ANI-1x layout at scale: formulas of 8..23 atoms, ``per_formula`` conformations each,
    written group by group (memory does not grow with n). Returns sizes."""
    import h5py

    rng = np.random.default_rng(seed)
    made, g, atoms = 0, 0, 0
    with h5py.File(path, "w") as h5:
        while made < n:
            count = min(per_formula, n - made)
            natoms = int(rng.integers(8, 24))
            z = np.sort(rng.choice(ELEMENTS, size=natoms, p=[0.5, 0.3, 0.1, 0.1]))
            grp = h5.create_group(f"f{g:06d}_{natoms}")
            grp["atomic_numbers"] = z.astype(np.uint8)
            grp["coordinates"] = (rng.standard_normal((count, natoms, 3), dtype=np.float32) * 1.5)
            grp["wb97x_dz.energy"] = REFS_HARTREE[z].sum() + rng.standard_normal(count) * 0.01
            grp["wb97x_dz.forces"] = rng.standard_normal((count, natoms, 3), dtype=np.float32) * 0.05
            made += count
            atoms += count * natoms
            g += 1
    return {"structures": made, "atoms": atoms, "formulas": g, "bytes": path.stat().st_size}


#: the elements of the synthetic MPtrj-like file (oxides, alloys, ...)
CRYSTAL_ELEMENTS = ["Li", "O", "Na", "Mg", "Al", "Si", "P", "S", "K", "Ca", "Fe", "Ni"]


def synthetic_extxyz_scale(path: Path, n: int, seed: int = 0) -> dict:
    """An extxyz of ``n`` frames in MACE's MPtrj layout (module docstring), written frame by frame (memory does
    not grow with n): atoms on a jittered cubic grid of spacing 2 Å (no two closer than ~1.4 Å), forces in eV/Å,
    stress in eV/Å³. Returns sizes."""
    rng = np.random.default_rng(seed)
    atoms = 0
    with open(path, "w") as out:
        for k in range(n):
            natoms = int(rng.integers(4, 61))
            side = int(np.ceil(natoms ** (1 / 3)))
            grid = np.stack(np.meshgrid(*[np.arange(side)] * 3, indexing="ij"), -1).reshape(-1, 3)[:natoms]
            pos = (grid + rng.uniform(-0.15, 0.15, size=(natoms, 3))) * 2.0
            length = 2.0 * side
            symbols = rng.choice(CRYSTAL_ELEMENTS, size=natoms)
            forces = rng.normal(scale=0.5, size=(natoms, 3))
            magmom = rng.uniform(0.0, 3.0, size=natoms)
            stress = rng.normal(scale=0.01, size=(3, 3))
            stress = (stress + stress.T).reshape(-1)
            energy = -5.0 * natoms + rng.normal()
            out.write(f"{natoms}\nLattice=\"{length} 0.0 0.0 0.0 {length} 0.0 0.0 0.0 {length}\" "
                      "Properties=species:S:1:pos:R:3:REF_forces:R:3:REF_magmom:R:1 "
                      f"REF_energy={energy:.8f} corrected_total_energy={energy - 0.1:.8f} "
                      f"REF_stress=\"{' '.join(f'{v:.8f}' for v in stress)}\" mp_id=mp-{k % 100000} "
                      "pbc=\"T T T\"\n")
            rows = np.column_stack([pos, forces, magmom])
            values = [item for symbol, row in zip(symbols, rows.tolist()) for item in (symbol, *row)]
            out.write(("%s %.8f %.8f %.8f %.8f %.8f %.8f %.4f\n" * natoms) % tuple(values))
            atoms += natoms
    return {"structures": n, "atoms": atoms, "bytes": path.stat().st_size}


def synthetic_db_scale(path: Path, n: int, seed: int = 0) -> dict:
    """An ASE database of ``n`` rows: the frames of :func:`synthetic_extxyz_scale` (without the per-atom magnetic
    moments, which a database keeps only as a calculator's result torchmdx does not read), energy, forces and stress
    as a calculator's results, ``corrected_total_energy`` and ``mp_id`` as key-value pairs; written in one
    transaction (memory does not grow with n). Returns sizes."""
    import ase.db
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    rng = np.random.default_rng(seed)
    atoms_total = 0
    with ase.db.connect(str(path), append=False) as db:
        for k in range(n):
            natoms = int(rng.integers(4, 61))
            side = int(np.ceil(natoms ** (1 / 3)))
            grid = np.stack(np.meshgrid(*[np.arange(side)] * 3, indexing="ij"), -1).reshape(-1, 3)[:natoms]
            pos = (grid + rng.uniform(-0.15, 0.15, size=(natoms, 3))) * 2.0
            atoms = Atoms(symbols=list(rng.choice(CRYSTAL_ELEMENTS, size=natoms)), positions=pos,
                          cell=np.eye(3) * 2.0 * side, pbc=True)
            stress = rng.normal(scale=0.01, size=6)
            energy = -5.0 * natoms + rng.normal()
            atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=rng.normal(scale=0.5, size=(natoms, 3)),
                                               stress=stress)
            db.write(atoms, corrected_total_energy=energy - 0.1, mp_id=f"mp-{k % 100000}")
            atoms_total += natoms
    return {"structures": n, "atoms": atoms_total, "bytes": path.stat().st_size}


#: the reader options of the synthetic extxyz (MACE's key names)
EXTXYZ_OPTIONS = {"energy_key": "REF_energy", "forces_key": "REF_forces", "stress_key": "REF_stress"}
