"""Small Lightning callbacks of a training run."""

from __future__ import annotations

import time

from lightning.pytorch.callbacks import Callback


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
