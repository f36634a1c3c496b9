"""Model files: save / load any registered :class:`~torchmdx.nn.base.Potential`, build from a config.

A model file is one ``torch.save`` dict (read back with ``weights_only=True``: no pickled code)::

    format            "torchmdx-model"
    format_version    1
    kind              registry key of the potential class ("et", "equiformer", "lennard_jones", ...)
    hparams           constructor arguments, plain Python (for ET: the ModelConfig as a dict)
    state_dict        weights and buffers (for ET also the normalisation buffers)
    normalisation     human-readable copy of the energy normalisation (eV), if the class has one
    elements          atomic numbers the model accepts (None: any)
    cutoff            interaction range (Å)
    dtype             parameter dtype when saved
    torchmdx_version  version that wrote the file
    training          (optional) the run that trained it: run folder, data, a digest of its split
                      (:mod:`torchmdx.train.provenance`); absent in files of other origins and older ones.
                      :func:`load_model` keeps it as the potential's ``training_record`` attribute, and
                      :meth:`Potential.save` writes that back (a model loaded from a run and saved again
                      keeps its run; set the attribute to None before saving a model trained further)

It is written to a temporary name and renamed (:func:`torchmdx.io_utils.atomic_write`).

Registering a potential class
-----------------------------
A class can be saved and loaded when it has a class attribute ``kind`` (a unique string), a
method ``hparams() -> dict`` returning plain Python (numbers, strings, lists, dicts) and a
constructor accepting those as keyword arguments (or a classmethod ``from_hparams(dict)``).
Register it with the decorator::

    from torchmdx.nn.model_file import register_potential

    @register_potential
    class MyPotential(Potential):
        kind = "my_potential"
        ...

or lazily, without importing the module up front, with ``register_potential("my_kind",
"package.module:ClassName")``. The analytic potentials of :mod:`torchmdx.nn.analytic` (its
``ANALYTIC_KINDS``) are found automatically.
"""

from __future__ import annotations

import importlib
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch

from torchmdx.dtypes import torch_dtype
from torchmdx.errors import ModelError, with_article

FORMAT = "torchmdx-model"
FORMAT_VERSION = 1

#: kind -> class, or "module:attribute" for a lazily imported class
POTENTIAL_KINDS: dict[str, Any] = {
    "et": "torchmdx.nn.potential:ETPotential",
    "equiformer": "torchmdx.nn.equiformer.potential:EquiformerPotential",
    "gatr": "torchmdx.nn.gatr.potential:GATrPotential",
    "transformer": "torchmdx.nn.transformer.potential:TransformerPotential",
}
#: modules consulted for an unknown kind (their ``ANALYTIC_KINDS``/registrations)
_PROVIDER_MODULES = ("torchmdx.nn.analytic",)


def register_potential(cls_or_kind=None, target: Optional[str] = None):
    """Register a Potential class under its ``kind`` (decorator), or ``(kind, "module:Class")``."""
    if isinstance(cls_or_kind, str):
        if target is None:
            raise ModelError("register_potential(kind, 'module:Class') needs the class path")
        POTENTIAL_KINDS[cls_or_kind] = target
        return None
    cls = cls_or_kind
    kind = getattr(cls, "kind", None)
    if not isinstance(kind, str) or not kind:
        raise ModelError(f"{cls.__name__} needs a class attribute 'kind' (a string) to be registered")
    POTENTIAL_KINDS[kind] = cls
    return cls


def _resolve(entry):
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        return getattr(importlib.import_module(module), attr)
    return entry


def potential_class(kind: str):
    """The class registered for ``kind`` (one-line ModelError listing the known kinds)."""
    if kind not in POTENTIAL_KINDS:
        for name in _PROVIDER_MODULES:
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
            for k, cls in getattr(module, "ANALYTIC_KINDS", {}).items():
                POTENTIAL_KINDS.setdefault(k, cls)
    if kind not in POTENTIAL_KINDS:
        raise ModelError(f"unknown model kind {kind!r}; known kinds: {', '.join(sorted(POTENTIAL_KINDS))}")
    return _resolve(POTENTIAL_KINDS[kind])


def _plain(value, where: str):
    """Check that hparams hold only plain Python (what weights_only loading accepts)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v, where) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    raise ModelError(f"{where}: hyper-parameter value {value!r} ({type(value).__name__}) cannot be stored in a model file")


def save_potential(potential, path: Union[str, Path]) -> Path:
    """Write ``potential`` to ``path`` (see the module docstring); returns the path. The record of the run that
    trained it is the potential's ``training_record`` (plain Python; ``torchmdx.train.provenance.run_record``:
    set by export, kept by :func:`load_model`)."""
    from torchmdx import __version__
    from torchmdx.io_utils import atomic_write
    from torchmdx.nn.atoms import module_device_dtype

    if not isinstance(path, (str, os.PathLike)):  # was pathlib's TypeError
        raise ModelError(f"save: expected the path of a model file such as model.pt, got {path!r} "
                         f"({type(path).__name__})")
    if not os.fspath(path).strip():  # '' was ": is a folder" (Path('') is the current folder); ' ' a file named ' '
        raise ModelError(f"save: the path is empty ({os.fspath(path)!r}); give a file name such as model.pt")
    from torchmdx.io_utils import expand_home, names_a_folder

    path = expand_home(path)  # save('~/m.pt') wrote into a folder named '~' in the current folder
    if (problem := names_a_folder(path, "model.pt")) and not Path(path).is_dir():
        raise ModelError(f"{os.fspath(path)}: {problem}")
    if Path(path).exists() and not Path(path).is_file():
        # a folder, device, FIFO or socket: the rename of the temporary file would replace a device
        # node (as root: /dev/null becomes a regular file) or fail with a traceback on a folder
        what = "a folder" if Path(path).is_dir() else "not a regular file (a device, pipe or socket)"
        raise ModelError(f"{path}: is {what}; give a file name such as model.pt")
    kind = getattr(potential, "kind", None)
    if not hasattr(potential, "hparams") or not isinstance(kind, str):
        raise ModelError(
            f"{type(potential).__name__} cannot be saved: it needs a 'kind' attribute and an hparams() method"
        )
    if kind not in POTENTIAL_KINDS:
        register_potential(type(potential))
    _, dtype = module_device_dtype(potential)
    elements = getattr(potential, "elements", None)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "hparams": _plain(potential.hparams(), f"{kind}.hparams"),
        "state_dict": {k: v.detach().cpu() for k, v in potential.state_dict().items()},
        "normalisation": potential.normalisation() if hasattr(potential, "normalisation") else None,
        "elements": list(elements) if elements is not None else None,
        "cutoff": float(potential.cutoff),
        "dtype": str(dtype).replace("torch.", ""),
        "torchmdx_version": __version__,
    }
    training = getattr(potential, "training_record", None)
    if training is not None:
        payload["training"] = _plain(dict(training), "training record")
    path = Path(path)
    with atomic_write(path) as handle:
        torch.save(payload, handle)
    return path


def read_training_record(path: Union[str, Path]) -> Optional[dict]:
    """The ``training`` record of a model file (the run that trained it), or None where it holds none (a model
    file written before torchmdx recorded it, by ``Potential.save``, an imported or analytic model, or a record
    without its split digest). This reads the file again: a caller that loads the model too takes the record from
    the model :func:`load_model` returns (its ``training_record``)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - load_model names what the file is
        return None
    return _training_record(payload)


def _training_record(payload) -> Optional[dict]:
    """The ``training`` record of a loaded model file's payload (see :func:`read_training_record`), or None."""
    record = payload.get("training") if isinstance(payload, Mapping) else None
    if not isinstance(record, Mapping) or not isinstance(record.get("split"), str):
        return None
    return dict(record)


def _looks_like_torchmdnet(obj) -> bool:
    return isinstance(obj, Mapping) and "hyper_parameters" in obj and "state_dict" in obj


def load_model(
    path: Union[str, Path],
    device: Union[str, torch.device, None] = None,
    dtype: Union[str, torch.dtype, None] = None,
):
    """Read a model file written by :meth:`Potential.save` (or import a TorchMD-NET ``.ckpt``).

    ``device`` ('cpu', 'cuda', ...) and ``dtype`` ('float32'/'float64' or a torch dtype) move
    the model after loading; it is returned in eval mode, with the file's ``training`` record (as
    :func:`read_training_record` gives it) as its ``training_record`` attribute (None: no record; an imported
    TorchMD-NET checkpoint has none). One read of the file: it is opened once, ``torch.load`` reads it once and
    the CRC-32 check reads the same open file (``torchmdx evaluate`` read it a second time for the record).
    """
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():  # Path(None): a TypeError traceback
        if isinstance(path, torch.nn.Module):  # its repr, dozens of lines, was the message
            hint = "; it is a model already: use it as it is, e.g. Calculator(model) or model.predict(atoms)" \
                if hasattr(path, "atomic_energies") else ""
            raise ModelError(f"load_model: expected the path of a model file, got a torch module "
                             f"({type(path).__name__}){hint}")
        shown = repr(path)
        if "\n" in shown or len(shown) > 80:  # an array or a list of them: one line, not its whole repr
            shown = f"a {type(path).__name__}"
        raise ModelError(f"load_model: expected the path of a model file, got {shown}")
    from torchmdx.io_utils import expand_home

    path = Path(expand_home(path))  # load_model('~/m.pt') was "model file not found"
    if device is not None:
        from torchmdx.devices import check_device

        check_device(device, "device")  # before reading anything
    if not path.is_file():
        from torchmdx.io_utils import missing_file_reason

        raise ModelError(f"{path}: {missing_file_reason(path, 'model file')}")
    try:
        handle = open(path, "rb")
    except OSError as exc:  # unreadable (permissions): is_file() above was true
        raise ModelError(f"{path}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    with handle:
        try:
            with warnings.catch_warnings():  # torch's notes on foreign pickles: the error below says it all
                warnings.simplefilter("ignore")
                payload = torch.load(handle, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling problem is a bad file
            payload, failure = None, exc
        else:
            failure = None
            handle.seek(0)
            damaged = damaged_archive_member(handle)  # the CRC-32 check reads the open file again, not a new one
    if failure is not None:
        if path.suffix == ".ckpt" and path.stat().st_size > 0:
            from torchmdx.nn.torchmdnet_import import import_torchmdnet

            return _finish(import_torchmdnet(path), device, dtype)
        raise ModelError(f"{path}: {_what_file_is_this(path, failure)}") from None
    if damaged:
        raise ModelError(f"{path}: the file is damaged: {damaged} (bytes changed after it was written); copy it "
                         "again, or export the model again")
    if _is_torchmdx_training_checkpoint(payload):
        raise ModelError(f"{path}: this is a torchmdx training checkpoint, not a model file: write one with "
                         f"`torchmdx export {path} -o model.pt`, or continue training with `torchmdx train CONFIG --resume`")
    if _looks_like_torchmdnet(payload):
        from torchmdx.nn.torchmdnet_import import import_torchmdnet

        return _finish(import_torchmdnet(path), device, dtype)
    if not isinstance(payload, Mapping) or payload.get("format") != FORMAT:
        raise ModelError(f"{path}: not a torchmdx model file (no '{FORMAT}' header)")
    _check_payload(path, payload)
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise ModelError(
            f"{path}: model file format {payload['format_version']} is newer than this torchmdx reads ({FORMAT_VERSION}); upgrade torchmdx"
        )
    kind = payload.get("kind")
    cls = potential_class(kind)
    hparams = dict(payload.get("hparams") or {})
    try:
        potential = cls.from_hparams(hparams) if hasattr(cls, "from_hparams") else cls(**hparams)
    except TypeError as exc:
        raise ModelError(f"{path}: cannot rebuild a {kind!r} model from its hyper-parameters: {exc}") from None
    expected = potential.state_dict()
    for name, value in payload["state_dict"].items():
        # load_state_dict copies an integer (or bool, complex) tensor into a float weight without a word:
        # small weights truncated to 0, a model of zero energies and forces
        if name in expected and expected[name].is_floating_point() and (
                not torch.is_tensor(value) or not value.is_floating_point()):
            got = str(value.dtype).replace("torch.", "") if torch.is_tensor(value) else type(value).__name__
            raise ModelError(f"{path}: weight '{name}' is {got}, expected floating-point numbers (damaged or edited?)")
    try:
        missing, unexpected = potential.load_state_dict(payload["state_dict"], strict=False)
    except RuntimeError as exc:
        detail = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc).splitlines()[0])
        raise ModelError(f"{path}: weights do not fit the {kind!r} model ({detail})") from None
    if missing or unexpected:
        raise ModelError(
            f"{path}: weights do not fit the {kind!r} model (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    # weights, and the buffers of learned models (normalisation: scale, shift, atomref; a NaN there gave
    # NaN energies silently); analytic potentials mark undefined element pairs with NaN buffers
    from torchmdx.nn.analytic import ANALYTIC_KINDS

    tensors = list(potential.named_parameters())
    if type(potential) not in ANALYTIC_KINDS.values():
        tensors += [(name, value) for name, value in potential.named_buffers() if value.is_floating_point()]
    bad = [name for name, value in tensors if not bool(torch.isfinite(value).all())]
    if bad:
        raise ModelError(f"{path}: {len(bad)} weight tensors hold NaN or infinite values (e.g. {', '.join(bad[:2])}): "
                         "the model is unusable (its training diverged)")
    _check_scales(path, potential)
    # Potential.save writes it back: a model loaded from a run's model.pt and saved again dropped the record,
    # and evaluate --run could no longer check it (round 27)
    potential.training_record = _training_record(payload)
    return _finish(potential, device, dtype)


def _check_scales(path: Path, potential) -> None:
    """The normalisation scale of every normalised (sub)model must be > 0, as ``set_normalisation``
    requires: a file edited to scale 0 loaded and predicted zero energies and forces silently, a
    negative one flipped their sign."""
    from torchmdx.nn.normalised import NormalisedPotential

    for prefix, module in potential.named_modules():
        if isinstance(module, NormalisedPotential) and not float(module.scale) > 0:
            name = f"{prefix}.scale" if prefix else "scale"
            raise ModelError(f"{path}: buffer '{name}' is {float(module.scale):g}, expected a positive number (the "
                             "energy scale of the network's output; 0 gives zero energies and forces, a negative "
                             "value flips their sign): damaged or edited?")


def _check_payload(path: Path, payload: Mapping) -> None:
    """The header fields a model file must hold, of the right types (a damaged or hand-made file
    gave int()/dict()/load_state_dict tracebacks)."""
    version = payload.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise ModelError(f"{path}: format_version {version!r} is not a whole number: not a model file torchmdx wrote "
                         "(damaged or edited?)")
    kind = payload.get("kind")
    if not isinstance(kind, str):
        raise ModelError(f"{path}: the model kind {kind!r} is not a name (text such as 'et'): not a model file "
                         "torchmdx wrote (damaged or edited?)")
    hparams = payload.get("hparams")
    if hparams is not None and not isinstance(hparams, Mapping):
        raise ModelError(f"{path}: hparams is a {type(hparams).__name__}, expected a mapping of hyper-parameters "
                         "(damaged or edited?)")
    state = payload.get("state_dict")
    if not isinstance(state, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                 for k, v in state.items()):
        what = "no state_dict" if state is None else f"a state_dict that is a {type(state).__name__}"
        if isinstance(state, Mapping):
            what = "a state_dict holding values that are not named tensors"
        raise ModelError(f"{path}: {what}, expected a mapping of weight names to tensors (damaged or edited?)")


def _is_torchmdx_training_checkpoint(payload) -> bool:
    """A Lightning checkpoint of ``torchmdx train`` (model hyper-parameters and ``model.*`` weights)."""
    if not isinstance(payload, Mapping):
        return False
    hp, state = payload.get("hyper_parameters"), payload.get("state_dict")
    return isinstance(hp, Mapping) and isinstance(hp.get("model"), Mapping) and isinstance(state, Mapping) \
        and any(str(k).startswith("model.") for k in state)


def damaged_archive_member(path) -> Optional[str]:
    """What fails the CRC-32 check of a torch archive (``torch.save``'s zip; ``path`` or a binary file open at
    its start), in words, or None.
    torch.load does not check the stored checksums: bytes overwritten inside a weight tensor load
    as silently wrong weights."""
    import zipfile
    import zlib

    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except zipfile.BadZipFile:
        return None  # not a zip (an old-style torch file): nothing to check
    except (OSError, EOFError, zlib.error, ValueError) as exc:
        return f"its archive cannot be read back ({type(exc).__name__})"
    return None if bad is None else f"{bad} fails its CRC-32 checksum"


MODEL_HINT = "pass the model.pt that `torchmdx train` or `torchmdx export` writes"


def _what_file_is_this(path: Path, exc: Exception, what: str = "model file", hint: str = MODEL_HINT) -> str:
    """What an unreadable "model file" (or ``what``: "checkpoint", "MD restart file") is, in words,
    ending with ``hint`` where it helps; never torch's advice to unpickle it ("Re-running
    `torch.load` with `weights_only` set to `False` will likely succeed")."""
    import zipfile

    if what != "model file":
        text = _what_file_is_this(path, exc)  # the model file's words, then the names swapped
        if text.startswith("not a torchmdx model file ("):  # another archive (an npz, ...): torch's first line
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            return f"not a readable {what} ({first})"
        text = text.replace("a torchmdx model file", f"a torchmdx {what}").replace("a readable model file",
                                                                                    f"a readable {what}")
        text = text.replace("not a model file", f"not {with_article(what)}").replace(MODEL_HINT, hint)
        if text.startswith("a TorchScript file"):
            text = f"a TorchScript file (for example an OpenMM export), not a torchmdx {what}; {hint}"
        return text
    if path.stat().st_size == 0:
        return "the file is empty, not a model file"
    with open(path, "rb") as handle:
        head = handle.read(512)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if any("/code/" in n or n.endswith("constants.pkl") for n in names):
            return ("a TorchScript file (for example an OpenMM export), not a torchmdx model file; load it with "
                    "torch.jit.load, or pass the model.pt from `torchmdx train` / `torchmdx export`")
        return f"not a torchmdx model file (a torch archive it cannot read: {type(exc).__name__})"
    if head.startswith(b"PK\x03\x04"):
        return ("a torch archive that ends early or is damaged (no readable zip directory: an interrupted copy or "
                "save?), not a readable model file")
    if head[:1] == b"\x80":
        return "a pickled Python object, not a torchmdx model file (torchmdx does not unpickle arbitrary objects)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or "\x00" in text:
        return "not a torchmdx model file (unknown binary content)"
    kind = "a YAML config" if ":" in text.split("\n", 1)[0] else "a text file"
    return f"{kind}, not a model file; {MODEL_HINT}"


def _finish(potential, device, dtype):
    if dtype is not None:
        # the names and dtypes of torchmdx.dtypes (float16 ran unchecked, int32 was nn.Module.to's traceback)
        potential = potential.to(dtype=torch_dtype(dtype, error=ModelError))
    if device is not None:
        potential = potential.to(device=device)
    return potential.eval()


def build_model(config: Union[Mapping, str, Path, None] = None, **overrides):
    """A new (untrained) potential from a config: a dict, a YAML path (``model:`` section or a
    bare mapping), a typed model config, or None (TorchMD-NET's ET MD17 defaults).
    ``architecture`` (``et`` by default, ``equiformer``; :data:`torchmdx.nn.config.ARCHITECTURES`)
    or ``kind`` (any registered potential, e.g. ``lennard_jones``) picks the class; the other keys
    are its hyper-parameters (ET: :class:`ModelConfig`, Equiformer: ``EquiformerConfig``)."""
    from torchmdx.config import load_yaml
    from torchmdx.nn.config import check_architecture

    if hasattr(config, "to_dict") and not isinstance(config, Mapping):
        values = config.to_dict()
    elif isinstance(config, (str, Path)):
        data = load_yaml(config)
        values = data["model"] if isinstance(data.get("model"), Mapping) else data
    elif isinstance(config, Mapping):
        values = config["model"] if isinstance(config.get("model"), Mapping) else config
    elif config is None:
        values = {}
    else:
        raise ModelError(f"build_model: expected a dict, a YAML path or None, got {type(config).__name__}")
    values = dict(values)
    values.update(overrides)
    kind = values.pop("kind", None)
    if "architecture" in values:
        architecture = check_architecture(values["architecture"])
        if kind is not None and kind != architecture:
            raise ModelError(f"model: 'kind' {kind!r} and 'architecture' {architecture!r} disagree; give one of them")
        kind = architecture
        if architecture == "et":  # the ET's config has no architecture key (its default)
            values.pop("architecture")
    kind = kind or "et"
    cls = potential_class(kind)
    if hasattr(cls, "from_hparams"):
        return cls.from_hparams(values)
    try:
        return cls(**values)
    except TypeError as exc:
        raise ModelError(f"model kind {kind!r}: {exc}") from None
