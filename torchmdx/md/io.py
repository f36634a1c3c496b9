"""MD output: trajectories (ASE writers), the thermo CSV log, restart files.

- Trajectories are written with ASE: ``.traj`` through ``ase.io.Trajectory``, ``.extxyz`` and
  ``.xyz`` as extended XYZ with energy, forces, velocities and ``step`` / ``time_ps`` in each
  frame's info, ``.pdb`` and ``.cif`` through ASE's writers (positions and cell only, no step
  numbers); any other extension is refused (:func:`trajectory_format`). With several structures
  in the batch, structure k goes to ``<stem>.<k><suffix>``. Frames are appended and flushed as
  they come.
- What is on disk already (:func:`scan_trajectory`, :func:`scan_thermo`): the step of each
  complete frame or row and whether a half-written one follows (a killed run), read without
  parsing the frames; :func:`truncate_after` drops everything after a step.
- The thermo log is a CSV with the columns of :data:`THERMO_COLUMNS` (``structure`` only when
  several structures run together; ``pressure_bar``, ``volume_A3`` and ``density_g_cm3`` only
  for periodic ones).
- Restart files (``torch.save`` of a dict) are written to a temporary name and renamed.
"""

from __future__ import annotations

import csv
import mmap
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from contextlib import contextmanager

from torchmdx.errors import ConfigError, DataError, SimulationError


@contextmanager
def writing(path, what: str):
    """An operating-system error while writing an MD output (disk full, quota, a read-only or
    vanished folder) as one line naming the file, instead of a traceback from deep in a run."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise SimulationError(f"{path}: cannot write the {what} ({reason}); the run stopped here: free space or "
                              "choose another --out, then continue from the last restart file") from None


def _close_quietly(handle) -> None:
    """Close a file whose last write failed (its buffer would fail again on close)."""
    try:
        handle.close()
    except OSError:
        pass
from torchmdx.io_utils import atomic_write, temporary_path

THERMO_COLUMNS = (
    "step", "time_ps", "structure", "potential_eV", "kinetic_eV", "total_eV",
    "temperature_K", "pressure_bar", "volume_A3", "density_g_cm3", "conserved_eV",
)
#: columns written for periodic structures only
PERIODIC_COLUMNS = ("pressure_bar", "volume_A3", "density_g_cm3")
RESTART_FORMAT = "torchmdx.md.restart"
RESTART_VERSION = 1
#: what a refused restart file's message points to
RESTART_HINT = "pass the .restart.pt file that `torchmdx md` writes (--restart-out)"
#: trajectory extension -> ASE format. extxyz and traj keep each frame's step (and energy,
#: forces, velocities); pdb and cif (ASE's writers take them one frame per call and read them
#: back as a sequence) keep positions and the cell only
TRAJECTORY_FORMATS = {".extxyz": "extxyz", ".xyz": "extxyz", ".traj": "traj", ".pdb": "proteindatabank", ".cif": "cif"}
STEP_FORMATS = ("extxyz", "traj")


def trajectory_format(path: str | os.PathLike, option: str = "--out") -> str:
    """The ASE format of a trajectory file name, from its extension; a one-line ConfigError
    naming ``option`` for an extension that is not a trajectory format."""
    suffix = Path(path).suffix.lower()
    if suffix in TRAJECTORY_FORMATS:
        return TRAJECTORY_FORMATS[suffix]
    known = ", ".join(TRAJECTORY_FORMATS)
    if not suffix:
        raise ConfigError(f"{option} {path}: no file extension to tell the trajectory format; use one of {known}")
    try:
        from ase.io.formats import filetype, ioformats

        name = filetype(str(path), read=False)
        io = ioformats[name]
    except Exception:  # noqa: BLE001 - ASE raises KeyError/ValueError for names it does not know
        raise ConfigError(f"{option} {path}: unknown trajectory format '{suffix}'; use one of {known}") from None
    why = "holds one frame" if io.single else "cannot be written frame by frame"
    raise ConfigError(f"{option} {path}: ASE's {name} format {why}, not a trajectory; use one of {known}")


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
        self.format = trajectory_format(path)
        self.is_traj = self.format == "traj"
        self._handles = []
        binary = False
        if not self.is_traj and self.format != "extxyz":
            from ase.io.formats import ioformats

            binary = ioformats[self.format].isbinary
        for p in self.paths:
            with writing(p, "trajectory"):
                p.parent.mkdir(parents=True, exist_ok=True)
                mode = "a" if append and p.exists() else "w"
                if self.is_traj:
                    from ase.io import Trajectory

                    self._handles.append(Trajectory(str(p), mode))
                else:
                    self._handles.append(open(p, mode + ("b" if binary else "")))

    def write(self, index: int, atoms) -> None:
        handle = self._handles[index]
        with writing(self.paths[index], "trajectory"):
            if self.is_traj:
                handle.write(atoms)
            else:
                from ase.io import write

                write(handle, atoms, format=self.format)
                handle.flush()

    def close(self) -> None:
        for h in self._handles:
            _close_quietly(h)
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
        with writing(self.path, "thermo log"):
            self._file = open(self.path, "a" if exists else "w", newline="")
            self._writer = csv.DictWriter(self._file, fieldnames=self.columns, extrasaction="ignore")
            if not exists:
                self._writer.writeheader()
                self._file.flush()

    def write(self, rows: list[dict]) -> None:
        with writing(self.path, "thermo log"):
            for row in rows:
                self._writer.writerow({k: _fmt(row.get(k, "")) for k in self.columns})
            self._file.flush()

    def close(self) -> None:
        _close_quietly(self._file)


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


@dataclass
class OnDisk:
    """What a trajectory or thermo log holds: the step of each complete frame (row), where each
    starts (bytes; extended XYZ and CSV), and whether a half-written frame (row) follows them."""

    path: Path
    kind: str  # "frames" or "log rows"
    steps: list = field(default_factory=list)  # None for a frame without a step number
    offsets: list = field(default_factory=list)
    end: int = 0  # bytes of the complete frames (rows) and the header
    partial: bool = False

    @property
    def last_step(self) -> Optional[int]:
        known = [s for s in self.steps if s is not None]
        return max(known) if known else None

    def after(self, step: int) -> int:
        """How many complete frames (rows) come after ``step``."""
        return sum(1 for s in self.steps if s is not None and s > step)


_STEP = re.compile(rb"(?:^|\s)step=(-?\d+)(?:\s|$)")


def _newline_positions(buffer, block: int = 1 << 26):
    """Byte positions of every newline, a block at a time (vectorised: fast on large files)."""
    for start in range(0, len(buffer), block):
        count = min(block, len(buffer) - start)
        yield start + np.flatnonzero(np.frombuffer(buffer, dtype=np.uint8, count=count, offset=start) == 10)


def scan_extxyz(path: str | os.PathLike) -> OnDisk:
    """Frames of an (extended) XYZ file: atom count line, comment line with ``step=``, atom
    lines. Only the count and comment lines are parsed. A frame cut short by the end of the file
    is ``partial``; a count line that is not a number is a DataError (not an XYZ trajectory)."""
    path = Path(path)
    scan = OnDisk(path, "frames")
    size = path.stat().st_size
    if size == 0:
        return scan
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
        lines = np.zeros(0, dtype=np.int64)  # newline positions not yet consumed
        source = _newline_positions(buffer)

        def need(k: int) -> bool:
            nonlocal lines
            while len(lines) < k:
                more = next(source, None)
                if more is None:
                    return False
                lines = np.concatenate([lines, more])
            return True

        start = 0
        while start < size:
            if not need(1):
                rest = buffer[start:size]
                scan.partial = bool(rest.strip())  # a count line cut short, or trailing blanks
                break
            head = buffer[start:int(lines[0])].strip()
            if not head:  # blank line: allowed between frames and at the end
                start, lines = int(lines[0]) + 1, lines[1:]
                continue
            try:
                count = int(head)
            except ValueError:
                raise DataError(
                    f"{path}: byte {start} (frame {len(scan.steps)}) does not start an XYZ frame "
                    f"({head[:40].decode(errors='replace')!r}): not a trajectory written by torchmdx md"
                ) from None
            if count < 0 or not need(count + 2):
                scan.partial = True
                break
            match = _STEP.search(buffer[int(lines[0]) + 1:int(lines[1])])
            scan.steps.append(int(match.group(1)) if match else None)
            scan.offsets.append(start)
            start = int(lines[count + 1]) + 1
            lines = lines[count + 2:]
            scan.end = start
    return scan


def scan_traj(path: str | os.PathLike) -> OnDisk:
    """Frames of an ASE ``.traj`` file (its header counts the complete frames: a killed writer
    leaves no partial frame in the count)."""
    from ase.io import Trajectory

    path = Path(path)
    scan = OnDisk(path, "frames")
    if path.stat().st_size == 0:
        return scan
    try:
        with Trajectory(str(path), "r") as traj:
            for k in range(len(traj)):
                step = traj[k].info.get("step")
                scan.steps.append(int(step) if step is not None else None)
    except Exception as exc:  # noqa: BLE001 - a damaged file is the same user error
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: not a readable ASE trajectory ({first})") from None
    return scan


def scan_trajectory(path: str | os.PathLike) -> OnDisk:
    fmt = trajectory_format(path)
    if fmt == "traj":
        return scan_traj(path)
    if fmt == "extxyz":
        return scan_extxyz(path)
    raise DataError(f"{path}: the {fmt} format keeps no step numbers")


def scan_thermo(path: str | os.PathLike) -> OnDisk:
    """Rows of a thermo CSV: the first field is the step. A last line without its newline or
    with too few fields is ``partial``; an unreadable row before it is a DataError."""
    path = Path(path)
    scan = OnDisk(path, "log rows")
    data = path.read_bytes()
    if not data:
        return scan
    lines = data.split(b"\n")
    columns = len(lines[0].split(b","))
    if len(lines) == 1:  # the header itself is cut short
        scan.partial = True
        return scan
    position = len(lines[0]) + 1
    scan.end = position
    for k, line in enumerate(lines[1:], start=1):
        last = k == len(lines) - 1
        if last and not line:
            break  # the file ends with a newline
        fields = line.rstrip(b"\r").split(b",")
        try:
            step = int(fields[0])
            ok = len(fields) == columns
        except ValueError:
            ok = False
        if not ok or last:  # a row without its newline is half-written too
            if last:
                scan.partial = True
                break
            raise DataError(f"{path}: line {k + 1} is not a thermo row ({line[:40].decode(errors='replace')!r})")
        scan.steps.append(step)
        scan.offsets.append(position)
        position += len(line) + 1
        scan.end = position
    return scan


def truncate_after(scan: OnDisk, step: int) -> int:
    """Drop the frames (rows) after ``step`` and a half-written one; the file is rewritten to a
    temporary name and renamed. Returns how many complete frames (rows) were dropped."""
    keep = [k for k, s in enumerate(scan.steps) if s is not None and s <= step]
    dropped = len(scan.steps) - len(keep)
    if not dropped and not scan.partial:
        return 0
    path = scan.path
    if scan.offsets:  # extended XYZ / CSV: copy the bytes of the kept frames (rows)
        header = scan.offsets[0] if scan.kind == "log rows" else 0
        with open(path, "rb") as src, atomic_write(path, "wb") as dst:
            dst.write(src.read(header))
            for k in keep:
                src.seek(scan.offsets[k])
                stop = scan.offsets[k + 1] if k + 1 < len(scan.offsets) else scan.end
                dst.write(src.read(stop - scan.offsets[k]))
    elif scan.kind == "log rows" or trajectory_format(path) != "traj":
        with open(path, "rb") as src, atomic_write(path, "wb") as dst:
            dst.write(src.read(scan.end))
    else:
        from ase.io import Trajectory

        tmp = temporary_path(path)
        try:
            with Trajectory(str(path), "r") as old, Trajectory(str(tmp), "w") as new:
                for k in keep:
                    new.write(old[k])
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
    return dropped


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


def time_origin_ps(payload: Optional[dict], timestep_fs: float) -> float:
    """The time (ps) a run continued from ``payload`` gives step 0, so that ``origin + step * timestep_fs``
    continues the restart file's own time: a restart with another ``--dt`` (0.5 fs, then 2 fs) logged
    step 10 at 10 x 2 fs = 0.02 ps after step 8 at 0.004 ps (round 20). The file's ``time_ps`` (written since
    round 20), else its step times its ``timestep_fs`` (one time step so far); no payload: 0."""
    import math

    if payload is None:
        return 0.0
    step = int(payload["step"])
    then = payload.get("time_ps")
    if not isinstance(then, (int, float)) or isinstance(then, bool) or not math.isfinite(then):
        dt = payload.get("timestep_fs")
        ok = isinstance(dt, (int, float)) and not isinstance(dt, bool) and math.isfinite(dt) and dt > 0
        then = step * (float(dt) if ok else timestep_fs) * 1e-3
    return float(then) - step * timestep_fs * 1e-3


def save_restart(path: str | os.PathLike, payload: dict) -> None:
    """``torch.save`` the restart dict to a temporary name, then rename it onto ``path``.
    ``payload["structures"]`` may hold ``ase.Atoms``; they are stored as plain tensors."""
    import torch

    payload = dict(payload, format=RESTART_FORMAT, version=RESTART_VERSION)
    if "structures" in payload:
        payload["structures"] = [atoms_to_plain(a) if not isinstance(a, dict) else a for a in payload["structures"]]
    with writing(path, "restart file"), atomic_write(path, "wb") as f:
        torch.save(payload, f)


def load_restart(path: str | os.PathLike) -> dict:
    """Read a restart file; one-line errors for a missing or foreign file."""
    import torch

    path = Path(path)
    if not path.is_file():
        from torchmdx.io_utils import missing_file_reason

        raise DataError(f"{path}: {missing_file_reason(path, 'restart file')}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        from torchmdx.nn.model_file import _what_file_is_this

        # was torch's own message: for a YAML config, its advice to load with weights_only=False
        raise DataError(f"{path}: {_what_file_is_this(path, exc, 'MD restart file', RESTART_HINT)}") from None
    from torchmdx.nn.model_file import damaged_archive_member

    damaged = damaged_archive_member(path)  # torch.load reads overwritten bytes as silently wrong positions
    if damaged:
        raise DataError(f"{path}: the restart file is damaged: {damaged} (bytes changed after it was written)")
    if not isinstance(payload, dict) or payload.get("format") != RESTART_FORMAT:
        raise DataError(f"{path}: not a torchmdx MD restart file")
    if payload.get("version", 0) > RESTART_VERSION:
        raise DataError(f"{path}: restart file version {payload.get('version')} is newer than this torchmdx reads ({RESTART_VERSION})")
    import operator

    try:  # a hand-edited step was int()'s ValueError traceback, a negative one ran on silently
        step = operator.index(payload.get("step"))
    except TypeError:
        step = -1
    if step < 0:
        raise DataError(f"{path}: its step {payload.get('step')!r} is not a step number (a whole number >= 0): "
                        "the restart file was changed after torchmdx wrote it")
    payload["step"] = step
    structures = payload.get("structures")
    if not isinstance(structures, list) or not structures:
        raise DataError(f"{path}: holds no structures ({type(structures).__name__}): the restart file was changed "
                        "after torchmdx wrote it")
    _check_restart_atoms(path, payload)
    payload["structures"] = [atoms_from_plain(a) for a in structures]
    return payload


def _check_restart_atoms(path: Path, payload: dict) -> None:
    """The per-atom arrays of a restart file against its atom counts, and finite: a velocity array of
    5 rows for 24 atoms was a RuntimeError traceback, a NaN velocity ran two steps and was reported
    as an exploding simulation, an infinite position named no file."""
    import operator

    import torch

    edited = "the restart file was changed after torchmdx wrote it"
    counts = payload.get("counts")
    try:
        counts = [operator.index(c) for c in counts]
    except TypeError:
        counts = None
    if counts is None or any(c < 1 for c in counts) or len(counts) != len(payload["structures"]):
        raise DataError(f"{path}: its atom counts {payload.get('counts')!r} are not one whole number >= 1 per "
                        f"structure ({len(payload['structures'])}): {edited}")
    n = sum(counts)
    for key in ("z", "positions", "velocities", "forces"):
        value = payload.get(key)
        if value is None and key == "forces":
            continue  # the ASE engine's restart files hold no forces
        shape = (n,) if key == "z" else (n, 3)
        if not torch.is_tensor(value) or tuple(value.shape) != shape:
            got = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
            raise DataError(f"{path}: its '{key}' has shape {got}, expected {shape} for its {n} atoms: {edited}")
        if key != "z" and not bool(torch.isfinite(value).all()):
            atom = int(torch.nonzero(~torch.isfinite(value).all(dim=1))[0, 0])
            raise DataError(f"{path}: its '{key}' of atom {atom} is not finite ({value[atom].tolist()}): {edited}")


__all__ = [
    "TrajectoryWriter", "ThermoLog", "make_frame", "read_thermo", "save_restart", "load_restart",
    "atoms_to_plain", "atoms_from_plain",
    "structure_paths", "trajectory_format", "TRAJECTORY_FORMATS", "OnDisk", "scan_trajectory", "scan_extxyz",
    "scan_traj", "scan_thermo", "truncate_after",
]
