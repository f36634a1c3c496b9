"""Data augmentation by random rotations (and reflections): ``train.augment``.

A model without built-in rotation symmetry (``model.architecture: transformer``) learns it from
data: at every training step each structure b gets its own random orthogonal matrix Q_b, and its
Cartesian quantities are transformed consistently (rows are vectors, as everywhere in torchmdx)::

    pos'   = pos Q_bᵀ          (about the origin; energies are translation invariant)
    forces' = forces Q_bᵀ      (F = -∂E/∂pos is a vector)
    cell'  = cell Q_bᵀ         (lattice vectors, rows)
    stress' = Q_b σ Q_bᵀ       (a rank-2 tensor)
    energy' = energy           (a scalar)

``rotations``: Q_b uniform on SO(3) (Haar measure): a unit quaternion from four standard normal
numbers (the normalised Gaussian 4-vector is uniform on the 3-sphere, which covers SO(3) twice
with the Haar measure). ``rotations_reflections``: Q_b = ±R_b with a fair sign, uniform on O(3).

Everything stays on the batch's device and draws from torch's generator there (no host reads,
so a packed batch can be rotated before the captured step copies it). A packed batch's padding
atoms are structures of their own at the origin: their rotation changes nothing.
"""

from __future__ import annotations

from typing import Optional

import torch

AUGMENTATIONS = ("none", "rotations", "rotations_reflections")


def random_orthogonal(count: int, *, reflections: bool = False, device=None, dtype=torch.float64,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``count`` random 3 x 3 rotation matrices [count, 3, 3] (Haar measure on SO(3)), or
    rotations and reflections (Haar measure on O(3)) with ``reflections``."""
    q = torch.randn(count, 4, device=device, dtype=dtype, generator=generator)
    q = q / q.norm(dim=-1, keepdim=True)
    a, b, c, d = q.unbind(-1)
    rows = [
        a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c),
        2 * (b * c + a * d), a * a - b * b + c * c - d * d, 2 * (c * d - a * b),
        2 * (b * d - a * c), 2 * (c * d + a * b), a * a - b * b - c * c + d * d,
    ]
    matrices = torch.stack(rows, dim=-1).reshape(count, 3, 3)
    if reflections:
        flip = torch.randint(0, 2, (count,), device=device, generator=generator).to(dtype) * 2 - 1
        matrices = matrices * flip.view(-1, 1, 1)
    return matrices


def transform_structures(matrices: torch.Tensor, batch_index: torch.Tensor, pos: torch.Tensor,
                         forces: Optional[torch.Tensor] = None, cell: Optional[torch.Tensor] = None,
                         stress: Optional[torch.Tensor] = None) -> dict:
    """Apply Q_b [B, 3, 3] to the atoms of each structure (``batch_index`` [N]) and to its cell
    and stress; returns the new tensors (the inputs are not changed)."""
    per_atom = matrices.to(pos.dtype)[batch_index]  # [N, 3, 3]
    out = {"pos": torch.einsum("nij,nj->ni", per_atom, pos)}
    if forces is not None:
        out["forces"] = torch.einsum("nij,nj->ni", per_atom.to(forces.dtype), forces)
    if cell is not None:
        m = matrices.to(cell.dtype)
        out["cell"] = torch.einsum("bkj,bij->bki", cell.reshape(-1, 3, 3), m).reshape(cell.shape)
    if stress is not None:
        m = matrices.to(stress.dtype)
        s = stress.reshape(-1, 3, 3)
        out["stress"] = (m @ s @ m.transpose(1, 2)).reshape(stress.shape)
    return out


def augment_batch(batch, mode: str, generator: Optional[torch.Generator] = None):
    """``batch`` (a PyG batch, changed in place and returned, or a
    :class:`~torchmdx.data.packing.PackedBatch`, returned as a new one) with every structure
    rotated (``mode`` 'rotations') or rotated and possibly reflected ('rotations_reflections');
    'none' returns it unchanged."""
    if mode == "none":
        return batch
    if mode not in AUGMENTATIONS:
        from torchmdx.errors import ConfigError

        raise ConfigError(f"config key 'train.augment' must be one of {', '.join(AUGMENTATIONS)}, got {mode!r}")
    from torchmdx.data.packing import PackedBatch

    pos = batch.pos
    if isinstance(batch, PackedBatch):
        count = batch.num_structures  # real, empty and padding structures: fixed, no host read
    else:
        count = int(batch.num_graphs)
    matrices = random_orthogonal(count, reflections=mode == "rotations_reflections", device=pos.device,
                                 dtype=torch.float64 if pos.dtype == torch.float64 else torch.float32,
                                 generator=generator)
    stress = getattr(batch, "stress", None)
    cell = getattr(batch, "cell", None)
    new = transform_structures(matrices, batch.batch, pos, getattr(batch, "forces", None), cell, stress)
    if isinstance(batch, PackedBatch):
        from dataclasses import replace

        return replace(batch, **new)
    for key, value in new.items():
        setattr(batch, key, value)
    return batch
