"""ASE ``Atoms`` (or a list of them) -> the tensors a :class:`~torchmdx.nn.base.Potential` takes.

z [N] long, pos [N, 3] Å, batch [N] long, cell [B, 3, 3] Å and pbc [B, 3] bool (both None when
no structure is periodic). Used by ``potential(atoms)`` and ``potential.predict(atoms)``.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from torchmdx.errors import ModelError, with_article


def module_device_dtype(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of a module's first floating parameter or buffer."""
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device, torch.get_default_dtype()
    return torch.device("cpu"), torch.get_default_dtype()


def half_precision_weights(module: torch.nn.Module) -> Optional[str]:
    """"float16" or "bfloat16" when ``module``'s weights are of that dtype (``model.half()``), else None. Those keep
    about 3 significant digits: energies off by percents (the Calculator of a ``model.half()`` gave -0.162 eV for
    -0.159, a bfloat16 one -0.170). Callers that take the model's own dtype refuse it in one line."""
    dtype = module_device_dtype(module)[1]
    if dtype in (torch.float16, torch.bfloat16):
        return str(dtype).removeprefix("torch.")
    return None


def is_atoms(obj) -> bool:
    return hasattr(obj, "get_atomic_numbers") and hasattr(obj, "get_positions")


def local_origin(positions: np.ndarray) -> np.ndarray:
    """An origin near the atoms [3] Å (the median of their finite positions, rounded to whole Å; 0
    without any): positions taken relative to it in float64 keep float32 precision far from the
    coordinates' origin. The median of the finite ones: with the mean, one NaN atom made every
    position NaN (the error named atom 0, not the NaN atom), and the Calculator, which keeps the
    origin while the atoms stay the same, then refused every later structure of those atoms as
    "non-finite"; one atom at 1e200 Å pushed the others to -inf in float32 the same way."""
    positions = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    finite = positions[np.isfinite(positions).all(axis=1)]
    return np.round(np.median(finite, axis=0)) if len(finite) else np.zeros(3)


def beyond_dtype(positions, dtype: torch.dtype, numbers=None, origin=None, advice: bool = True) -> Optional[str]:
    """The one line for a finite position that the model's floating ``dtype`` cannot hold (an atom
    at 1e200 Å in a float32 model became inf, and was reported as "non-finite [inf, ...]"), naming
    the first such atom, its element (from ``numbers``) and its value as given; None when every
    position fits. ``origin``: subtracted before the check (the local origin of a centred input);
    ``advice``: end with what to do (callers naming their own option leave it off)."""
    if not dtype.is_floating_point or dtype == torch.float64:
        return None
    largest = float(torch.finfo(dtype).max)
    positions = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    shifted = positions - origin if origin is not None else positions
    with np.errstate(invalid="ignore", over="ignore"):
        over = np.isfinite(positions).all(1) & (np.abs(shifted) > largest).any(1)
    if not over.any():
        return None
    i = int(np.flatnonzero(over)[0])
    element = ""
    if numbers is not None:
        from ase.data import chemical_symbols

        z = int(np.asarray(numbers)[i])
        element = f" ({chemical_symbols[z] if 0 <= z < len(chemical_symbols) else z})"
    name = str(dtype).replace("torch.", "")
    line = (f"atom {i}{element} is at {positions[i].tolist()} Å: finite, but beyond the range of {name} "
            f"(at most {largest:.3g}), the dtype it is computed in")
    return line + "; check the structure, or compute in float64" if advice else line


#: a cell spanning less volume (Å³) spans none: a stress, σ = (1/V) ∂E/∂ε, is undefined there
MIN_STRESS_VOLUME = 1e-12


def spans_volume(cell) -> np.ndarray:
    """Whether each cell [..., 3, 3] (Å) spans a volume a stress can divide by: finite entries and
    |det| > :data:`MIN_STRESS_VOLUME` (a slab or wire whose open rows are 0 or NaN spans none)."""
    cell = np.asarray(cell, dtype=np.float64)
    finite = np.isfinite(cell).all(axis=(-2, -1))
    volume = np.abs(np.linalg.det(np.where(np.isfinite(cell), cell, 0.0)))
    return finite & (volume > MIN_STRESS_VOLUME)


def no_volume_stress(pbc) -> str:
    """The one line for a stress asked of a periodic structure whose cell spans no volume."""
    return (f"stress of a structure with pbc {np.asarray(pbc, dtype=bool).tolist()} divides by the volume of its "
            "cell, which is 0: give each open direction a finite vacuum vector (as ase.build's vacuum= does)")


def atoms_inputs(atoms_or_list, device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None,
                 centred: bool = False) -> dict:
    """Keyword arguments ``z, pos, batch, cell, pbc, num_structures`` for ``Potential.forward``
    (``num_structures``: structures without atoms at the end of a list count too). ``centred``:
    each structure's positions relative to an origin near its atoms, subtracted in float64 (for
    energies, forces and stress, which do not depend on it: float32 positions 10^6 Å from the
    origin kept 0.06 Å steps)."""
    single = is_atoms(atoms_or_list)
    try:
        structures = [atoms_or_list] if single else list(atoms_or_list)
    except TypeError:  # None, a number: was "TypeError: 'NoneType' object is not iterable"
        structures = []
    expected = "expected an ase.Atoms or a non-empty list of ase.Atoms"
    if isinstance(atoms_or_list, (dict, str, bytes)) or not structures:
        # a dict was listed as its keys ("got str"); a string as its characters
        kind = type(atoms_or_list).__name__
        hint = " (give its values: list(d.values()))" if isinstance(atoms_or_list, dict) else ""
        raise ModelError(f"{expected}, got {'an empty ' if not structures and kind in ('list', 'tuple') else ''}"
                         f"{kind}{hint}")
    if hasattr(atoms_or_list, "pos") and hasattr(atoms_or_list, "z") and not single:
        # a batch of the data module (the project's batches): was "item 0 of the DataBatch of 6 has type tuple"
        raise ModelError(f"{expected}, got {with_article(type(atoms_or_list).__name__)} (torch_geometric): call the model with "
                         "its tensors, model(batch.z, batch.pos, batch.batch, batch.cell, batch.pbc) (a single Data: "
                         "model(data.z, data.pos, cell=data.cell, pbc=data.pbc))")
    if isinstance(atoms_or_list, np.ndarray) or torch.is_tensor(atoms_or_list):
        # model(numbers, positions) as numpy arrays: was "item 0 of the ndarray of 3 has type int64"
        kind = "a numpy array" if isinstance(atoms_or_list, np.ndarray) else "a tensor"
        raise ModelError(f"{expected}, got {kind}: model(z, pos) takes torch tensors "
                         "(torch.as_tensor(numbers), torch.as_tensor(positions)); model(atoms) and predict(atoms) take "
                         "ase.Atoms")
    bad = next((i for i, a in enumerate(structures) if not is_atoms(a)), None)
    if bad is not None:  # the item named: "got str" did not say which of 1000 structures
        raise ModelError(f"{expected}: item {bad} of the {type(atoms_or_list).__name__} of {len(structures)} has "
                         f"type {type(structures[bad]).__name__}, not ase.Atoms")
    dtype = dtype or torch.get_default_dtype()
    from torchmdx.data.coincident import far_atom_line

    positions = [a.get_positions() for a in structures]
    origins = [local_origin(p) if centred else None for p in positions]  # each read and computed once
    for b, (a, p, origin) in enumerate(zip(structures, positions, origins)):
        # beyond the dtype's reach, else beyond float64's: the distances lost (round 35)
        line = beyond_dtype(p, dtype, a.get_atomic_numbers(), origin) or far_atom_line(p)
        if line:
            raise ModelError(line if single else f"structure {b}: {line}")
    z = np.concatenate([a.get_atomic_numbers() for a in structures]).astype(np.int64)
    pos = np.concatenate([p - origin if centred else p for p, origin in zip(positions, origins)])
    batch = np.concatenate([np.full(len(a), b, dtype=np.int64) for b, a in enumerate(structures)])
    pbc = np.stack([np.asarray(a.get_pbc(), dtype=bool) for a in structures])
    out = {
        "z": torch.as_tensor(z, device=device),
        "pos": torch.as_tensor(pos, dtype=dtype, device=device),
        "batch": torch.as_tensor(batch, device=device),
        "cell": None,
        "pbc": None,
        "num_structures": len(structures),
    }
    if pbc.any():
        cell = np.stack([np.asarray(a.get_cell()[:], dtype=np.float64) for a in structures])
        out["cell"] = torch.as_tensor(cell, dtype=dtype, device=device)
        out["pbc"] = torch.as_tensor(pbc, device=device)
    return out


def split_per_structure(values: torch.Tensor, batch: torch.Tensor, num_structures: int) -> list[np.ndarray]:
    """Per-atom tensor -> list of numpy arrays, one per structure (in batch order)."""
    values = values.detach().cpu().numpy()
    batch = batch.cpu().numpy()
    return [values[batch == b] for b in range(num_structures)]
