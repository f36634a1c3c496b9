"""MD output: trajectories (ASE writers), the thermo CSV log, restart files.

- Trajectories are written with ASE: ``.traj`` through ``ase.io.Trajectory``, anything else
  (``.extxyz``, ``.xyz``) as extended XYZ with energy, forces, velocities and ``step`` /
  ``time_ps`` in each frame's info. With several structures in the batch, structure k goes to
  ``<stem>.<k><suffix>``. Frames are appended and flushed as they come.
- The thermo log is a CSV with the columns of :data:`THERMO_COLUMNS` (``structure`` only when
  several structures run together; ``pressure_bar``, ``volume_A3`` and ``density_g_cm3`` only
  for periodic ones).
- Restart files (``torch.save`` of a dict) are written to a temporary name and renamed.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Optional

import numpy as np

from torchmdx.errors import DataError
from torchmdx.io_utils import atomic_write

THERMO_COLUMNS = (
    "step", "time_ps", "structure", "potential_eV", "kinetic_eV", "total_eV",
    "temperature_K", "pressure_bar", "volume_A3", "density_g_cm3", "conserved_eV",
)
#: columns written for periodic structures only
PERIODIC_COLUMNS = ("pressure_bar", "volume_A3", "density_g_cm3")
RESTART_FORMAT = "torchmdx.md.restart"
RESTART_VERSION = 1


def structure_paths(path: str | os.PathLike, num_structures: int) -> list[Path]:
    """``path`` for one structure, ``<stem>.<k><suffix>`` for several."""
    path = Path(path)
    if num_structures == 1:
        return [path]
    return [path.with_name(f"{path.stem}.{k}{path.suffix}") for k in range(num_structures)]


def make_frame(template, positions, velocities=None, energy=None, forces=None, stress=None, info=None, wrap=True):
    """An ``ase.Atoms`` frame with a SinglePointCalculator holding energy/forces/stress."""
    from ase.calculators.singlepoint import SinglePointCalculator

    atoms = template.copy()
    atoms.calc = None
    atoms.set_positions(np.asarray(positions, dtype=float))
    if velocities is not None:
        atoms.set_velocities(np.asarray(velocities, dtype=float))
    if wrap and atoms.pbc.any():
        atoms.wrap()
    atoms.info = {k: v for k, v in atoms.info.items() if k not in ("energy", "free_energy", "stress")}
    if info:
        atoms.info.update(info)
    results = {}
    if energy is not None:
        results["energy"] = float(energy)
        results["free_energy"] = float(energy)
    if forces is not None:
        results["forces"] = np.asarray(forces, dtype=float)
    if stress is not None:
        results["stress"] = np.asarray(stress, dtype=float)
    if results:
        atoms.calc = SinglePointCalculator(atoms, **results)
    return atoms


class TrajectoryWriter:
    """Append frames of each structure to its trajectory file (extxyz or ASE .traj)."""

    def __init__(self, path: str | os.PathLike, num_structures: int, append: bool = False):
        self.paths = structure_paths(path, num_structures)
        self.is_traj = Path(path).suffix == ".traj"
        self._handles = []
        for p in self.paths:
            p.parent.mkdir(parents=True, exist_ok=True)
            mode = "a" if append and p.exists() else "w"
            if self.is_traj:
                from ase.io import Trajectory

                self._handles.append(Trajectory(str(p), mode))
            else:
                self._handles.append(open(p, mode))

    def write(self, index: int, atoms) -> None:
        handle = self._handles[index]
        if self.is_traj:
            handle.write(atoms)
        else:
            from ase.io import write

            write(handle, atoms, format="extxyz")
            handle.flush()

    def close(self) -> None:
        for h in self._handles:
            h.close()
        self._handles = []


class ThermoLog:
    """The thermo CSV: one row per structure per output step."""

    def __init__(self, path: str | os.PathLike, multi: bool, periodic: bool, append: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.columns = [
            c for c in THERMO_COLUMNS
            if (c != "structure" or multi) and (c not in PERIODIC_COLUMNS or periodic)
        ]
        exists = append and self.path.exists() and self.path.stat().st_size > 0
        self._file = open(self.path, "a" if exists else "w", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=self.columns, extrasaction="ignore")
        if not exists:
            self._writer.writeheader()
            self._file.flush()

    def write(self, rows: list[dict]) -> None:
        for row in rows:
            self._writer.writerow({k: _fmt(row.get(k, "")) for k in self.columns})
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _fmt(value):
    if isinstance(value, float):
        return repr(value) if np.isfinite(value) else str(value)
    return value


def read_thermo(path: str | os.PathLike) -> list[dict]:
    """Rows of a thermo CSV as dicts of floats (step and structure as int)."""
    with open(path, newline="") as f:
        rows = []
        for row in csv.DictReader(f):
            rows.append({k: (int(v) if k in ("step", "structure") else float(v)) for k, v in row.items() if v != ""})
        return rows


def truncate_outputs(trajectory_paths: list[Path], log_path: Optional[Path], last_step: int) -> None:
    """Drop frames and log rows after ``last_step`` (a run continued from a restart written at
    that step must not repeat what a crashed run wrote after it). Files are rewritten atomically."""
    if log_path is not None and Path(log_path).exists():
        with open(log_path, newline="") as f:
            lines = f.read().splitlines(keepends=True)
        if lines:
            header, body = lines[0], lines[1:]
            kept = [line for line in body if line.strip() and int(line.split(",", 1)[0]) <= last_step]
            if len(kept) != len(body):
                with atomic_write(log_path, "w") as f:
                    f.write(header)
                    f.writelines(kept)
    for path in trajectory_paths:
        path = Path(path)
        if not path.exists() or path.stat().st_size == 0:
            continue
        from ase.io import read, write

        frames = read(str(path), index=":")
        kept = [a for a in frames if int(a.info.get("step", -1)) <= last_step]
        if len(kept) == len(frames):
            continue
        if path.suffix == ".traj":
            from ase.io import Trajectory

            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            with Trajectory(str(tmp), "w") as t:
                for a in kept:
                    t.write(a)
            os.replace(tmp, path)
        else:
            with atomic_write(path, "w") as f:
                for a in kept:
                    write(f, a, format="extxyz")


def atoms_to_plain(atoms) -> dict:
    """An ``ase.Atoms`` as tensors and strings only (restart files load with weights_only=True)."""
    import torch

    return {
        "numbers": torch.as_tensor(atoms.numbers, dtype=torch.long),
        "positions": torch.as_tensor(atoms.get_positions(), dtype=torch.float64),
        "cell": torch.as_tensor(atoms.cell.array, dtype=torch.float64),
        "pbc": torch.as_tensor(atoms.pbc, dtype=torch.bool),
        "masses": torch.as_tensor(atoms.get_masses(), dtype=torch.float64),
    }


def atoms_from_plain(values: dict):
    from ase import Atoms

    return Atoms(
        numbers=values["numbers"].numpy(), positions=values["positions"].numpy(), cell=values["cell"].numpy(),
        pbc=values["pbc"].numpy(), masses=values["masses"].numpy(),
    )


def save_restart(path: str | os.PathLike, payload: dict) -> None:
    """``torch.save`` the restart dict to a temporary name, then rename it onto ``path``.
    ``payload["structures"]`` may hold ``ase.Atoms``; they are stored as plain tensors."""
    import torch

    payload = dict(payload, format=RESTART_FORMAT, version=RESTART_VERSION)
    if "structures" in payload:
        payload["structures"] = [atoms_to_plain(a) if not isinstance(a, dict) else a for a in payload["structures"]]
    with atomic_write(path, "wb") as f:
        torch.save(payload, f)


def load_restart(path: str | os.PathLike) -> dict:
    """Read a restart file; one-line errors for a missing or foreign file."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: restart file not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise DataError(f"{path}: not a readable restart file ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != RESTART_FORMAT:
        raise DataError(f"{path}: not a torchmdx MD restart file")
    if payload.get("version", 0) > RESTART_VERSION:
        raise DataError(f"{path}: restart file version {payload.get('version')} is newer than this torchmdx reads ({RESTART_VERSION})")
    payload["structures"] = [atoms_from_plain(a) for a in payload.get("structures", [])]
    return payload


__all__ = [
    "TrajectoryWriter", "ThermoLog", "make_frame", "read_thermo", "save_restart", "load_restart",
    "atoms_to_plain", "atoms_from_plain",
    "truncate_outputs", "structure_paths",
]
