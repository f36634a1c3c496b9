"""Exponential moving average of the weights: Lightning's ``WeightAveraging`` callback with a
warmed-up decay.

After the n-th update (n = 0, 1, ...; the first one copies the weights)::

    θ_ema ← d_n θ_ema + (1 − d_n) θ,      d_n = min(decay, (1 + n) / (10 + n))

so early in training the average follows the weights closely instead of being dominated by the
random initialisation (with a fixed d = 0.99 the first 100 steps would hardly move it).

Lightning's callback swaps the averaged weights in for validation, saves them as the checkpoint's
``state_dict`` (the training weights go to ``current_model_state``) and copies them into the
model when training ends; resuming restores both. Only parameters are averaged
(``use_buffers=False``): the buffers of a potential are its energy normalisation, which is fixed
before training (or re-fitted on the averaged model, see :class:`torchmdx.train.PotentialModule`).
"""

from __future__ import annotations

from typing import Optional

import torch
from lightning.pytorch.callbacks import WeightAveraging


def warmed_up_decay(decay: float, num_averaged: torch.Tensor | int) -> torch.Tensor | float:
    """d_n = min(decay, (1 + n) / (10 + n))."""
    if torch.is_tensor(num_averaged):
        n = num_averaged.to(torch.float64)
        return torch.clamp((1.0 + n) / (10.0 + n), max=decay)
    return min(decay, (1.0 + num_averaged) / (10.0 + num_averaged))


class _EMAStep:
    """θ_ema + (θ − θ_ema)(1 − d_n): the ``avg_fn`` of ``AveragedModel`` (picklable for ddp_spawn)."""

    def __init__(self, decay: float):
        self.decay = decay

    def __call__(self, averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        d = warmed_up_decay(self.decay, num_averaged)
        d = d.to(device=averaged.device, dtype=averaged.dtype) if torch.is_tensor(d) else d
        return averaged + (current - averaged) * (1 - d)


class EMA(WeightAveraging):
    """EMA of the parameters, updated after every optimiser step (see the module docstring)."""

    def __init__(self, decay: float = 0.99, device: Optional[str] = None):
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        super().__init__(device=device, use_buffers=False, avg_fn=_EMAStep(self.decay))

    def should_update(self, step_idx: Optional[int] = None, epoch_idx: Optional[int] = None) -> bool:
        return step_idx is not None

    @property
    def average_model(self):
        """The ``torch.optim.swa_utils.AveragedModel`` (None before fit starts)."""
        return self._average_model
