"""Atomic reference energies re-fitted to a model's energies (force-only training).

min_δ Σ_s (E_ref,s − E_pred,s − Σ_e n_s,e δ_e)², atomref_e += δ_e: forces do not see these
constants, so this is what makes a force-only model predict absolute energies
(:class:`torchmdx.train.module.PotentialModule` runs it before every validation).
"""

from __future__ import annotations

import numpy as np
import torch

from torchmdx.data.loader import batches_in_order


@torch.no_grad()
def reference_normal_equations(model, dataset, indices, batch_size: int = 64):
    """Normal equations of min_δ Σ_s (E_ref,s − E_pred,s − Σ_e n_s,e δ_e)² over ``indices``:
    (CᵀC [max_z, max_z], Cᵀr [max_z]) with C the element counts and r the energy residuals (eV),
    in float64 on the model's device. Energies only (no forces)."""
    device = next(model.parameters()).device
    max_z = model.config.max_z
    normal = torch.zeros(max_z, max_z, dtype=torch.float64, device=device)
    rhs = torch.zeros(max_z, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    try:
        for batch in batches_in_order(dataset, indices, batch_size):
            batch = batch.to(device)
            out = model(batch.z, batch.pos, batch.batch, batch.cell, batch.pbc, forces=False,
                        num_structures=int(batch.num_graphs))
            residual = batch.energy.reshape(-1).to(torch.float64) - out["energy"].to(torch.float64)
            counts = torch.zeros(int(batch.num_graphs), max_z, dtype=torch.float64, device=device)
            counts.index_put_((batch.batch, batch.z), torch.ones_like(batch.z, dtype=torch.float64), accumulate=True)
            normal += counts.T @ counts
            rhs += counts.T @ residual
    finally:
        model.train(was_training)
    return normal, rhs


@torch.no_grad()
def apply_reference_correction(model, normal: torch.Tensor, rhs: torch.Tensor) -> bool:
    """atomref_e += δ_e, the minimum-norm least-squares solution of the normal equations over
    the elements present (pseudo-inverse: with one composition only Σ_e n_e δ_e is determined).
    Returns False when no element is present."""
    present = torch.diagonal(normal) > 0
    if not bool(present.any()):
        return False
    delta = torch.linalg.pinv(normal[present][:, present]) @ rhs[present]
    new = model.atomref.detach().clone()
    new[present] += delta.to(new)
    model.atomref.copy_(new)
    return True


def fit_reference_correction(model, dataset, indices, batch_size: int = 64) -> bool:
    """Shift the model's atomic references so that its energies fit ``dataset[indices]`` best
    (least squares, see :func:`reference_normal_equations`)."""
    normal, rhs = reference_normal_equations(model, dataset, np.asarray(indices, dtype=np.int64), batch_size)
    return apply_reference_correction(model, normal, rhs)
