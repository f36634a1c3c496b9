"""Checkpoint -> self-contained model file.

A torchmdx training checkpoint (Lightning ``.ckpt``) holds the ``model:`` hyper-parameters in
``hyper_parameters["model"]``, the EMA weights and the energy normalisation buffers in
``state_dict`` (keys ``model.*``; the EMA callback moves the raw training weights to
``current_model_state``). :func:`export_checkpoint` rebuilds the potential from these and writes
it with :func:`torchmdx.nn.save_potential` (hyper-parameters, weights, normalisation, elements,
cutoff, version), which :func:`torchmdx.load_model` reads without the config.

A TorchMD-NET checkpoint is converted through :func:`torchmdx.nn.import_torchmdnet`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

from torchmdx.errors import ModelError

PREFIX = "model."


def read_checkpoint(path: Union[str, Path]) -> dict:
    """The checkpoint dict (tensors on the CPU); one-line ModelError for a missing or unreadable file."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling problem means a bad file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{path}: not a readable checkpoint ({first})") from None


def is_torchmdx_checkpoint(payload) -> bool:
    hp = payload.get("hyper_parameters") if isinstance(payload, dict) else None
    return isinstance(hp, dict) and isinstance(hp.get("model"), dict) and isinstance(payload.get("state_dict"), dict) \
        and any(k.startswith(PREFIX) for k in payload["state_dict"])


def potential_from_checkpoint(path: Union[str, Path], ema: bool = True):
    """The potential stored in a checkpoint: EMA weights (``ema=True``, the checkpoint's
    ``state_dict``) or the raw training weights (``current_model_state``, when EMA was used)."""
    from torchmdx.nn.model_file import build_model, load_model

    path = Path(path)
    try:
        payload = read_checkpoint(path)
    except ModelError:
        if not path.is_file():
            raise
        try:  # a TorchMD-NET checkpoint that needs the importer's own unpickling
            return load_model(path)
        except ModelError:
            pass
        raise
    if not is_torchmdx_checkpoint(payload):
        if isinstance(payload, dict) and "hyper_parameters" in payload:
            return load_model(path)  # TorchMD-NET checkpoint: imported by torchmdx.nn
        raise ModelError(f"{path}: not a torchmdx training checkpoint (no model hyper-parameters and weights)")
    states = payload["state_dict"]
    if not ema:
        if "current_model_state" not in payload:
            raise ModelError(f"{path}: the checkpoint has no separate training weights (trained without EMA)")
        states = payload["current_model_state"]
    weights = {k[len(PREFIX):]: v for k, v in states.items() if k.startswith(PREFIX)}
    try:
        potential = build_model(dict(payload["hyper_parameters"]["model"]))  # any architecture
    except Exception as exc:  # noqa: BLE001 - TorchmdxError subclasses or bad hparams
        raise ModelError(f"{path}: cannot rebuild the model from its hyper-parameters: {exc}") from None
    missing, unexpected = potential.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ModelError(f"{path}: weights do not fit the model (missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]})")
    return potential.eval()


def export_checkpoint(checkpoint: Union[str, Path], output: Union[str, Path], ema: bool = True):
    """Write the model of ``checkpoint`` to ``output`` (atomic); returns the potential."""
    from torchmdx.nn.model_file import save_potential

    potential = potential_from_checkpoint(checkpoint, ema=ema)
    save_potential(potential, output)
    return potential
