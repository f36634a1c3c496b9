"""Device names a user gives (``--device``, ``device=``, ``trainer.accelerator``), checked before
any work starts: one line naming what was asked and what exists here."""

from __future__ import annotations

from torchmdx.errors import ConfigError


def check_device(device, what: str = "device"):
    """A ``torch.device`` that exists on this machine; one-line ConfigError otherwise (``what``:
    how the user gave it, e.g. ``--device``)."""
    import torch

    if isinstance(device, str) and device.strip().lower() == "gpu":
        device = "cuda"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{what} {device!r} is not a device name (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{what} {device!r}: no CUDA GPU is available here (use cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"{what} {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type not in ("cpu", "meta"):
        raise ConfigError(f"{what} {device!r}: torchmdx runs on cpu or cuda devices")
    return dev


def check_accelerator(accelerator, devices=None, what: str = "trainer.accelerator") -> None:
    """Lightning's ``accelerator`` names: ``gpu``/``cuda`` need a CUDA GPU here (and as many as
    ``devices`` asks for, when it is a count); ``cpu`` and ``auto`` always work."""
    import torch

    name = str(accelerator).lower()
    if name in ("auto", "cpu"):
        return
    if name in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"config key '{what}' is {accelerator!r} but no CUDA GPU is available here "
                              "(use cpu or auto)")
        count = devices if isinstance(devices, int) else int(devices) if isinstance(devices, str) and devices.isdigit() \
            else None
        if count is not None and count > torch.cuda.device_count():
            raise ConfigError(f"config key 'trainer.devices' asks for {count} GPUs; {torch.cuda.device_count()} here")
        return
    raise ConfigError(f"config key '{what}' is {accelerator!r}; torchmdx trains on cpu, gpu (cuda) or auto")
