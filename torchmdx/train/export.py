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

import warnings
from pathlib import Path
from typing import Optional, Union

from torchmdx.errors import ModelError, with_article

PREFIX = "model."
#: what a refused checkpoint's message points to
CHECKPOINT_HINT = "pass a checkpoint of `torchmdx train` (e.g. RUN_DIR/checkpoints/best.ckpt)"


def read_checkpoint(path: Union[str, Path]) -> dict:
    """The checkpoint dict (tensors on the CPU); one-line ModelError for a missing or unreadable file."""
    import torch

    path = Path(path)
    if path.is_dir():  # a run folder was "runs/t: checkpoint not found", though it is there, holding them
        found = sorted({*path.glob("*.ckpt"), *path.glob("checkpoints/*.ckpt")}, key=lambda p: (len(p.parts), p.name))
        if found:
            names = ", ".join(str(p) for p in found[:3]) + (", ..." if len(found) > 3 else "")
            raise ModelError(f"{path}: is a folder, not a checkpoint; give one of its checkpoints: {names}")
        raise ModelError(f"{path}: is a folder, not a checkpoint, and holds no .ckpt file; give a checkpoint of "
                         f"`torchmdx train` (e.g. RUN_DIR/checkpoints/best.ckpt)")
    if not path.is_file():
        raise ModelError(f"{path}: checkpoint not found")
    try:
        # torch's notes (a TorchScript archive "dispatching to torch.jit.load", foreign pickles) printed a
        # "warning:" line above the one error line; the error says what the file is
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling problem means a bad file
        from torchmdx.nn.model_file import _what_file_is_this

        # was torch's own message: for a YAML config, its advice to load with weights_only=False
        raise ModelError(f"{path}: {_what_file_is_this(path, exc, 'checkpoint', CHECKPOINT_HINT)}") from None
    from torchmdx.nn.model_file import damaged_archive_member

    damaged = damaged_archive_member(path)  # torch.load reads overwritten bytes as silently wrong weights
    if damaged:
        raise ModelError(f"{path}: the checkpoint is damaged: {damaged} (bytes changed after it was written)")
    return payload


def is_torchmdx_checkpoint(payload) -> bool:
    hp = payload.get("hyper_parameters") if isinstance(payload, dict) else None
    return isinstance(hp, dict) and isinstance(hp.get("model"), dict) and isinstance(payload.get("state_dict"), dict) \
        and any(k.startswith(PREFIX) for k in payload["state_dict"])


def potential_from_checkpoint(path: Union[str, Path], ema: bool = True):
    """The potential stored in a checkpoint: EMA weights (``ema=True``, the checkpoint's
    ``state_dict``) or the raw training weights (``current_model_state``, when EMA was used).
    Its ``training_record`` is the run record the checkpoint holds
    (:func:`torchmdx.train.provenance.stored_run_record`; None for older checkpoints), as :func:`load_model`
    keeps a model file's: :func:`export_checkpoint` writes it without reading the file again."""
    from torchmdx.nn.model_file import FORMAT, build_model, load_model

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
        if isinstance(payload, dict) and payload.get("format") == FORMAT:
            # was "not a torchmdx training checkpoint (no model hyper-parameters and weights)": a model file
            # holds both, and is what export would write (round 23)
            raise ModelError(f"{path}: is a torchmdx model file already ({payload.get('kind', 'a model')}), not a "
                             "training checkpoint; use it as it is (torchmdx md --model, torchmdx evaluate, "
                             f"Calculator(\"{path}\")), or copy it; export writes a model file from a checkpoint "
                             "(e.g. RUN_DIR/checkpoints/best.ckpt)")
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
    from torchmdx.train.provenance import stored_run_record

    potential.training_record = stored_run_record(payload)
    return potential.eval()


def export_checkpoint(checkpoint: Union[str, Path], output: Union[str, Path], ema: bool = True,
                      force: bool = False, training: Optional[dict] = None):
    """Write the model of ``checkpoint`` to ``output`` (atomic); returns the potential.

    The model file records the run that trained it (``training``, else the record the checkpoint holds, else the
    run folder the checkpoint lies in, ``RUN/checkpoints/x.ckpt``: as
    :func:`torchmdx.train.provenance.checkpoint_run_record`, from the one read of the checkpoint), which
    ``evaluate --run`` compares with its run's split; an older checkpoint outside a run folder gives a file
    without the record.

    Refused in one line (:class:`ModelError`), before anything is written: ``output`` is the
    checkpoint itself, a folder, an existing file (unless ``force``), or not named ``.pt``/``.pth``
    (:data:`TORCH_SUFFIXES`: ``-o model.xyz`` would put a torch file under an XYZ name); the weights hold NaN or
    infinite values (a diverged run: such a model would predict NaN)."""
    from torchmdx.nn.model_file import save_potential

    check_output_file(output, force=force, inputs=[checkpoint], what="model file", suffixes=TORCH_SUFFIXES)
    potential = potential_from_checkpoint(checkpoint, ema=ema)
    check_finite_weights(potential, checkpoint)
    if training is None:  # the checkpoint's own record (kept by potential_from_checkpoint), else its run folder's
        training = getattr(potential, "training_record", None)
        if training is None:
            from torchmdx.train.provenance import folder_run_record

            training = folder_run_record(checkpoint)
    if training is not None:
        potential.training_record = dict(training)  # what save_potential writes
    save_potential(potential, output)
    return potential


#: the names a torch file (a model file, an OpenMM module) may be written under
TORCH_SUFFIXES = (".pt", ".pth")

#: extensions that name a format other than a torch file (``export -o``'s line names it)
OTHER_FORMATS = {".extxyz": "an extended-XYZ file", ".xyz": "an XYZ file", ".traj": "an ASE trajectory",
                 ".pdb": "a PDB structure", ".cif": "a CIF structure", ".csv": "a CSV table", ".json": "JSON",
                 ".yaml": "a YAML config", ".yml": "a YAML config", ".npz": "a numpy archive", ".h5": "an HDF5 file",
                 ".hdf5": "an HDF5 file", ".db": "an ASE database", ".png": "an image", ".txt": "a text file"}


def check_output_file(output: Union[str, Path], force: bool = False, inputs=(), what: str = "output",
                      suffixes: tuple = ()) -> Path:
    """One-line ModelError unless ``output`` can be written: not one of ``inputs``, not a folder,
    not an existing file (unless ``force``), in an existing, writable folder; with ``suffixes``
    (``export``: ``(".pt", ".pth")``), named with one of them (any case)."""
    import os

    from torchmdx.io_utils import names_a_folder

    out = Path(output)
    if str(output).strip() == "":
        raise ModelError(f"the {what} name is empty; give a file name such as model.pt")
    if (problem := names_a_folder(output, "model.pt")) and not out.is_dir():
        raise ModelError(f"{output}: {problem}")
    for given in inputs:
        if Path(given).exists() and out.exists() and out.resolve() == Path(given).resolve():
            raise ModelError(f"{out}: refusing to write the {what} over its own input; choose another name")
    if out.suffix.lower() == ".ckpt":  # was written: a later `export model.ckpt` said "not a training checkpoint"
        raise ModelError(f"{output}: .ckpt names a training checkpoint, and this writes {with_article(what)}; give it a "
                         f".pt name, e.g. {out.with_suffix('.pt')}")
    if out.is_dir():
        raise ModelError(f"{out}: is a folder; give a file name, e.g. {out / 'model.pt'}")
    if out.exists() and not out.is_file():
        # a device, FIFO or socket (/dev/null): writing to a temporary name and renaming it onto
        # the target would replace the device node itself (as root: /dev/null becomes a file)
        raise ModelError(f"{out}: is not a regular file (a device, pipe or socket); give a file name such as model.pt")
    if suffixes and out.suffix.lower() not in suffixes:
        # `export --openmm -o om.xyz` (or `-o om`) wrote the TorchScript file under that name: ASE, md or a
        # colleague then take it for what the name says (round 20)
        suffix = out.suffix.lower()
        said = (f"{out.suffix} names {OTHER_FORMATS[suffix]}" if suffix in OTHER_FORMATS
                else f"{out.suffix} is not a torch file's extension" if suffix else "the name has no extension")
        raise ModelError(f"{output}: {said}, and this writes {with_article(what)}, a torch file; give it a "
                         f"{suffixes[0]} name, e.g. {out.with_name(out.stem + suffixes[0]) if out.stem else 'model.pt'}")
    if out.exists() and not force:
        raise ModelError(f"{out}: exists; pass --force to replace it, or choose another name")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise ModelError(f"{out}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise ModelError(f"{out}: folder {parent} is not writable")
    return out


def check_finite_weights(potential, source: Union[str, Path], consequence: str = "not exported") -> None:
    """One-line ModelError if any weight or buffer of ``potential`` holds NaN or infinity."""
    import torch

    state = potential.state_dict()
    bad = [name for name, value in state.items()
           if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all())]
    if bad:
        raise ModelError(f"{source}: {len(bad)} of {len(state)} weight tensors hold NaN or infinite values "
                         f"(e.g. {', '.join(bad[:2])}): the training diverged; {consequence}")
