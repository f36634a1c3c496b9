"""Checks of the structures ``torchmdx md`` reads, before anything is written: constraints the native
engine does not apply, cells against the model's cutoff, positions the run's dtype cannot hold, elements the
model does not know, atoms at the same position, and (warnings) atoms closer than half their covalent radii.
Each refusal is one line naming the file and frame (``sources``). Moved out of :mod:`torchmdx.md.run` (round 19).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from torchmdx.errors import ConfigError, DataError
from torchmdx.md.config import MDConfig


def check_constraints(structures, sources: list,
                      advice: str = "run it with --engine ase, or remove the constraints from the file") -> None:
    """The native engine applies no ASE constraints: a structure read with one (extxyz ``move_mask``,
    a .traj's FixAtoms) moved the atoms it holds while the trajectory, written through ASE's
    ``set_positions``, showed them fixed. One line naming the file, the frame and the constraint
    (``torchmdx md``), or the structure (``Simulation``, which gives its own ``advice``)."""
    for atoms, where in zip(structures, sources):
        if atoms.constraints:
            names = ", ".join(type(c).__name__ for c in atoms.constraints)
            raise ConfigError(f"{where}: holds constraints ({names}) that the native engine does not apply; {advice}")


def check_cells(potential, structures, sources: list) -> None:
    """Each periodic structure's cell against the model's cutoff, naming the file and frame (the
    engine's neighbor list named "structure 0" of the batch)."""
    import torch

    from torchmdx.kernels.cell_geometry import cell_geometry, describe_problem, first_bad_structure
    from torchmdx.nn.attention_potential import periodic_structure_line

    line = periodic_structure_line(potential, [np.asarray(a.pbc, dtype=bool) for a in structures],
                                   lambda index: sources[index])
    if line:
        raise DataError(line)
    for atoms, where in zip(structures, sources):
        pbc = np.asarray(atoms.pbc, dtype=bool)
        if not pbc.any():
            continue
        cell = torch.as_tensor(np.asarray(atoms.cell.array, dtype=np.float64)).unsqueeze(0)
        flags = torch.as_tensor(pbc).unsqueeze(0)
        value = int(first_bad_structure(cell_geometry(cell, flags), float(potential.cutoff)))
        if value >= 0:
            raise DataError(describe_problem(value, cell, flags, float(potential.cutoff), label=where))


def check_float32_reach(structures, sources: list, config: MDConfig) -> None:
    """The native engine keeps positions in the run's dtype (:func:`torchmdx.md.system.float32_reach_problem`):
    one line naming the file, frame and atom. A finite position beyond the run dtype's range (1e200 Å in
    float32) is refused by either engine (it was "non-finite [inf, ...]", or "positions are nan Å apart")."""
    from torchmdx.md.loading import as_dtype
    from torchmdx.md.system import float32_reach_problem
    from torchmdx.nn.atoms import beyond_dtype

    dtype = as_dtype(config.dtype)
    for atoms, where in zip(structures, sources):
        line = beyond_dtype(atoms.get_positions(), dtype, atoms.numbers, advice=False)
        if line:
            raise ConfigError(f"{where}: {line}; check the structure, or run with {config.option('dtype')} float64")
    from torchmdx.data.coincident import far_atom_line

    for atoms, where in zip(structures, sources):  # beyond float64's reach too: "or run with float64" would not do
        line = far_atom_line(atoms.get_positions())
        if line:
            raise DataError(f"{where}: {line}")
    if config.engine == "ase" or config.dtype != "float32":
        return
    for atoms, where in zip(structures, sources):
        problem = float32_reach_problem(atoms, config.wrap)
        if problem:
            raise ConfigError(f"{where}: {problem}; translate the structure near the origin, or run with "
                              f"{config.option('dtype')} float64 (or --engine ase, which takes positions relative to "
                              "the atoms)")


def check_elements(potential, structures, sources: list) -> None:
    """Each structure's atoms against the elements ``potential`` knows: a one-line ModelError
    naming the file, the frame and the atom within it (the batch's atom number was named, e.g.
    "atom 17" of a file of 9-atom frames)."""
    from torchmdx.errors import ModelError
    from torchmdx.md.loading import check_atoms_elements

    for atoms, where in zip(structures, sources):
        try:
            check_atoms_elements(potential, atoms)
        except ModelError as exc:
            raise ModelError(f"{where}: {exc}") from None


def check_coincident(structures, sources: list) -> None:
    """Two atoms of a structure at the same position, refused before anything is written, in the data readers'
    words, naming the file and frame: was a close-contact warning and then, with an analytic model, "forces are
    not finite at step 1" after the outputs were begun, or the model's "atoms 1 and 2 are on top of each other",
    naming no file (round 23)."""
    from torchmdx.data.coincident import atoms_coincidence

    for atoms, where in zip(structures, sources):
        line = atoms_coincidence(atoms)
        if line:
            raise DataError(f"{where}: {line}")


def charge_warnings(potential, structures, sources: list) -> list[str]:
    """Warnings for structures that carry a net charge (``atoms.info['charge']``, else the sum of ASE's initial
    charges) when the potential takes none (``Potential.takes_charge``, False for every architecture today): the
    run treats them as if they were neutral, and said nothing (round 25's leftover). One line per structure."""
    if getattr(potential, "takes_charge", False):
        return []
    lines = []
    for atoms, where in zip(structures, sources):
        charge = atoms.info.get("charge")
        origin = "atoms.info['charge']"
        if charge is None:
            initial = atoms.get_initial_charges()
            charge, origin = (float(initial.sum()), "its initial charges sum to") if np.any(initial) else (0, "")
        try:
            value = float(charge)
        except (TypeError, ValueError):
            value = float("nan")
        if value != 0:
            shown = f"{value:g}" if np.isfinite(value) else repr(charge)
            separator = " " if origin.endswith("to") else " is "
            lines.append(f"{where}: {origin}{separator}{shown}, but the model takes no charge: the run treats the "
                         "structure as if it were neutral")
    return lines


def _pairs_within(atoms, cutoff: float):
    """(i, j, d) of the atom pairs i < j closer than ``cutoff`` (Å), minimum image, sorted by (i, j): the
    project's own neighbor list (:mod:`torchmdx.kernels.neighbors`, float64 on the CPU; a cell list above a few
    hundred atoms). ASE's ``neighbor_list`` gave the same pairs in 10 ms for 22 atoms, 26 ms for 166 and 7.3 s for
    2 489 (DHFR), against 0.6, 1.5 and 18 ms here, and the Calculator runs this at every new structure. ASE's
    list stays for the cells the project's refuses (a cutoff beyond half a periodic width: every image)."""
    import torch

    from torchmdx.errors import TorchmdxError
    from torchmdx.kernels.neighbors import neighbor_list

    try:
        periodic = bool(np.any(atoms.pbc))
        nl = neighbor_list(torch.as_tensor(atoms.positions, dtype=torch.float64), cutoff,
                           cell=torch.as_tensor(atoms.cell.array, dtype=torch.float64) if periodic else None,
                           pbc=torch.as_tensor(atoms.pbc) if periodic else None, full=False, backend="torch")
        i, j = nl.edge_index.numpy()
        d = nl.distances.numpy()
    except TorchmdxError:
        from ase.neighborlist import neighbor_list as ase_neighbor_list

        i, j, d = ase_neighbor_list("ijd", atoms, cutoff, self_interaction=False)
    keep = i < j
    i, j, d = i[keep], j[keep], d[keep]
    order = np.lexsort((j, i))  # the named pair of equal ratios: the first in (i, j) order, whichever list
    return i[order], j[order], d[order]


def close_contacts(structures, factor: float = 0.5, sources: Optional[list] = None) -> list[str]:
    """Warnings for atoms closer than ``factor`` × the sum of their covalent radii (ASE's table;
    0.31 Å for H-H, 0.38 Å for C-H, 0.38 Å for C-C at 0.5; bonds are 2x that or more): such
    geometries are outside anything a model was trained on. One line per structure, the closest
    pair named (of equal ratios d / limit, the first in (i, j) order), minimum image for periodic cells;
    ``sources`` (md: the file and frame of each structure read, before ``--replicas`` copies it) name the
    structures, else "structure b"."""
    from ase.data import chemical_symbols, covalent_radii

    lines = []
    for b, atoms in enumerate(structures):
        if len(atoms) < 2:
            continue
        # atoms with non-finite positions (refused elsewhere) or beyond 1e15 Å (far from any contact; ASE's
        # binning overflowed, with RuntimeWarnings) are left out; the others' contacts are still reported (the
        # whole structure was skipped before round 20)
        inside = np.isfinite(atoms.positions).all(axis=1) & (np.abs(np.nan_to_num(atoms.positions)).max(axis=1) <= 1e15)
        index = np.flatnonzero(inside)
        if len(index) < 2:
            continue
        near = atoms if len(index) == len(atoms) else atoms[index]
        radii = covalent_radii[near.numbers]
        i, j, d = _pairs_within(near, float(2 * factor * radii.max()))
        limit = factor * (radii[i] + radii[j])
        close = d < limit
        if not close.any():
            continue
        k = int(np.argmin(np.where(close, d / limit, np.inf)))
        a, c = int(index[i[k]]), int(index[j[k]])  # numbered in the whole structure
        more = int(close.sum()) - 1
        pair = f"{chemical_symbols[atoms.numbers[a]]}-{chemical_symbols[atoms.numbers[c]]}"
        which = f"{sources[b]}: atoms {a} and {c}" if sources else f"atoms {a} and {c} of structure {b}"
        lines.append(
            f"{which} ({pair}) are {d[k]:.3g} Å apart, closer than {limit[k]:.2f} Å "
            f"(half the sum of their covalent radii)" + (f", and {more} more pair(s)" if more else "")
            + ": no model was trained on that; check the structure"
        )
    return lines


#: a time step below this (fs) is taken for one given in ps (0.001 ps = 1 fs) and said once
SHORT_STEP_FS = 0.05
#: a Langevin friction below this (1/ps) whose coupling time outlasts the run is taken for one given in 1/fs
WEAK_FRICTION_PER_PS = 0.1


def time_unit_warnings(config: MDConfig, start_step: int = 0) -> list:
    """Lines for a time step or a friction whose size looks like a unit mistake (round 28): ``--dt 0.001`` (1 fs
    written in ps) ran a thousand times too many steps for its time, and ``--friction 0.01`` (0.01 1/fs, as ASE
    scripts write ``0.01 / units.fs``, read in 1/ps: a 100 ps coupling) a run close to NVE, both without a word.
    Warnings, not refusals: a short step or a weak coupling may be meant."""
    lines = []
    steps = max(int(config.steps) - int(start_step), 0)
    run_ps = steps * float(config.dt) * 1e-3
    if 0 < config.dt < SHORT_STEP_FS:
        lines.append(f"{config.option('dt')} {config.dt:g} fs is far shorter than molecular dynamics steps (typical: "
                     f"0.5-2 fs), so the {steps} steps cover {steps * config.dt:g} fs; the time step is in fs "
                     f"(1 fs is {config.option('dt')} 1, not 0.001 as in ps)")
    if (config.ensemble == "langevin" and 0 < config.friction < WEAK_FRICTION_PER_PS
            and 1.0 / config.friction > run_ps):
        lines.append(f"{config.option('friction')} {config.friction:g} 1/ps couples the Langevin thermostat over "
                     f"{1.0 / config.friction:g} ps, longer than the run ({run_ps:g} ps): the temperature is hardly "
                     f"held (the run is close to NVE); the friction is in 1/ps (typical: 1-10; 0.01 1/fs is "
                     f"{config.option('friction')} 10)")
    return lines
