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

A captured training step (:class:`torchmdx.train.graphed.GraphedTrainStep`) applies the same
update inside its CUDA graph (:func:`ema_update`, a few foreach kernels instead of Lightning's
per-parameter loop and its two host reads of the update count); the module then calls
:meth:`EMA.updated_elsewhere` so that the callback does not average that step a second time.
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


def ema_update(averaged: list, current: list, num_averaged: torch.Tensor, decay: float,
               skip: Optional[torch.Tensor] = None, averaged_buffers: Optional[list] = None,
               buffers: Optional[list] = None) -> None:
    """θ_ema ← θ_ema + (θ − θ_ema) w in place, w = 1 for the first update (n = 0: a copy), else
    1 − d_n; then n += 1. ``skip`` (0-d bool, e.g. a step the optimiser skipped): nothing changes.
    Buffers are copied (``use_buffers=False``). Device work only: capturable in a CUDA graph."""
    first = num_averaged == 0
    weight = torch.where(first, torch.ones_like(first, dtype=torch.float64), 1.0 - warmed_up_decay(decay, num_averaged))
    if skip is not None:
        weight = torch.where(skip, torch.zeros_like(weight), weight)
    step = torch._foreach_sub([c.detach() for c in current], [a.detach() for a in averaged])
    by_dtype: dict = {}
    for tensor in step:
        if tensor.dtype not in by_dtype:
            by_dtype[tensor.dtype] = weight.to(tensor.dtype)
        tensor.mul_(by_dtype[tensor.dtype])
    torch._foreach_add_([a.detach() for a in averaged], step)
    if buffers:
        torch._foreach_copy_([b.detach() for b in averaged_buffers], [b.detach() for b in buffers])
    increment = torch.ones_like(num_averaged) if skip is None else (~skip).to(num_averaged.dtype)
    num_averaged.add_(increment)


class EMA(WeightAveraging):
    """EMA of the parameters, updated after every optimiser step (see the module docstring)."""

    def __init__(self, decay: float = 0.99, device: Optional[str] = None):
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        super().__init__(device=device, use_buffers=False, avg_fn=_EMAStep(self.decay))

    _updated_elsewhere = False

    def setup(self, trainer, pl_module, stage: str) -> None:
        """Make the average on the device the run trains on. (Lightning's callback takes the
        module's device, but its ``setup`` hook runs before the strategy moves the module there:
        a GPU run's average would live on the CPU and copy every parameter back at every step.)"""
        if self._device is not None:
            return super().setup(trainer, pl_module, stage)
        self._device = getattr(getattr(trainer, "strategy", None), "root_device", None)
        try:
            super().setup(trainer, pl_module, stage)
        finally:
            self._device = None

    def should_update(self, step_idx: Optional[int] = None, epoch_idx: Optional[int] = None) -> bool:
        return step_idx is not None

    def updated_elsewhere(self) -> None:
        """The current optimiser step has already updated the average (a captured step)."""
        self._updated_elsewhere = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._updated_elsewhere:
            self._updated_elsewhere = False
            self._latest_update_step = trainer.global_step
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    @property
    def average_model(self):
        """The ``torch.optim.swa_utils.AveragedModel`` (None before fit starts)."""
        return self._average_model
