"""Turn what a user passes as "the model" (a Potential or a model file) into a Potential."""

from __future__ import annotations

from pathlib import Path
import torch

from torchmdx.dtypes import torch_dtype
from torchmdx.devices import check_device  # noqa: F401 - md's device check lives in the foundation
from torchmdx.errors import ModelError
from torchmdx.nn.base import Potential

def as_dtype(dtype) -> torch.dtype:
    """torch dtype from a torch dtype or its name (float32/float64; float/double too)."""
    return torch_dtype(dtype)


def potential_dtype(potential: Potential, default: torch.dtype = torch.float64) -> torch.dtype:
    """The floating dtype of a potential's parameters (or buffers); ``default`` if it has none."""
    for t in list(potential.parameters()) + list(potential.buffers()):
        if t.is_floating_point():
            return t.dtype
    return default


def check_atoms_elements(potential: Potential, atoms) -> None:
    """The elements of ``atoms`` (an ase.Atoms) against those ``potential`` knows: its one-line
    ModelError (``Potential.check_elements``) when one is unknown."""
    device = next((b.device for b in potential.buffers()), torch.device("cpu"))
    potential.check_elements(torch.as_tensor(atoms.numbers, dtype=torch.long, device=device))


def load_potential(model, device="cpu", dtype=None) -> Potential:
    """A :class:`Potential` on ``device`` (and ``dtype`` when given) from a Potential object or
    a model file written by ``Potential.save`` (read by ``torchmdx.load_model``)."""
    device = check_device(device)
    if isinstance(model, Potential):
        potential = model
    elif isinstance(model, (str, Path)):
        from torchmdx.io_utils import expand_home

        path = Path(expand_home(model))  # Calculator('~/m.pt') was "model file not found"
        if not path.is_file():
            from torchmdx.io_utils import missing_file_reason

            raise ModelError(f"{path}: {missing_file_reason(path, 'model file')}")
        from torchmdx.nn import load_model

        potential = load_model(path, device=device)
    else:
        raise ModelError(f"expected a torchmdx Potential or a model file path, got {type(model).__name__}")
    target_dtype = as_dtype(dtype) if dtype is not None else None
    if target_dtype is None:
        from torchmdx.nn.atoms import half_precision_weights

        half = half_precision_weights(potential)
        if half:  # the Calculator computed in it: energies off by percents, silently (predict refuses it)
            raise ModelError(f"the model's weights are {half}, which keep about 3 significant digits (energies off by "
                             "percents); torchmdx computes in float32 or float64: pass dtype='float32' (or convert "
                             "the model with model.float())")
    if isinstance(model, Potential) and _would_change(model, torch.device(device), target_dtype):
        # Module.to converts in place: Calculator(model, dtype="float64") turned the caller's model
        # (and an earlier Calculator sharing it, which still fed float32 positions) into float64
        import copy

        potential = copy.deepcopy(model)
    potential = potential.to(device=torch.device(device))
    if target_dtype is not None:
        potential = potential.to(dtype=target_dtype)
    return potential


def _would_change(potential: Potential, device: torch.device, dtype) -> bool:
    """Would moving ``potential`` to ``device`` (and ``dtype`` when not None) change a tensor?"""
    for t in list(potential.parameters()) + list(potential.buffers()):
        if t.device.type != device.type or (device.index is not None and t.device.index != device.index):
            return True
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            return True
    return False


def model_digest(potential: Potential) -> str:
    """A 12-digit digest of a potential's class and weights (every floating tensor as float64, so a float32 model
    and its float64 copy agree), recorded in md's restart files: a run continued with another model is refused."""
    import hashlib

    h = hashlib.sha256(type(potential).__name__.encode())
    for name, t in sorted(potential.state_dict().items()):
        if not torch.is_tensor(t):
            continue
        t = t.detach().to("cpu")
        t = t.to(torch.float64) if t.is_floating_point() else t
        h.update(name.encode())
        h.update(str(list(t.shape)).encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def check_restart_model(restart: str, payload: dict, potential: Potential, model_name: str, option: str) -> None:
    """The model of a continued run is the one its restart file was written with (files written before round 28
    record none: not checked). Another model took its first step with the saved forces of the first and appended
    its energies to the same trajectory and log, without a word."""
    from torchmdx.errors import ConfigError

    record = payload.get("model")
    if not isinstance(record, dict) or not record.get("digest"):
        return
    digest = model_digest(potential)
    if digest == record["digest"]:
        return
    raise ConfigError(
        f"{restart}: was written by a run of model {record.get('name') or '(a Python object)'} (weights digest "
        f"{record['digest']}), but {option} {model_name} is another model (digest {digest}): the continued run would "
        "take its first step with the saved forces of the first model and append the other model's energies to "
        f"that run's trajectory and log; give the model the run was made with, or start a new run from its last "
        f"frame (its trajectory as the structure, with --velocities file)"
    )
