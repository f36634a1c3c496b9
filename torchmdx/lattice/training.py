"""Fitting effective models to configurations with exact energies.

The linear model is solved by least squares. The transformer starts from that solution (its
readout holds the linear couplings, its value weights start small) and is trained with AdamW
on the mean squared error of E_eff - E over a training split, keeping the weights with the
lowest validation error (early stopping on a held-out split). Everything is float64 and uses
only the generator passed in (split, mini-batch order), so a fit is reproducible.

What SLMC needs is β (E_eff - E) to vary little between configurations: a constant offset costs
nothing, so errors are reported as the RMS of the residual after removing its mean, times β
(``beta_rmse``): about that spread in the log acceptance ratio of two independent configurations
divided by √2.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from torchmdx.lattice.effective import EquivariantTransformer, LinearEffectiveModel


@dataclass
class FitReport:
    train_rmse: float
    val_rmse: float
    beta_val_rmse: float
    epochs: int
    parameters: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def residual_rms(model: torch.nn.Module, spins: torch.Tensor, energies: torch.Tensor, chunk: int = 2048) -> float:
    """RMS of (E_eff - E) after removing its mean (a constant offset does not matter to SLMC)."""
    with torch.no_grad():
        pred = torch.cat([model(spins[i:i + chunk]) for i in range(0, len(spins), chunk)])
    r = pred - energies
    return float((r - r.mean()).pow(2).mean().sqrt())


def split_indices(n: int, val_fraction: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=generator)
    n_val = max(1, int(round(val_fraction * n))) if n > 1 else 0
    return perm[n_val:], perm[:n_val]


def fit_linear(model: LinearEffectiveModel, spins: torch.Tensor, energies: torch.Tensor, beta: float,
               val_fraction: float, generator: torch.Generator) -> FitReport:
    train_idx, val_idx = split_indices(len(spins), val_fraction, generator)
    model.fit(spins[train_idx], energies[train_idx])
    # the final couplings use all configurations (the split only measures the error)
    train_rmse = residual_rms(model, spins[train_idx], energies[train_idx])
    val_rmse = residual_rms(model, spins[val_idx], energies[val_idx]) if len(val_idx) else float("nan")
    model.fit(spins, energies)
    return FitReport(train_rmse, val_rmse, beta * val_rmse, 0, sum(p.numel() for p in model.parameters()))


def fit_transformer(model: EquivariantTransformer, spins: torch.Tensor, energies: torch.Tensor, beta: float,
                    val_fraction: float, generator: torch.Generator, epochs: int = 300, lr: float = 1e-2,
                    weight_decay: float = 0.0, batch_size: int = 256, patience: int = 50,
                    progress: Optional[Callable[[int, float, float], None]] = None) -> FitReport:
    """Train ``model`` (readout initialised from a least-squares linear fit on the training
    split) and leave it at the epoch with the lowest validation error."""
    train_idx, val_idx = split_indices(len(spins), val_fraction, generator)
    linear = LinearEffectiveModel(model.L, model.n_shells)
    linear.fit(spins[train_idx], energies[train_idx])
    model.init_from_linear(linear)
    # energies are learnt as deviations from their training mean, in units of their spread
    x_train, y_train = spins[train_idx], energies[train_idx]
    x_val, y_val = spins[val_idx], energies[val_idx]
    scale = float(y_train.std()) if len(y_train) > 1 else 1.0
    scale = scale if scale > 0 else 1.0
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    # the readout already sits at a least-squares optimum: give it a smaller step than the layers
    best_state, best_val, since_best = copy.deepcopy(model.state_dict()), _mse(model, x_val, y_val), 0
    epoch = 0
    for epoch in range(1, int(epochs) + 1):
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            optimiser.zero_grad()
            loss = ((model(x_train[idx]) - y_train[idx]) / scale).pow(2).mean()
            loss.backward()
            optimiser.step()
        val = _mse(model, x_val, y_val)
        if progress is not None:
            progress(epoch, math.sqrt(val), beta * math.sqrt(val))
        if val < best_val:
            best_val, best_state, since_best = val, copy.deepcopy(model.state_dict()), 0
        else:
            since_best += 1
            if since_best >= patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    train_rmse = residual_rms(model, x_train, y_train)
    val_rmse = residual_rms(model, x_val, y_val) if len(val_idx) else float("nan")
    return FitReport(train_rmse, val_rmse, beta * val_rmse, epoch, sum(p.numel() for p in model.parameters()))


def _mse(model: torch.nn.Module, spins: torch.Tensor, energies: torch.Tensor) -> float:
    if len(spins) == 0:
        return float("inf")
    with torch.no_grad():
        r = model(spins) - energies
    return float((r - r.mean()).pow(2).mean())
