"""The training objective and the error sums of one batch (eV, eV/Å, eV/Å³).

``training_objective`` is what every training step minimises (the eager step, the captured
step of :mod:`torchmdx.train.graphed`); under DDP the eager step minimises
``global_batch_objective`` (normalised by the global batch's counts, :func:`objective_counts`;
so does the captured step under DDP); packed batches (:mod:`torchmdx.data.packing`) pass
padding weights so that the padding adds nothing. ``train_error_sums`` gives the run's epoch
error sums of a batch (:func:`torchmdx.train.metrics.error_sums` with its loss settings).
"""

from __future__ import annotations

from typing import Optional

import torch

from torchmdx.train.config import TrainConfig
from torchmdx.train.metrics import error_sums, loss_terms


def training_objective(cfg: TrainConfig, energy: torch.Tensor, forces: Optional[torch.Tensor],
                       energy_ref: torch.Tensor, forces_ref: Optional[torch.Tensor], n_atoms: torch.Tensor,
                       stress: Optional[torch.Tensor] = None, stress_ref: Optional[torch.Tensor] = None,
                       structure_weight: Optional[torch.Tensor] = None, atom_weight: Optional[torch.Tensor] = None):
    """(loss, ΔE [B], ΔF [N, 3] or None) of predictions against references (eV, eV/Å, eV/Å³)::

        loss = energy_weight · mean_b L(ΔE_b [/ n_b]) + force_weight · mean_{a,k} L(ΔF_ak)
               + stress_weight · mean_{b,k,l} L(Δσ_bkl)

    ``forces`` None: no force term (energy-only training, or data without forces); ``stress``
    [B, 3, 3] and ``stress_ref`` (any shape of B x 9 values) None: no stress term. A packed
    batch (:class:`torchmdx.data.packing.PackedBatch`) gives ``structure_weight`` [B] and
    ``atom_weight`` [N] (1 real, 0 padding): the means run over the real structures and atoms
    only, Σ_b w_b L_b / Σ_b w_b and Σ_a w_a Σ_k L_ak / (3 Σ_a w_a), so padding changes neither
    the loss nor any gradient. The eager step and the CUDA-graph step (which has no stress)
    both use this function."""
    energy_error = energy - energy_ref.reshape(-1).to(energy.dtype)
    force_error = forces - forces_ref.to(forces.dtype) if forces is not None and forces_ref is not None else None
    loss = energy_error.new_zeros(())
    if cfg.energy_weight > 0:
        target = energy_error / n_atoms.to(energy_error.dtype).clamp(min=1) if cfg.energy_loss == "per_atom" \
            else energy_error
        terms = loss_terms(target, cfg.loss, cfg.huber_delta)
        loss = loss + cfg.energy_weight * _weighted_mean(terms, structure_weight)
    if cfg.force_weight > 0 and force_error is not None:
        terms = loss_terms(force_error, cfg.loss, cfg.huber_delta)
        loss = loss + cfg.force_weight * _weighted_mean(terms, atom_weight)
    if cfg.stress_weight > 0 and stress is not None and stress_ref is not None:
        stress_error, known = masked_stress_error(stress, stress_ref)
        terms = loss_terms(stress_error, cfg.loss, cfg.huber_delta)
        loss = loss + cfg.stress_weight * terms.sum() / known.sum().clamp(min=1)
    return loss, energy_error, force_error


def _weighted_mean(terms: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.Tensor:
    """mean of ``terms`` ([B] or [N, 3]); with ``weight`` (first dimension, 1 real / 0 padding)
    Σ w·terms / (Σ w · terms per row), padding rows selected out (so a NaN there stays out too)."""
    if weight is None:
        return terms.mean()
    w = weight.to(terms.dtype).reshape(weight.shape + (1,) * (terms.dim() - 1))
    kept = torch.where(w > 0, terms, torch.zeros_like(terms))
    per_row = terms[0].numel() if terms.dim() > 1 else 1
    return (w * kept).sum() / (w.sum() * per_row).clamp(min=1)


def train_error_sums(cfg: TrainConfig, energy_error, n_atoms, force_error, structure_weight=None, atom_weight=None):
    """:func:`torchmdx.train.metrics.error_sums` with the run's loss settings."""
    return error_sums(energy_error, n_atoms, force_error, cfg.loss, cfg.huber_delta, cfg.energy_loss,
                      structure_weight, atom_weight)


def masked_stress_error(stress: torch.Tensor, stress_ref: torch.Tensor):
    """(Δσ [B, 3, 3] with 0 where the reference is unknown, known [B, 3, 3] bool): structures
    without a stress (NaN references: isolated atoms of a periodic dataset) add nothing, and no
    NaN reaches the gradient."""
    ref = stress_ref.reshape(stress.shape).to(stress.dtype)
    known = torch.isfinite(ref)
    return torch.where(known, stress - torch.where(known, ref, torch.zeros_like(ref)), torch.zeros_like(ref)), known


def batch_counts(batch) -> torch.Tensor:
    """Number of atoms of each structure of a PyG batch [B]."""
    if getattr(batch, "ptr", None) is not None:
        return batch.ptr[1:] - batch.ptr[:-1]
    return torch.bincount(batch.batch, minlength=int(batch.num_graphs))


def distributed_world() -> int:
    """The number of processes of a running ``torch.distributed`` group (1 without one)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def objective_counts(structures: int, atoms: int, forces: bool, device,
                     structure_weight: Optional[torch.Tensor] = None, atom_weight: Optional[torch.Tensor] = None,
                     stress_known: Optional[torch.Tensor] = None) -> torch.Tensor:
    """float64 [3]: what :func:`global_batch_objective` normalises by, for this rank's batch: its
    structures, force components (0 without a force term) and known stress components, the
    padding of a packed batch (``structure_weight``, ``atom_weight``: 1 real, 0 padding) not
    counted. Made by device kernels only (``torch.full``, sums), so a CUDA graph can capture it."""
    f64 = torch.float64
    if structure_weight is not None:
        n_structures = structure_weight.to(f64).sum()
    else:
        n_structures = torch.full((), float(structures), dtype=f64, device=device)
    if not forces:
        n_forces = torch.zeros((), dtype=f64, device=device)
    elif atom_weight is not None:
        n_forces = 3.0 * atom_weight.to(f64).sum()
    else:
        n_forces = torch.full((), 3.0 * atoms, dtype=f64, device=device)
    n_stress = (stress_known.to(f64).reshape(()) if stress_known is not None
                else torch.zeros((), dtype=f64, device=device))
    return torch.stack([n_structures, n_forces, n_stress])


def global_batch_objective(cfg: TrainConfig, energy: torch.Tensor, forces: Optional[torch.Tensor],
                           energy_ref: torch.Tensor, forces_ref: Optional[torch.Tensor], n_atoms: torch.Tensor,
                           stress: Optional[torch.Tensor] = None, stress_ref: Optional[torch.Tensor] = None, group=None,
                           structure_weight: Optional[torch.Tensor] = None, atom_weight: Optional[torch.Tensor] = None,
                           counts: Optional[torch.Tensor] = None):
    """(loss, ΔE, ΔF) of one rank's part of a global batch under DDP, such that DDP's gradient
    averaging (the mean over the W ranks) gives the gradient of the one-process objective of the
    whole global batch (:func:`training_objective` on the union of the ranks' batches)::

        loss_r = W · ( energy_weight · Σ_{b∈r} w_b L(ΔE_b) / B + force_weight · Σ_{a∈r,k} w_a L(ΔF_ak) / (3 N)
                       + stress_weight · Σ_{r's known components} L(Δσ) / K )

    with B, N, K the structures, atoms and known stress components of the *global* batch (one
    ``all_reduce`` of three counts per step). Averaging each rank's own mean instead weighted the
    atoms of ranks with small structures more (a rank of 10 atoms counted as much as one of 1000).
    Each rank's value is its share of the global loss times W (their mean is the global loss).

    A packed batch (:class:`torchmdx.data.packing.PackedBatch`) gives ``structure_weight`` [B]
    and ``atom_weight`` [N] (1 real, 0 padding, as :func:`training_objective`): padding rows are
    selected out of the sums and not counted. ``counts``: the global counts already reduced (float64
    [3], the sum over the ranks of :func:`objective_counts`): no ``all_reduce`` here (the captured
    DDP step reduces them together with its skip flags, :mod:`torchmdx.train.graphed_step`)."""
    energy_error = energy - energy_ref.reshape(-1).to(energy.dtype)
    force_error = forces - forces_ref.to(forces.dtype) if forces is not None and forces_ref is not None else None
    zero = energy_error.new_zeros(())
    energy_sum = force_sum = stress_sum = zero
    stress_known = None
    use_energy = cfg.energy_weight > 0
    use_forces = cfg.force_weight > 0 and force_error is not None
    use_stress = cfg.stress_weight > 0 and stress is not None and stress_ref is not None
    if use_energy:
        target = energy_error / n_atoms.to(energy_error.dtype).clamp(min=1) if cfg.energy_loss == "per_atom" \
            else energy_error
        energy_sum = _weighted_sum(loss_terms(target, cfg.loss, cfg.huber_delta), structure_weight)
    if use_forces:
        force_sum = _weighted_sum(loss_terms(force_error, cfg.loss, cfg.huber_delta), atom_weight)
    if use_stress:
        stress_error, known = masked_stress_error(stress, stress_ref)
        stress_sum = loss_terms(stress_error, cfg.loss, cfg.huber_delta).sum()
        stress_known = known.sum()
    if counts is None:
        counts = objective_counts(energy_error.shape[0], force_error.shape[0] if use_forces else 0, use_forces,
                                  energy_error.device, structure_weight, atom_weight if use_forces else None,
                                  stress_known)
        torch.distributed.all_reduce(counts, group=group)
    world = torch.distributed.get_world_size(group)
    scale = (world / counts.clamp(min=1)).to(energy_error.dtype)
    loss = zero
    if use_energy:
        loss = loss + cfg.energy_weight * (energy_sum * scale[0])
    if use_forces:
        loss = loss + cfg.force_weight * (force_sum * scale[1])
    if use_stress:
        loss = loss + cfg.stress_weight * (stress_sum * scale[2])
    return loss, energy_error, force_error


def _weighted_sum(terms: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.Tensor:
    """Σ ``terms`` ([B] or [N, 3]); with ``weight`` (1 real / 0 padding) Σ w·terms, padding rows
    selected out (so a NaN there stays out too), as :func:`_weighted_mean`'s numerator."""
    if weight is None:
        return terms.sum()
    w = weight.to(terms.dtype).reshape(weight.shape + (1,) * (terms.dim() - 1))
    return (w * torch.where(w > 0, terms, torch.zeros_like(terms))).sum()
