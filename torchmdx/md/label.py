"""Labelling structures with reference energies and forces: ``torchmdx label``.

    torchmdx label frames.extxyz [more.extxyz ...] --method gfn2-xtb -o labeled.extxyz

Methods:

- ``gfn2-xtb``, ``gfn1-xtb``, ``ipea1-xtb``: the semi-empirical tight-binding methods of the
  ``tblite`` package, through its ASE calculator (``tblite.ase.TBLite``); an optional extra:
  ``pip install 'torchmdx[label]'`` (or ``pip install tblite``). Charge and multiplicity from
  the options (or each frame's ``atoms.info['charge']`` / ``['multiplicity']``), the SCF
  accuracy, iteration limit and electronic temperature as tblite's.
- ``model:<file>``: a torchmdx model file (distillation of one model into another; tests).

Inputs: any file ASE reads, every frame; ``--skip`` drops the first frames of each file (MD
equilibration), ``--every`` keeps every k-th frame, ``--max-frames`` stops after that many.
So frames sampled by MD with a trained model (``torchmdx md start.xyz --model model.pt
--ensemble langevin --replicas 32 --every 50 --out frames.extxyz`` writes frames.0.extxyz ...
frames.31.extxyz) are labelled by ``torchmdx label frames.*.extxyz --skip 10 ...``.

Output: extended XYZ; each frame keeps its atoms, cell, pbc and info, with the method's
``energy`` (eV), ``forces`` (eV/Å) and, for periodic frames, ``stress`` (eV/Å³), plus
``label_method`` and ``label_index`` (its position among the inputs) in its info: exactly what
``data.format: ase`` reads for training.

Atomic and resumable: frames are appended (and flushed) to ``<out>.partial`` as they are done;
the finished file is renamed onto ``<out>`` at the end, so ``<out>`` is either absent or
complete. Running the same command again after an interruption keeps the partial file's
complete frames (checked against the inputs: same atoms, same positions) and labels the rest;
a half-written last frame is dropped. An existing ``<out>`` is not replaced without ``--force``.
A frame whose calculation fails stops the run with one line naming it (its predecessors stay
in the partial file), or with ``--skip-failed`` is left out and counted.
"""

from __future__ import annotations

import importlib
import io
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from torchmdx.errors import ConfigError, DataError, TorchmdxError

TBLITE_METHODS = {"gfn2-xtb": "GFN2-xTB", "gfn1-xtb": "GFN1-xTB", "ipea1-xtb": "IPEA1-xTB"}
INSTALL_HINT = "pip install 'torchmdx[label]' (or: pip install tblite)"
#: positions of a resumed partial file must match the inputs to this (Å; extxyz keeps ~1e-8)
POSITION_TOLERANCE = 1e-5


class LabelError(TorchmdxError):
    """A frame that cannot be labelled, or inputs/outputs that do not fit together."""


#: tblite's settings when an option is not given (None)
TBLITE_DEFAULTS = {"accuracy": 1.0, "max_iterations": 250, "electronic_temperature": 300.0}
#: the options that only the tblite methods use, and their flags
TBLITE_OPTIONS = {"charge": "--charge", "multiplicity": "--multiplicity", "accuracy": "--accuracy",
                  "max_iterations": "--max-iterations", "electronic_temperature": "--electronic-temperature"}


@dataclass
class LabelOptions:
    """None: tblite's default (``TBLITE_DEFAULTS``; charge 0 or ``atoms.info['charge']``)."""

    method: str = "gfn2-xtb"
    charge: Optional[float] = None
    multiplicity: Optional[int] = None
    accuracy: Optional[float] = None
    max_iterations: Optional[int] = None
    electronic_temperature: Optional[float] = None
    device: str = "cpu"
    extra: dict = field(default_factory=dict)

    def setting(self, name: str):
        value = getattr(self, name)
        return TBLITE_DEFAULTS[name] if value is None else value


def check_options(options: LabelOptions) -> None:
    """Types and ranges of the tblite options (one-line ConfigErrors), before tblite is imported
    or a file read: a NaN charge or a multiplicity of 0 would otherwise be found by tblite on the
    first frame, or (accuracy, temperature) not at all. The tblite options given with a
    ``model:`` method are refused (a model takes no charge: they would be ignored silently)."""
    import math
    import numbers

    def number(name, value, integer=False):
        flag = TBLITE_OPTIONS[name]
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigError(f"{flag} must be a number, got {value!r}")
        if not math.isfinite(float(value)):
            raise ConfigError(f"{flag} must be a finite number, got {value}")
        if integer and float(value) != int(value):
            raise ConfigError(f"{flag} must be a whole number, got {value} (an integer is expected)")
        return float(value)

    given = [name for name in TBLITE_OPTIONS if getattr(options, name) is not None]
    name = str(options.method).strip().lower()
    if given and name not in TBLITE_METHODS:
        flags = ", ".join(TBLITE_OPTIONS[k] for k in given)
        raise ConfigError(f"{flags} set{'s' if len(given) == 1 else ''} tblite's calculation: it does not apply to "
                          f"--method {options.method} (the model takes no charge, spin or SCF settings); leave it out")
    if options.charge is not None:
        number("charge", options.charge, integer=True)
    if options.multiplicity is not None and number("multiplicity", options.multiplicity, integer=True) < 1:
        raise ConfigError(f"--multiplicity must be >= 1 (2S + 1: 1 singlet, 2 doublet, ...), got {options.multiplicity}")
    if options.accuracy is not None and not number("accuracy", options.accuracy) > 0:
        raise ConfigError(f"--accuracy must be > 0 (tblite's SCF accuracy; smaller is tighter), got {options.accuracy}")
    if options.max_iterations is not None and number("max_iterations", options.max_iterations, integer=True) < 1:
        raise ConfigError(f"--max-iterations must be >= 1, got {options.max_iterations}")
    if options.electronic_temperature is not None and not number("electronic_temperature",
                                                                 options.electronic_temperature) > 0:
        raise ConfigError(f"--electronic-temperature must be > 0 K (Fermi smearing), got {options.electronic_temperature}")


#: elements whose xTB valence-electron count may differ in parity from the total one (lanthanides:
#: f electrons in the core, La-Lu 3 valence electrons) or that xTB does not parametrise (Z > 86):
#: their frames' electron parity is left to tblite
_PARITY_UNKNOWN = set(range(57, 72)) | set(range(87, 200))


def check_no_charge(inputs: list, method: str) -> None:
    """A ``model:`` method takes no charge (``--charge`` is refused for it): a frame whose
    ``atoms.info['charge']`` is not 0 was labelled as if neutral, silently. One line naming the
    frame; 0 (or no charge) passes."""
    for k, atoms in enumerate(inputs):
        charge = atoms.info.get("charge")
        if charge is None:
            continue
        try:
            neutral = float(charge) == 0
        except (TypeError, ValueError):
            neutral = False
        if not neutral:
            where = f"frame {k} ({atoms.info.get('label_source', k)})"
            shown = charge if isinstance(charge, (int, float, np.number)) else repr(charge)
            raise ConfigError(f"{where}: atoms.info['charge'] is {shown}, and --method {method} takes no charge (it "
                              "would label the frame as if it were neutral); label charged frames with a tblite "
                              "method (gfn2-xtb), or leave them out")


def check_electrons(inputs: list, options: LabelOptions) -> None:
    """Each frame's electron count N = Σ Z − charge (``atoms.info['charge']``, else ``--charge``,
    else the sum of the initial charges, as tblite's ASE calculator) against its multiplicity M
    (``atoms.info['multiplicity']``, else ``--multiplicity``): N must be >= 0, and when M is
    known, N − (M − 1) must be even and >= 0 (M − 1 unpaired electrons, the rest in pairs). A
    mismatch is one line naming the frame and its electron count, before tblite runs (tblite
    stopped on that frame, after the frames before it were labelled). Frames with elements of
    :data:`_PARITY_UNKNOWN` are checked for a negative count only."""
    for k, atoms in enumerate(inputs):
        where = f"frame {k} ({atoms.info.get('label_source', k)})"
        charge = atoms.info.get("charge", options.charge)
        source = "atoms.info['charge']" if "charge" in atoms.info else "--charge"
        if charge is None:
            charge, source = float(np.sum(atoms.get_initial_charges())), "the initial charges"
        multiplicity = atoms.info.get("multiplicity", options.multiplicity)
        m_source = "atoms.info['multiplicity']" if "multiplicity" in atoms.info else "--multiplicity"
        for name, value, origin in (("charge", charge, source), ("multiplicity", multiplicity, m_source)):
            if value is None:
                continue
            try:
                whole = float(value) == round(float(value)) and math.isfinite(float(value))
            except (TypeError, ValueError):
                whole = False
            if isinstance(value, bool) or not whole:
                raise ConfigError(f"{where}: {name} {value!r} (from {origin}) must be a whole number (an integer)")
        total = int(np.sum(atoms.numbers))
        electrons = total - int(round(float(charge)))
        if electrons < 0:
            raise ConfigError(f"{where}: {electrons} electrons (atomic numbers add up to {total}, charge "
                              f"{int(round(float(charge)))} from {source}); the charge cannot exceed the nuclear charge")
        if multiplicity is None or set(np.unique(atoms.numbers).tolist()) & _PARITY_UNKNOWN:
            continue
        unpaired = int(round(float(multiplicity))) - 1
        if unpaired < 0 or unpaired > electrons or (electrons - unpaired) % 2:
            parity = "odd" if electrons % 2 else "even"
            fits = "even (2 doublet, 4 quartet, ...)" if electrons % 2 else "odd (1 singlet, 3 triplet, ...)"
            raise ConfigError(f"{where}: {electrons} electrons (atomic numbers add up to {total}, charge "
                              f"{int(round(float(charge)))} from {source}) cannot have multiplicity {unpaired + 1} "
                              f"(from {m_source}): an {parity} count needs an {fits} multiplicity of at most "
                              f"{electrons + 1}; fix --charge or --multiplicity (or the frame's info)")


# ---------------------------------------------------------------------------- methods
def check_method(method: str) -> str:
    """The method's canonical name; one-line errors for unknown methods and a missing tblite
    (said before any file is read or written)."""
    name = method.strip().lower()
    if name in TBLITE_METHODS:
        try:
            importlib.import_module("tblite.ase")  # available? (an import by name: nothing is used from it here)
        except ImportError as exc:
            raise ConfigError(f"--method {method} needs the tblite package ({_reason(exc)}): {INSTALL_HINT}") from None
        return name
    if name.startswith("model:"):
        text = method.strip()[len("model:"):].strip()
        if not text:  # was "model file . not found"
            raise ConfigError(f"--method {method}: names no model file; give model:<model file>, e.g. model:model.pt")
        path = Path(text)
        if not path.is_file():
            from torchmdx.io_utils import missing_file_reason

            reason = missing_file_reason(path, "model file")
            if reason == "model file not found":
                raise ConfigError(f"--method {method}: model file {path} not found")
            raise ConfigError(f"--method {method}: {path} {reason}")  # a folder was "model file runs/t not found"
        return "model:" + str(path)
    raise ConfigError(f"--method {method!r} is not known{_method_hint(method)}; choices: {', '.join(TBLITE_METHODS)}, "
                      "model:<model file>")


def _method_hint(method: str) -> str:
    """' (did you mean ...?)' for an unknown ``--method`` (round 35: a model file given without ``model:``, a
    misspelt ``modle:lj.pt`` or ``gfn2`` only listed the choices), or ''."""
    import difflib

    text = method.strip()
    prefix, colon, rest = text.partition(":")
    if colon and difflib.get_close_matches(prefix.strip().lower(), ["model"], n=1, cutoff=0.6):
        return f" (did you mean 'model:{rest.strip()}'?)"
    if text.lower().endswith((".pt", ".ckpt")) or Path(text).is_file():
        return f" (a model file is given as model:<file>: did you mean 'model:{text}'?)"
    close = difflib.get_close_matches(text.lower(), TBLITE_METHODS, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _reason(exc: ImportError) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else "not installed"
    return "not installed" if "No module named" in text else text


def make_labeler(options: LabelOptions) -> Callable:
    """A function atoms -> (energy eV, forces [n, 3] eV/Å, stress [3, 3] eV/Å³ or None)."""
    check_options(options)
    method = check_method(options.method)
    if method in TBLITE_METHODS:
        from tblite.ase import TBLite

        def tblite_label(atoms):
            charge = atoms.info.get("charge", options.charge)
            multiplicity = atoms.info.get("multiplicity", options.multiplicity)
            calc = TBLite(method=TBLITE_METHODS[method], charge=charge, multiplicity=multiplicity,
                          accuracy=options.setting("accuracy"), max_iterations=options.setting("max_iterations"),
                          electronic_temperature=options.setting("electronic_temperature"), verbosity=0)
            work = atoms.copy()
            # labels are the raw forces and stress: a copy keeps ASE constraints (a .traj's FixAtoms, an
            # extxyz move_mask), and get_forces() zeroed the fixed atoms' forces in the training data
            work.set_constraint()
            work.calc = calc
            energy = float(work.get_potential_energy())
            forces = np.array(work.get_forces())
            stress = None
            if work.pbc.any():
                # 3 x 3 from ASE itself (ase.constraints.voigt_6_to_full_3x3_stress, imported here before,
                # is gone from ASE 3.29: every periodic frame failed to label)
                stress = np.asarray(work.get_stress(voigt=False), dtype=float)
            return energy, forces, stress

        return tblite_label
    from torchmdx.nn.atoms import spans_volume
    from torchmdx.nn.model_file import load_model

    model = load_model(method[len("model:"):], device=options.device)

    def model_label(atoms):
        # a stress needs a cell volume: a slab whose open row is 0 was labelled with a NaN stress
        periodic = bool(atoms.pbc.any()) and bool(spans_volume(atoms.cell.array))
        out = model.predict(atoms, forces=True, stress=periodic)
        return float(out["energy"]), np.asarray(out["forces"]), (np.asarray(out["stress"]) if periodic else None)

    from functools import partial

    from torchmdx.md.loading import check_atoms_elements

    model_label.check = partial(check_atoms_elements, model)  # what the model can never label, checked first
    return model_label


# ---------------------------------------------------------------------------- inputs
def read_inputs(paths, skip: int = 0, every: int = 1, max_frames: Optional[int] = None) -> list:
    """The frames to label: every frame of each file after the first ``skip``, every ``every``-th,
    at most ``max_frames`` in all. Each gets ``info['label_source'] = 'file:frame'`` (the path as given
    where two inputs share a file name)."""
    from torchmdx.data.ase_format import all_frames, disordered_site, nonfinite_position

    # one line naming the option and its value ("--skip must be >= 0, --every >= 1 and --max-frames >= 1"
    # named all three, whichever was wrong)
    for option, value, least in (("--skip", skip, 0), ("--every", every, 1), ("--max-frames", max_frames, 1)):
        if value is not None and value < least:
            raise ConfigError(f"{option} must be >= {least}, got {value}")
    frames = []
    shared_names = Counter(Path(name).name for name in paths)
    for name in paths:
        path = Path(name)
        if not path.is_file():
            from torchmdx.io_utils import missing_file_reason

            raise DataError(f"{path}: {missing_file_reason(path, 'structure file')}")
        try:
            read_frames = all_frames(path)  # a UTF-8 byte-order mark: the text without it
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001 - ASE raises many kinds for a bad file
            from torchmdx.data.ase_format import classify_read_failure

            failure = classify_read_failure(exc, path)  # a torch file was "(UnknownFileTypeError: pt)"
            words = failure.words("not structures; a model to label with is --method model:FILE")
            raise DataError(f"{path}: " + (words or f"cannot be read as structures ({failure.error_type}: "
                                                    f"{failure.first_line})")) from None
        for k, atoms in enumerate(read_frames):
            if k < skip or (k - skip) % every:
                continue
            if len(atoms) == 0:  # would be written as a frame of energy 0 that no reader accepts
                raise DataError(f"{path}: frame {k} has no atoms; nothing to label (remove it, or --skip past it)")
            problem = nonfinite_position(atoms)
            if problem:  # was refused by the method after an empty <out>.partial was written
                raise DataError(f"{path}: frame {k}: {problem}; fix the frame, or --skip past it")
            problem = disordered_site(atoms)
            if problem:  # labelled as whichever species ASE kept (round 20)
                raise DataError(f"{path}: frame {k}: {problem}")
            # the file name, or the path as given where two inputs share a name (run1/traj.extxyz and
            # run2/traj.extxyz were both "traj.extxyz:0")
            atoms.info["label_source"] = f"{path if shared_names.get(path.name, 0) > 1 else path.name}:{k}"
            frames.append(atoms)
    if not frames:
        raise DataError(f"no frames to label in {', '.join(map(str, paths))} (after --skip {skip}, --every {every})")
    return frames[:max_frames] if max_frames else frames


def check_distinct_inputs(paths) -> None:
    """``label a.xyz a.xyz`` (or ``a.xyz ./a.xyz``, a link) labelled every frame twice: copies that a random
    split puts in the training and the test part (round 20; md refuses a file named twice since round 19)."""
    from torchmdx.io_utils import repeated_file

    repeated = repeated_file(paths)
    if repeated:
        raise ConfigError(f"the structures argument names {repeated}: each frame would be labelled twice, copies "
                          "that a random split puts in both training and test; give each file once")


# ---------------------------------------------------------------------------- the partial file
def partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def complete_frames_text(text: str) -> tuple[str, int]:
    """(the text of the complete extended-XYZ frames at the start of ``text``, their count)."""
    lines = text.splitlines(keepends=True)
    position, count = 0, 0
    while position < len(lines):
        head = lines[position].strip()
        if not head.isdigit():
            break
        n = int(head)
        end = position + 2 + n
        if end > len(lines) or not all(line.endswith("\n") for line in lines[position:end]):
            break
        position, count = end, count + 1
    return "".join(lines[:position]), count


def read_partial(path: Path, inputs: list, method: Optional[str] = None) -> list:
    """The complete frames of a partial file, checked against the inputs and (if given) the
    method (one-line errors)."""
    from ase.io import read

    try:
        text, count = complete_frames_text(path.read_text())
        if count == 0:
            return []
        frames = read(io.StringIO(text), index=":", format="extxyz")
    except Exception as exc:  # noqa: BLE001 - not UTF-8, or frames ASE cannot parse: a damaged file
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LabelError(f"{path}: the partial file of an earlier run cannot be read ({type(exc).__name__}: "
                         f"{reason[:120]}); delete it (or pass --force to start afresh)") from None
    previous = -1
    for frame in frames:
        index = frame.info.get("label_index")
        if not isinstance(index, (int, np.integer)) or not previous < index < len(inputs):
            raise LabelError(f"{path} holds frames that are not from these inputs (label_index {index!r}); delete it or "
                             "choose another -o")
        if method is not None and frame.info.get("label_method") != method:
            # continuing would mix two methods' labels in one training set, silently
            raise LabelError(f"{path}: frame {index} was labelled with {frame.info.get('label_method')!r}, not "
                             f"{method!r}; continue with that --method, or pass --force to start afresh")
        source = inputs[index]
        same = (len(source) == len(frame) and np.array_equal(source.numbers, frame.numbers)
                and np.allclose(source.positions, frame.positions, atol=POSITION_TOLERANCE, rtol=0))
        if not same:
            raise LabelError(f"{path}: frame {index} ({source.info.get('label_source')}) differs from the input "
                             "(other atoms or positions); delete it or choose another -o")
        previous = int(index)
    return frames


def labelled_frame(atoms, index: int, method: str, energy, forces, stress):
    from ase.calculators.singlepoint import SinglePointCalculator

    frame = atoms.copy()
    frame.calc = None
    for key in ("forces", "momenta"):
        frame.arrays.pop(key, None)
    for key in ("energy", "free_energy", "stress", "virial"):
        frame.info.pop(key, None)
    frame.info["label_method"] = method
    frame.info["label_index"] = int(index)
    results = {"energy": float(energy), "forces": np.asarray(forces, dtype=float)}
    if stress is not None:
        results["stress"] = np.asarray(stress, dtype=float)
    frame.calc = SinglePointCalculator(frame, **results)
    return frame


def _check_frame(method_check: Optional[Callable], atoms) -> None:
    """A frame no method can label: two atoms at one position (a model:<file> with an analytic potential wrote
    energy 0 and zero forces for them, a frame the data readers then refuse; round 23); then the method's own
    check (a model's unknown element)."""
    from torchmdx.data.coincident import atoms_coincidence

    line = atoms_coincidence(atoms)
    if line:
        raise DataError(line)
    if method_check is not None:
        method_check(atoms)


def label(paths, out, options: LabelOptions, *, skip: int = 0, every: int = 1, max_frames: Optional[int] = None,
          force: bool = False, skip_failed: bool = False, progress: bool = True, labeler: Optional[Callable] = None) -> dict:
    """Label the frames of ``paths`` into ``out`` (module docstring). Returns a summary dict."""
    from ase.io import write

    from torchmdx.io_utils import atomic_write, unwritable_folder

    check_options(options)
    method = check_method(options.method)
    if not str(out).strip():  # was "-o .: the labelled frames are written as extended XYZ ..."
        raise ConfigError("-o is empty; give the file for the labelled frames, e.g. labelled.extxyz")
    out = Path(out)
    if out.suffix.lower() not in (".extxyz", ".xyz"):
        raise ConfigError(f"-o {out}: the labelled frames are written as extended XYZ; name it .extxyz or .xyz")
    folder = out.parent if str(out.parent) else Path(".")
    problem = unwritable_folder(folder)
    if problem == "is a file, not a folder":  # "-o afile/l.extxyz: is a file, not a folder" named -o's path (round 33)
        problem = f"{folder} is a file, not a folder, so nothing can be written under it; give a path in a folder"
    if problem:
        raise ConfigError(f"-o {out}: {problem}")
    for name in paths:  # like md's --out: never over an input, --force or not
        if out.exists() and Path(name).exists() and os.path.samefile(out, name):
            raise ConfigError(f"-o {out} would write the labelled frames over the input {name}; choose another -o")
    if out.exists() and not out.is_file():
        raise ConfigError(f"-o {out} is not a regular file (a folder, device or pipe); give a file name")
    if out.exists() and not force:
        raise ConfigError(f"{out} exists; pass --force to replace it (or choose another -o)")
    check_distinct_inputs(paths)
    inputs = read_inputs(paths, skip, every, max_frames)
    for k, atoms in enumerate(inputs):
        atoms.info["label_index"] = k
    if method in TBLITE_METHODS:  # electron count and multiplicity: one line before tblite runs
        check_electrons(inputs, options)
    else:
        check_no_charge(inputs, method)
    partial = partial_path(out)
    done = read_partial(partial, inputs, method) if (partial.is_file() and not force) else []
    if partial.is_file():
        # keep only the complete, checked frames (a half-written last frame is dropped)
        buffer = io.StringIO()
        for frame in done:
            write(buffer, frame, format="extxyz")
        with atomic_write(partial, "w") as handle:
            handle.write(buffer.getvalue())
    start = int(done[-1].info["label_index"]) + 1 if done else 0
    labeler = labeler or make_labeler(options)
    method_check = getattr(labeler, "check", None)
    if not skip_failed:  # a model's unknown element, two atoms at one position: one line before any file is written
        for index in range(start, len(inputs)):
            try:
                _check_frame(method_check, inputs[index])
            except TorchmdxError as exc:
                raise LabelError(f"frame {index} ({inputs[index].info.get('label_source')}): {method} cannot label "
                                 f"it ({exc}); remove such frames, or pass --skip-failed to leave them out") from None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(inputs), initial=start, desc=f"label {method}", unit="frame", leave=False)
    failed = []
    written = len(done)
    # -o in a folder that does not exist yet (unwritable_folder said it can be made): made here, as md makes its
    # outputs' folders; was open()'s FileNotFoundError traceback (round 23). Removed again if nothing is labelled
    made = [p for p in reversed(partial.parents) if not p.exists()]
    partial.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(partial, "a") as handle:
            for index in range(start, len(inputs)):
                atoms = inputs[index]
                try:
                    if skip_failed:  # without it every frame was checked above, before the file was opened
                        _check_frame(method_check, atoms)
                    energy, forces, stress = labeler(atoms)
                    if not (np.isfinite(energy) and np.all(np.isfinite(forces))):
                        raise ValueError("non-finite energy or forces")
                except Exception as exc:  # noqa: BLE001 - any failure of the method on one frame
                    if skip_failed:
                        failed.append(index)
                        if bar is not None:
                            bar.update(1)
                        continue
                    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    if written == 0:  # nothing to continue from: no empty partial file (or folder) left behind
                        handle.close()
                        partial.unlink()
                        for folder in reversed(made):
                            folder.rmdir()
                        raise LabelError(f"frame {index} ({atoms.info.get('label_source')}): {method} failed "
                                         f"({reason}); no frame was labelled, nothing written") from None
                    raise LabelError(f"frame {index} ({atoms.info.get('label_source')}): {method} failed ({reason}); "
                                     f"the {written} frames before it are kept in {partial}: run again to continue, "
                                     "or pass --skip-failed") from None
                frame = labelled_frame(atoms, index, method, energy, forces, stress)
                buffer = io.StringIO()
                write(buffer, frame, format="extxyz")
                handle.write(buffer.getvalue())
                handle.flush()
                written += 1
                if bar is not None:
                    bar.update(1)
            handle.flush()
            os.fsync(handle.fileno())
    finally:
        if bar is not None:
            bar.close()
    os.replace(partial, out)
    return {"out": str(out), "frames": written, "labelled_now": written - len(done), "resumed_from": len(done),
            "failed": failed, "inputs": len(inputs), "method": method}
