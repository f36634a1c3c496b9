"""md's starting structures from files: the frames an ASE index selects (:func:`read_structures`), each
checked (cell, finite positions, ordered sites, masses) and named for messages as ``file`` or ``file frame k``.
Moved out of :mod:`torchmdx.md.run`, which runs what is read."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from torchmdx.data.ase_format import disordered_site, nonfinite_position
from torchmdx.errors import DataError


def _flat_cell(atoms) -> str:
    """Why a periodic structure's cell spans no volume, in words: a slab (pbc T T F) written with a zero third
    vector was "has no cell" (round 20), though its periodic rows are there."""
    rows = np.asarray(atoms.cell.array, dtype=float)
    lengths = np.linalg.norm(rows, axis=1)
    if not lengths[np.asarray(atoms.pbc, dtype=bool)].any():
        return "has no cell"
    zero = [("a", "b", "c")[i] for i in range(3) if lengths[i] < 1e-9]
    open_zero = [r for r in zero if not atoms.pbc["abc".index(r)]]
    if open_zero and len(open_zero) == len(zero):
        axis = "abc".index(open_zero[0])
        return (f"its cell spans no volume: the open direction{'s' if len(open_zero) > 1 else ''} "
                f"{', '.join(open_zero)} {'have' if len(open_zero) > 1 else 'has'} no cell vector (rows "
                f"{rows.tolist()} Å); md wraps atoms with the whole cell: give each open direction a vacuum vector, "
                f"e.g. atoms.center(vacuum=10.0, axis={axis}) in ASE")
    return f"its cell spans no volume (rows {rows.tolist()} Å); give a cell whose periodic rows are independent"


def read_structures(paths, index: str = "-1", option: str = "--index", sources: Optional[list] = None) -> list:
    """The frames ``index`` (ASE syntax: "-1" last, ":" all, "start:stop:step") of every file, via
    ``ase.io.read`` (one-line DataError on failure; ``option`` names the index in messages). A slice
    selects what Python's slicing of the file's list of frames selects (the file is read whole and
    sliced here: ASE's extxyz reader returned nothing for ``5:2:-1`` and frames 3, 4 for ``-3:5`` of 7).
    ``sources``, a list, gets where each structure came from (``file`` or ``file frame k``) for messages."""
    from ase.io import read

    from torchmdx.data.ase_format import all_frames, ase_source
    from torchmdx.data.xyz_counts import check_rest

    structures = []
    chosen = _index_slice(index)
    for path in paths:
        path = Path(path)
        if not path.is_file():
            from torchmdx.io_utils import missing_file_reason

            raise DataError(f"{path}: {missing_file_reason(path, 'structure file')}")
        try:
            everything, numbers = None, None
            if chosen is not None or _negative_frame(index):
                everything = all_frames(path)
            if chosen is not None:
                numbers = range(len(everything))[chosen]
                frames = [everything[n] for n in numbers]
            elif everything is not None and -int(str(index).strip()) > len(everything):
                frames = None  # ASE reads -9 of 5 frames as frame 0, silently
            else:
                source, options = ase_source(path)  # a UTF-8 byte-order mark: the text without it
                frames = read(source, index=index, **options)
                frames = [frames] if not isinstance(frames, list) else frames
                if str(index).strip() == "-1":  # ASE read to the end it saw: a blank line between frames made the
                    check_rest(source)  # frame before it "the last", without a word (round 38)
        except (StopIteration, IndexError):
            frames = None  # an index past the last frame
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001 - any reader failure is the same user error
            from torchmdx.data.ase_format import classify_read_failure

            failure = classify_read_failure(exc, path)
            # `md model.pt ar.xyz` was "m.pt: cannot read a structure with ASE (pt)"
            words = failure.words("not a structure; give a model with --model and a restart file with --restart")
            raise DataError(f"{path}: {words or f'cannot read a structure with ASE ({failure.detail})'}") from None
        if not frames:
            try:
                count = len(everything if everything is not None else all_frames(path))
            except DataError:  # a blank line between frames: --index 1 "selected none" of the frame before it
                raise
            except Exception:  # noqa: BLE001
                count = 0
            if count == 0:
                raise DataError(f"{path}: holds no structure")
            raise DataError(f"{path} holds {count} frame(s) (0 to {count - 1}): {option} {index} selects none of "
                            "them (-1 the last, ':' all)")
        names = _frame_names(path, index, len(frames), None if everything is None else len(everything))
        for k, atoms in enumerate(frames):
            if len(atoms) == 0:
                raise DataError(f"{path}: frame {k if numbers is None else numbers[k]} has no atoms")
            if atoms.pbc.any() and not np.isfinite(atoms.cell.array).all():  # the engine wraps with the whole cell
                raise DataError(f"{names[k]}: the cell holds non-finite values (rows {atoms.cell.array.tolist()} Å), "
                                f"periodic {atoms.pbc.tolist()}; give every row of the cell as finite numbers")
            if atoms.pbc.any() and atoms.cell.volume < 1e-6:
                raise DataError(f"{path}: frame {k if numbers is None else numbers[k]} is periodic "
                                f"({atoms.pbc.tolist()}) but " + _flat_cell(atoms))
            where = names[k]
            problem = nonfinite_position(atoms)
            if problem:  # was ASE's RuntimeWarning (close-contact check) before the engine's error
                raise DataError(f"{where}: {problem}; fix the structure file")
            problem = disordered_site(atoms)
            if problem:  # a disordered CIF ran as whichever species ASE kept (round 20)
                raise DataError(f"{where}: {problem}")
            masses = atoms.get_masses()
            bad = np.flatnonzero(~(np.isfinite(masses) & (masses > 0)))
            if bad.size:  # a NaN mass was "the temperature of structure 0 reached nan K"
                a = int(bad[0])
                raise DataError(f"{where}: atom {a} ({atoms.get_chemical_symbols()[a]}) has mass {masses[a]} amu; "
                                "masses must be finite and positive (fix the masses in the file)")
            if sources is not None:
                sources.append(where)
        structures.extend(frames)
    return structures


def _frame_names(path, index: str, selected: int, count: Optional[int] = None) -> list:
    """How messages name each of the ``selected`` frames ``index`` picked from ``path``: the file
    alone for one frame, else ``file frame n`` with n the frame number in the file (for a slice, the
    file's ``count`` of frames is needed: read when not given)."""
    if selected == 1:
        return [str(path)]
    numbers = range(selected)
    chosen = _index_slice(index)
    if chosen is not None and chosen != slice(None, None) and chosen != slice(None, None, None):
        try:
            from torchmdx.data.ase_format import all_frames

            numbers = range(len(all_frames(path)) if count is None else count)[chosen]
        except Exception:  # noqa: BLE001 - the names are for messages only
            numbers = range(selected)
    if len(numbers) != selected:
        numbers = range(selected)
    return [f"{path} frame {n}" for n in numbers]


def _index_slice(index) -> Optional[slice]:
    """``index`` as a Python slice when it is one ("5:2:-1", "::2", ":"), else None (a frame number).
    A step of 0 is left to ASE's reader, whose error says so."""
    parts = str(index).strip().split(":")
    if len(parts) < 2 or len(parts) > 3:
        return None
    try:
        values = [int(p) if p.strip() else None for p in parts]
    except ValueError:
        return None
    if len(values) == 3 and values[2] == 0:
        return None
    return slice(*values)


def _negative_frame(index) -> bool:
    """Whether ``index`` is a frame number before -1 (-9 of 5 frames must be refused, not read as frame 0)."""
    try:
        return int(str(index).strip()) < -1
    except ValueError:
        return False
