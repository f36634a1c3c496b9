"""Fitting effective models to configurations with exact energies.

All models of a run see the same train/validation split (:func:`split_indices` with a seed of
its own), so their validation errors compare like with like.

The linear model is solved by least squares. A transformer starts either from that solution
(its readout holds the linear couplings; its value weights start at ``init_value``, 0 by
default, which makes it exactly the linear model at the start) or, when grown, from a trained
shallower transformer (:meth:`EquivariantTransformer.grow_from`: same function at the start).
It is trained with AdamW (learning rate rising linearly over ``warmup`` epochs, then
decaying from ``lr`` to lr/100 over ``epochs`` on a cosine; the readout's E_0 and J_n, small numbers already at a least-squares optimum, with
``readout_lr`` times that rate) on the mean squared error of E_eff - E over the training
split, and left at the epoch with the lowest validation error, the starting point included
(early stopping after ``patience`` epochs without improvement). So a fit never ends worse on the validation split
than where it started. Everything is float64 and draws its mini-batch order from the generator
passed in, so a fit is reproducible.

What SLMC needs is β (E_eff - E) to vary little between configurations: a constant offset costs
nothing, so errors are reported as the RMS of the residual after removing its mean, times β
(``beta_val_rmse``): about the spread of the log acceptance ratio between two independent
configurations, divided by √2.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from functools import partial
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
    start_beta_val_rmse: float = math.nan  # where the fit started (linear or shallower model)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def residual_rms(model: torch.nn.Module, spins: torch.Tensor, energies: torch.Tensor, chunk: int = 2048) -> float:
    """RMS of (E_eff - E) after removing its mean (a constant offset does not matter to SLMC)."""
    if len(spins) == 0:
        return math.nan
    with torch.no_grad():
        pred = torch.cat([model(spins[i:i + chunk]) for i in range(0, len(spins), chunk)])
    r = pred - energies
    return float((r - r.mean()).pow(2).mean().sqrt())


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) indices of n configurations: a permutation drawn from ``seed``."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    n_val = min(max(1, int(round(val_fraction * n))), n - 1) if n > 1 else 0
    return perm[n_val:], perm[:n_val]


def fit_linear(model: LinearEffectiveModel, spins: torch.Tensor, energies: torch.Tensor, beta: float,
               split: tuple[torch.Tensor, torch.Tensor]) -> FitReport:
    """Least squares on the training split; errors on both splits."""
    train_idx, val_idx = split
    model.fit(spins[train_idx], energies[train_idx])
    train_rmse = residual_rms(model, spins[train_idx], energies[train_idx])
    val_rmse = residual_rms(model, spins[val_idx], energies[val_idx])
    return FitReport(train_rmse, val_rmse, beta * val_rmse, 0, sum(p.numel() for p in model.parameters()))


def fit_transformer(model: EquivariantTransformer, spins: torch.Tensor, energies: torch.Tensor, beta: float,
                    split: tuple[torch.Tensor, torch.Tensor], generator: torch.Generator, epochs: int = 300,
                    lr: float = 1e-2, weight_decay: float = 0.0, batch_size: int = 256, patience: int = 50,
                    init_readout: bool = True, readout_lr: float = 0.01, warmup: int = 10,
                    progress: Optional[Callable[[int, float, float], None]] = None) -> FitReport:
    """Train ``model`` and leave it at the epoch with the lowest validation error.
    ``init_readout``: set the readout to the least-squares linear model of the training split
    first (off for a model grown from a trained one)."""
    train_idx, val_idx = split
    x_train, y_train = spins[train_idx], energies[train_idx]
    x_val, y_val = spins[val_idx], energies[val_idx]
    if init_readout:
        linear = LinearEffectiveModel(model.L, model.n_shells)
        linear.fit(x_train, y_train)
        model.init_from_linear(linear)
    # energies are learnt in units of their spread over the training split
    scale = float(y_train.std()) if len(y_train) > 1 else 1.0
    scale = scale if scale > 0 else 1.0
    # Adam moves every weight by about lr per step whatever its size: the readout couplings are
    # ~0.01-0.1 and sit at a least-squares optimum, so they get readout_lr x lr
    readout = list(model.readout.parameters())
    layers = [p for n, p in model.named_parameters() if not n.startswith("readout.")]
    optimiser = torch.optim.AdamW([{"params": layers}, {"params": readout, "lr": lr * readout_lr}], lr=lr,
                                  weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, partial(_lr_factor, epochs=int(epochs), warmup=warmup))
    best_val = _mse(model, x_val, y_val)
    start = beta * math.sqrt(best_val)
    best_state, since_best = copy.deepcopy(model.state_dict()), 0
    epoch = 0
    for epoch in range(1, int(epochs) + 1):
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        for begin in range(0, len(order), batch_size):
            idx = order[begin:begin + batch_size]
            optimiser.zero_grad()
            loss = ((model(x_train[idx]) - y_train[idx]) / scale).pow(2).mean()
            loss.backward()
            optimiser.step()
        schedule.step()
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
    val_rmse = residual_rms(model, x_val, y_val)
    return FitReport(train_rmse, val_rmse, beta * val_rmse, epoch, sum(p.numel() for p in model.parameters()), start)


def _lr_factor(epoch: int, epochs: int, warmup: int) -> float:
    """Learning-rate factor after ``epoch`` epochs: a linear rise over ``warmup`` epochs (the
    first steps of Adam move every weight by ~lr at once, which throws a model that starts at a
    good fit off it), then a cosine from 1 to 0.01 over ``epochs``."""
    rise = min(1.0, (epoch + 1) / warmup) if warmup > 0 else 1.0
    return rise * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(epoch, epochs) / max(epochs, 1))))


def _mse(model: torch.nn.Module, spins: torch.Tensor, energies: torch.Tensor) -> float:
    """Mean squared residual after removing its mean (inf without configurations)."""
    if len(spins) == 0:
        return math.inf
    with torch.no_grad():
        r = model(spins) - energies
    return float((r - r.mean()).pow(2).mean())
