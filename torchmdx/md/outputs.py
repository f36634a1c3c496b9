"""Where ``torchmdx md`` writes, checked before anything is read from the model or written.

A new run refuses to write over the trajectory, thermo log or restart file of an earlier run
unless ``force``. A run continued from a restart file appends to the outputs; when they hold
frames, log rows or a restart file after the restart file's step (an older restart file, or a
run killed after its last restart file), or end in a half-written frame, it refuses and names
the last step on disk, unless ``truncate`` (drop them) or another ``out`` (new files). No
output may be an input (structure, model, the restart file read: except the restart file the
run itself continues), a folder, or in a folder that cannot be written.

Every refusal is one ConfigError/DataError line; nothing is changed until :meth:`OutputPlan.apply`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from torchmdx.errors import ConfigError, DataError
from torchmdx.md.config import MDConfig
from torchmdx.md.io import (
    STEP_FORMATS, OnDisk, load_restart, scan_thermo, scan_trajectory, structure_paths, trajectory_format,
    truncate_after,
)


@dataclass
class OutputPlan:
    """The files a run writes, and what ``--truncate`` drops before it starts."""

    trajectories: list
    log: Path
    restart: Path
    summary: Path
    plot: Path
    truncate: list = field(default_factory=list)  # OnDisk scans to cut after ``step``
    step: Optional[int] = None
    on_disk: dict = field(default_factory=dict)  # path -> last complete step in it (restart runs)

    def last_step(self, paths) -> Optional[int]:
        """The last step every one of ``paths`` holds once :meth:`apply` ran (None: some holds
        nothing, or this is a new run)."""
        steps = [self.on_disk.get(Path(p)) for p in paths]
        if not steps or None in steps:
            return None
        return min(min(steps), self.step)

    def apply(self, out) -> None:
        """Drop what ``--truncate`` drops (each file rewritten to a temporary name and renamed),
        saying what went."""
        notes = []
        for scan in self.truncate:
            dropped = truncate_after(scan, self.step)
            what = f"{dropped} {scan.kind} after step {self.step}" if dropped else ""
            if scan.partial:
                what += (" and " if what else "") + f"a half-written {'frame' if scan.kind == 'frames' else 'row'}"
            if what:
                notes.append(f"{what} from {scan.path}")
        if notes:
            print("--truncate: dropped " + "; ".join(notes), file=out)


def _same(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    # os.path.realpath, not Path.resolve: a symbolic-link loop made resolve raise RuntimeError (a traceback)
    return os.path.realpath(a) == os.path.realpath(b)


#: the md config key of each output kind
_KEYS = {"trajectory": "out", "thermo log": "log", "thermo plot": "log", "restart file": "restart_out",
         "summary": "summary"}

#: outputs written to a temporary name and renamed onto their path
RENAMED_OUTPUTS = ("restart file", "summary", "thermo plot")


def _check_writable(path: Path, option: str, kind: str = "") -> None:
    if path.is_dir():
        raise ConfigError(f"{option} {path} is a folder, not a file name")
    if kind in RENAMED_OUTPUTS and path.exists() and not path.is_file():
        # a device, FIFO or socket (/dev/null, /dev/full): the write-then-rename would replace the
        # device node itself with a regular file (as root: /dev/null is gone)
        raise ConfigError(f"{option} {path}: the {kind} would replace a device, pipe or socket (it is written to a "
                          "temporary file, then renamed); give a regular file name")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{option} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {path}: cannot write in {parent} (permission denied)")


#: file extensions that name a format other tools (ASE, torchmdx, a spreadsheet) read by its name
_FORMATS = {".extxyz": "an extended-XYZ trajectory", ".xyz": "an XYZ trajectory", ".traj": "an ASE trajectory",
            ".pdb": "a PDB structure", ".cif": "a CIF structure", ".csv": "a CSV table", ".json": "JSON",
            ".yaml": "YAML", ".yml": "YAML", ".npz": "a numpy archive", ".h5": "HDF5", ".hdf5": "HDF5",
            ".png": "an image", ".pt": "a torch file", ".pth": "a torch file", ".ckpt": "a torch file"}
#: output kind -> (what it holds, the extensions that fit it, an example name)
_CONTENT = {"thermo log": ("a CSV table", (".csv",), "md.csv"),
            "restart file": ("a torch file", (".pt", ".pth", ".ckpt"), "md.restart.pt"),
            "summary": ("JSON", (".json", ".yaml", ".yml"), "md.summary.json")}  # JSON is YAML too


def _check_extension(path: Path, opt: str, kind: str) -> None:
    """An output named with an extension of another format (``--restart-out r.extxyz`` wrote a torch
    file there, ``--summary s.csv`` JSON; ASE, a spreadsheet or ``torchmdx md`` then misread it):
    refused, naming both formats. Extensions of no known format (.txt, .log, none) are taken."""
    suffix = path.suffix.lower()
    content, fitting, example = _CONTENT[kind]
    if suffix in _FORMATS and suffix not in fitting:
        raise ConfigError(f"{opt} {path}: {suffix} names {_FORMATS[suffix]}, and the {kind} is {content}; give it "
                          f"a {fitting[0]} name, e.g. {example}")


def plan_outputs(config: MDConfig, num_structures: int, restart_payload: Optional[dict] = None,
                 model_path=None) -> OutputPlan:
    """Check the outputs of ``config`` for ``num_structures`` structures (see the module
    docstring); raise one line, or return the plan. ``restart_payload``: the restart file read."""
    out_option = config.option("out")
    trajectory_format(config.out, out_option)
    log, restart, summary = config.log_path, config.restart_path, config.summary_path
    plan = OutputPlan(structure_paths(config.out, num_structures), log, restart, summary, log.with_suffix(".png"))

    def option(key: str) -> str:  # a derived path is changed through --out
        return config.option(key) if getattr(config, key) else out_option

    # outputs named after another option: the log, restart file and summary after --out when their own
    # options are not given, the plot always after the log
    derived = {"thermo plot"} | {kind for key, kind in (("log", "thermo log"), ("restart_out", "restart file"),
                                                       ("summary", "summary")) if not getattr(config, key)}

    def named(kind: str, opt: str) -> str:
        if kind not in derived:
            return opt
        return f"named after {opt}" + (f"; {config.option(_KEYS[kind])} sets it" if opt == out_option else "")

    outputs = [(p, out_option, "trajectory") for p in plan.trajectories] + [
        (log, option("log"), "thermo log"), (restart, option("restart_out"), "restart file"),
        (summary, option("summary"), "summary"), (plan.plot, option("log"), "thermo plot"),
    ]
    inputs = [(Path(p), "structure file") for p in config.structure]
    if model_path is not None:
        inputs.append((Path(model_path), "model file"))
    restart_in = Path(config.restart) if config.restart else None
    for k, (path, opt, kind) in enumerate(outputs):
        _check_writable(path, opt, kind)
        for other, other_opt, other_kind in outputs[:k]:
            if _same(path, other):
                # advise the option given rather than --out, which names both when one is derived from it
                advise = other_opt if kind in derived and other_kind not in derived else opt
                raise ConfigError(f"the {other_kind} ({named(other_kind, other_opt)}) and the {kind} "
                                  f"({named(kind, opt)}) would both be {path}: choose another {advise}")
        for source, what in inputs + ([(restart_in, "restart file")] if restart_in and kind != "restart file" else []):
            if _same(path, source):
                raise ConfigError(f"{opt} {path} would write the {kind} over the input {what} {source}: "
                                  f"choose another {opt}")
    for path, opt, kind in outputs:  # after the collisions: "both would be o/t.csv" says more
        if kind in _CONTENT and kind not in derived:
            _check_extension(path, opt, kind)

    kept = [(p, opt, kind) for p, opt, kind in outputs[:len(plan.trajectories) + 2]]  # trajectories, log, restart
    existing = [(p, opt, kind) for p, opt, kind in kept if p.is_file() and p.stat().st_size > 0]
    if restart_payload is None:
        if existing and not config.force:
            path, opt, kind = existing[0]
            more = f"; to continue that run: --restart {restart}" if restart.is_file() else ""
            raise ConfigError(f"{path} exists (the {kind} of an earlier run): pass --force to write over it, "
                              f"or choose another {opt}{more}")
        return plan

    step = int(restart_payload["step"])
    plan.step = step
    problems, partial = [], []
    for path, opt, kind in existing:
        if kind == "restart file":
            if restart_in is not None and _same(path, restart_in):
                continue
            try:
                theirs = int(load_restart(path)["step"])
            except DataError:
                partial.append(f"{path} exists and is not a restart file")
                continue
            if theirs > step:
                problems.append(f"the restart file {path} is at step {theirs}")
            continue
        if kind == "trajectory" and trajectory_format(path) not in STEP_FORMATS:
            raise ConfigError(
                f"{path}: a {path.suffix} trajectory keeps no step numbers, so frames after the restart file's "
                f"step {step} cannot be told apart: continue into new files with another {opt} (or use .extxyz/.traj)"
            )
        try:
            scan: OnDisk = scan_trajectory(path) if kind == "trajectory" else scan_thermo(path)
        except DataError as exc:
            raise DataError(f"{exc}; continue into new files with another {opt}") from None
        plan.on_disk[path] = scan.last_step
        if kind == "trajectory" and None in scan.steps:
            raise DataError(f"{path}: frame {scan.steps.index(None)} has no step number: not a trajectory of "
                            f"torchmdx md; continue into new files with another {opt}")
        after = scan.after(step)
        if after or scan.partial:
            plan.truncate.append(scan)
            if after:
                problems.append(f"{path} holds {scan.kind} up to step {scan.last_step}")
            else:
                unit = "frame" if scan.kind == "frames" else "row"
                last = f" after step {scan.last_step}" if scan.last_step is not None else ""
                partial.append(f"{path} ends in a half-written {unit}{last} (a killed run?)")
    if problems and not config.truncate:
        raise ConfigError(
            f"{problems[0]}, past step {step} of the restart file {config.restart}: continuing would delete what "
            f"comes after step {step}; pass --truncate to drop it, or continue into new files with another {out_option}"
        )
    if partial and not config.truncate:
        raise ConfigError(f"{partial[0]}: pass --truncate to drop it, or continue into new files with another "
                          f"{out_option}")
    return plan


__all__ = ["OutputPlan", "plan_outputs"]
