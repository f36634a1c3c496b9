"""Small Lightning callbacks of a training run: the one line per epoch, and the stop of a diverging run."""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Optional

from lightning.pytorch.callbacks import Callback, EarlyStopping
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn


class EpochSummary(Callback):
    """One line per epoch on rank 0, e.g.::

        epoch 12/200 | train: F MAE 84.1 meV/Å, E MAE 21.7 meV | val: F MAE 80.3 meV/Å, E MAE 19.2 meV | lr 0.001 | 3.1 s

    (errors of the epoch over all its structures; validation with the EMA weights)."""

    # The module logs the epoch's training errors in its own on_train_epoch_end, which Lightning
    # calls after the callbacks' hook; so the line of an epoch is printed when the next epoch
    # starts or training ends.

    def __init__(self):
        self.start = time.monotonic()
        self.pending = None

    def on_train_epoch_start(self, trainer, pl_module):
        self._flush(trainer)
        self.start = time.monotonic()

    def on_train_epoch_end(self, trainer, pl_module):
        self.pending = (trainer.current_epoch, time.monotonic() - self.start)

    def on_train_end(self, trainer, pl_module):
        self._flush(trainer)

    def _flush(self, trainer):
        if self.pending is not None and trainer.is_global_zero:
            print_line(trainer, self.line(trainer, *self.pending))
        self.pending = None

    def line(self, trainer, epoch: int, seconds: float) -> str:
        metrics = trainer.callback_metrics

        def get(key):
            value = metrics.get(key)
            return None if value is None else float(value)

        epochs = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        parts = [f"epoch {epoch + 1}{epochs}"]
        for stage in ("train", "val"):
            bits = []
            for key, label, unit in (("forces_mae", "F MAE", "meV/Å"), ("energy_mae", "E MAE", "meV")):
                value = get(f"{stage}_{key}")
                if value is not None:
                    bits.append(f"{label} {value:.4g} {unit}")
            if bits:
                parts.append(f"{stage}: " + ", ".join(bits))
        lr = get("lr")
        if lr is not None:
            parts.append(f"lr {lr:.3g}")
        parts.append(f"{seconds:.1f} s")
        return " | ".join(parts)


def print_line(trainer, line: str) -> None:
    """Print above the progress bar when there is one."""
    bar = trainer.progress_bar_callback
    if bar is not None and getattr(trainer, "enable_progress_bar", True) and hasattr(bar, "print"):
        bar.print(line)
    else:
        print(line, flush=True)


class Divergence(EarlyStopping):
    """Stop, in one line naming train.lr, a run whose monitored validation value has grown past ``factor`` times
    its first value (``train.divergence_factor``): a learning rate so large that the loss grows by orders of
    magnitude without ever turning NaN ended with a finite, huge best value and a useless model, without a word
    (round 24; NaN and infinite losses are ``train.max_nonfinite_steps``'). Lightning's ``EarlyStopping`` with its
    ``divergence_threshold`` set to ``factor`` × the first value seen: that of the sanity check before training
    (the untrained model on its first validation batches), else the first epoch's. The first value is kept in
    the checkpoint, so a resumed run compares with the same one."""

    def __init__(self, monitor: str, factor: float):
        super().__init__(monitor=monitor, mode="min", patience=sys.maxsize, check_finite=False, strict=False,
                         verbose=False, check_on_train_epoch_end=False)
        self.factor = float(factor)
        self.reference: Optional[float] = None
        self.reference_from = ""

    @property
    def state_key(self) -> str:  # beside early stopping on the same metric
        return self._generate_state_key(monitor=self.monitor, mode=self.mode, divergence=True)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "reference": self.reference, "reference_from": self.reference_from}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._set_reference(state_dict.get("reference"), state_dict.get("reference_from", ""))

    def _set_reference(self, value, where: str) -> None:
        if value is not None and math.isfinite(value) and value > 0:
            self.reference, self.reference_from = float(value), where
            self.divergence_threshold = self.factor * self.reference

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.reference is None:
            value = trainer.callback_metrics.get(self.monitor)
            if value is not None and trainer.state.fn == TrainerFn.FITTING:
                self._set_reference(float(value), "before training" if trainer.sanity_checking else
                                    f"epoch {trainer.current_epoch + 1}")
            return
        super().on_validation_end(trainer, pl_module)
        if self.stopping_reason == EarlyStoppingReason.DIVERGENCE_THRESHOLD:
            trainer.should_stop = False
            current = float(trainer.callback_metrics[self.monitor])
            pl_module._diverged(f"{self.monitor} grew from {self.reference:.4g} ({self.reference_from}) to "
                                f"{current:.4g}, more than train.divergence_factor ({self.factor:g}) times its first "
                                "value")


class BesideTargetCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` writing each checkpoint beside its target, then renaming it there (round 39).

    Lightning's own save (``_atomic_save``, fsspec's transaction) wrote the bytes to a file in the system temporary
    folder (``$TMPDIR``, ``/tmp``) and moved that onto ``last.ckpt`` / ``best.ckpt``: where the run folder is on
    another file system (a scratch or network disk, the usual cluster set-up), the move is a copy, and a run killed
    during it (Ctrl-C, SIGTERM of a job's time limit) left a ``last.ckpt`` cut short (``--resume`` then refused it);
    a full or missing temporary folder failed the run at its first checkpoint with a traceback while the run folder
    had room. Here the bytes go to ``<name>.tmp-<pid>`` in the checkpoint folder and ``os.replace`` puts them in place
    (:func:`torchmdx.io_utils.atomic_write`, the project's rule): a write cut short leaves the old file whole and
    removes its temporary one. A module-level class, so that a Trainer spawning its processes can pickle it."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        import io

        import torch
        from lightning.fabric.utilities.cloud_io import get_filesystem

        from torchmdx.io_utils import atomic_write

        if type(get_filesystem(path)).__name__ != "LocalFileSystem" or storage_options is not None:
            return super().save_checkpoint(checkpoint, path, storage_options)  # remote: Lightning's own way
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)  # as Lightning: the whole checkpoint is built before the file is touched
        os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
        with atomic_write(path, "wb") as handle:
            handle.write(buffer.getbuffer())


def beside_target_checkpoint_io() -> BesideTargetCheckpointIO:
    """The checkpoint writer of a training run's Trainer (:class:`BesideTargetCheckpointIO`)."""
    return BesideTargetCheckpointIO()
