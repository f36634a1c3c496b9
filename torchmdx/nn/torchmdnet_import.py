"""Import a TorchMD-NET equivariant-transformer checkpoint (``.ckpt``) as an :class:`ETPotential`.

TorchMD-NET (3.x) computes, for an ET with output model ``Scalar`` (which for the ET is the
gated-equivariant ``EquivariantScalar`` head), an ``Atomref`` prior and standardisation:

    y_b = reduce_a( std · head(x_a, vec_a) + atomref(z_a) ) + mean

which is exactly torchmdx's normalisation with scale = std, atomref = the prior's table,
shift = 0, energy_offset = mean (see :mod:`torchmdx.nn.potential`). Units are whatever the
checkpoint was trained in (TorchMD-NET does not convert); pass ``energy_unit`` (e.g.
'kcal/mol', 'hartree') to convert energies to eV. Without it, a checkpoint whose ``dataset`` is TorchMD-NET's
MD17, MD22 or rMD17 (kcal/mol) is converted from kcal/mol with one warning, any other is taken as eV. Lengths
must be Å (TorchMD-NET's datasets).

Supported: ``model: equivariant-transformer`` with any of its hyper-parameters (rbf type,
distance influence, neighbor embedding, vector cutoff, activations, reduce_op add/sum/mean,
precision 32/64), the heads EquivariantScalar (ET default) and a plain Scalar MLP, the
``Atomref`` prior (``enable`` honoured unless ``enable_atomref`` says otherwise), ``mean`` and
``std``. Other architectures, output models (dipole, spatial extent) and priors (ZBL, D2,
Coulomb), and ``atom_filter`` are refused with a one-line ModelError; so are hyper-parameters
that are missing or not numbers, hyper-parameters the torchmdx ET cannot take, and weights that
are not floating point or not finite (as :func:`torchmdx.nn.load_model` checks its own files).
A checkpoint trained with a fixed periodic box (``box_vecs``, which TorchMD-NET applies to every
input) is imported with one warning: torchmdx takes the cell from each structure.
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path
from typing import Mapping, Optional, Union

import torch

from torchmdx.errors import ModelError, TorchmdxError

_PRECISION = {32: "float32", 64: "float64", "32": "float32", "64": "float64"}
#: TorchMD-NET 3.0's scatter(reduce="mean") starts from zeros with include_self=True, so its
#: 'mean' is sum / (n + 1); the import reproduces that (reduce_op 'torchmdnet_mean')
_REDUCE = {"add": "sum", "sum": "sum", "mean": "torchmdnet_mean"}

#: TorchMD-NET representation keys -> torchmdx ETRepresentation keys (after the 'model.' prefix)
_RENAMES = [
    (r"^representation_model\.distance_expansion\.", "representation.rbf."),
    (r"^representation_model\.attention_layers\.", "representation.layers."),
    (r"^representation_model\.", "representation."),
    (r"^output_model\.output_network\.layers\.(\d+)\.", r"head.mlp.\1."),
    (r"^output_model\.output_network\.(\d+)\.update_net\.layers\.(\d+)\.", r"head.blocks.\1.update_net.\2."),
    (r"^output_model\.output_network\.(\d+)\.", r"head.blocks.\1."),
]
#: TorchMD-NET's own renames of older checkpoints (its load_model applies the same ones)
_LEGACY = [
    (r"output_model\.output_network\.(\d+)\.update_net\.(\d+)\.", r"output_model.output_network.\1.update_net.layers.\2."),
    (r"output_model\.output_network\.([02])\.(weight|bias)", r"output_model.output_network.layers.\1.\2"),
]


class _AttributeDict(dict):
    """Stand-in for Lightning's AttributeDict when unpickling hyper-parameters."""


def _read_checkpoint(path: Path, trusted: bool) -> Mapping:
    if not path.is_file():
        raise ModelError(f"{path}: checkpoint not found")
    # some Lightning versions store hyper-parameters as an AttributeDict (a dict subclass):
    # read it as a plain dict without importing Lightning
    safe = [(_AttributeDict, "lightning.fabric.utilities.data.AttributeDict"),
            (_AttributeDict, "pytorch_lightning.utilities.parsing.AttributeDict")]
    try:
        with torch.serialization.safe_globals(safe):
            return torch.load(path, map_location="cpu", weights_only=not trusted)
    except Exception as exc:  # noqa: BLE001
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if not trusted and ("weights_only" in str(exc) or "Unsupported global" in str(exc)):
            raise ModelError(
                f"{path}: the checkpoint holds Python objects that cannot be loaded safely ({first[:160]}); "
                f"if you trust the file, pass trusted=True"
            ) from None
        raise ModelError(f"{path}: cannot read the checkpoint ({first[:200]})") from None


def _prior_list(hparams: Mapping) -> list[tuple[str, dict]]:
    """[(name, init args)] of the checkpoint's priors, as TorchMD-NET parses ``prior_model``."""
    spec = hparams.get("prior_model")
    if not spec:
        return []
    if not isinstance(spec, list):
        spec = [spec]
    names, args = [], []
    for item in spec:
        if isinstance(item, Mapping):
            for key, value in item.items():
                names.append(str(key))
                args.append(dict(value or {}))
        else:
            names.append(str(item))
            args.append({})
    prior_args = hparams.get("prior_args")
    if prior_args is not None:
        prior_args = prior_args if isinstance(prior_args, list) else [prior_args]
        args = [dict(a or {}) for a in prior_args]
    # zip() stopped at the shorter list: prior_model [Atomref, ZBL] beside one prior_args entry dropped the ZBL
    # prior without a word (round 28); every named prior is looked at, the missing arguments empty
    args = args + [{}] * (len(names) - len(args))
    return list(zip(names, args))


_REQUIRED = object()


def _hparam(hp: Mapping, key: str, kind, path: Path, default=_REQUIRED):
    """``hp[key]`` as an int or float (``kind``); a missing key without default, or a value that is
    not a number of that kind (None, text, 1.5 for a count), is one ModelError naming the file and
    key (int()/float() tracebacks before)."""
    if key not in hp:
        if default is _REQUIRED:
            raise ModelError(f"{path}: hyper_parameters lack '{key}' (TorchMD-NET writes it for every ET); "
                             "not a complete TorchMD-NET checkpoint (damaged or edited?)")
        return default
    value = hp[key]
    try:
        if isinstance(value, bool):
            raise TypeError
        number = float(value)
        if kind is int:
            if not number.is_integer():
                raise ValueError
            return int(number)
        if not math.isfinite(number):
            raise ValueError
        return number
    except (TypeError, ValueError):
        need = "a whole number" if kind is int else "a finite number"
        raise ModelError(f"{path}: hyper-parameter '{key}' is {value!r}, expected {need}") from None


def _warn_fixed_box(path: Path, hp: Mapping, state: Mapping) -> None:
    """TorchMD-NET's ``box_vecs`` makes every input periodic in that fixed box; torchmdx takes the
    cell from each structure (``Atoms.cell``, the OpenMM box), so the imported model is periodic
    only where the structure says so: one warning line (was ignored silently)."""
    box = hp.get("box_vecs")
    buffer = state.get("representation_model.distance.box")
    if box is None and torch.is_tensor(buffer) and buffer.numel() and bool((buffer != 0).any()):
        box = buffer.tolist()
    if box is None:
        return
    warnings.warn(f"{path}: trained with TorchMD-NET's fixed periodic box box_vecs={box}, which it applies to every "
                  "input; torchmdx takes the cell from each structure, so give the structures that box (cell and "
                  "pbc) to get TorchMD-NET's energies", UserWarning, stacklevel=3)


#: TorchMD-NET datasets (the ``dataset`` hyper-parameter, lower case) whose energies it keeps in kcal/mol, as the
#: sGDML npz files hold them (its ANI, SPICE, QM9 and COMP6 classes convert to eV; Custom and HDF5 keep the user's)
_KCAL_DATASETS = ("md17", "md22", "rmd17", "revisedmd17")


def _dataset_energy_unit(path: Path, hp: Mapping, energy_unit: Optional[str]) -> str:
    """The energy unit to convert from: ``energy_unit`` when given; else kcal/mol (with one warning) for a checkpoint
    trained on TorchMD-NET's MD17 / MD22 / rMD17 classes, eV otherwise. Before round 28 the default was eV for every
    checkpoint: an MD17 model (``load_model``, ``md --model``, the Calculator) gave energies and forces 23 times too
    large without a word."""
    if energy_unit is not None:
        return energy_unit
    dataset = hp.get("dataset")
    if isinstance(dataset, str) and dataset.strip().lower() in _KCAL_DATASETS:
        warnings.warn(f"{path}: trained on TorchMD-NET's {dataset} dataset, whose energies are kcal/mol (the sGDML "
                      "files' unit): its energies and forces are converted to eV; pass energy_unit='kcal/mol' to "
                      "import_torchmdnet to say so without this warning", UserWarning, stacklevel=3)
        return "kcal/mol"
    return "eV"


def _scalar(value, name: str, path: Path) -> float:
    t = torch.as_tensor(value, dtype=torch.float64)
    if t.numel() != 1:
        raise ModelError(f"{path}: '{name}' has {t.numel()} entries; only scalar (energy) targets can be imported")
    return float(t.reshape(()))


def import_torchmdnet(
    ckpt_path: Union[str, Path],
    *,
    enable_atomref: Optional[bool] = None,
    energy_unit: Optional[str] = None,
    trusted: bool = False,
):
    """Load a TorchMD-NET ET checkpoint as an :class:`~torchmdx.nn.potential.ETPotential`.

    ``enable_atomref``: None follows the checkpoint's Atomref ``enable`` flag (TorchMD-NET's
    default on loading); True adds the reference energies even if training disabled them
    (``remove_ref_energy``), giving total energies. ``energy_unit``: the energy unit the
    checkpoint was trained in (lengths must be Å, TorchMD-NET's convention); None (the default): kcal/mol for a
    checkpoint of TorchMD-NET's MD17, MD22 or rMD17 datasets (said in one warning), else eV. ``trusted=True`` allows arbitrary pickled objects in the file.
    """
    from torchmdx.nn.potential import ETPotential
    from torchmdx.units import energy_factor

    path = Path(ckpt_path)
    ckpt = _read_checkpoint(path, trusted)
    if not isinstance(ckpt, Mapping) or "hyper_parameters" not in ckpt or "state_dict" not in ckpt:
        raise ModelError(f"{path}: not a TorchMD-NET checkpoint (expected 'hyper_parameters' and 'state_dict')")
    if not isinstance(ckpt["hyper_parameters"], Mapping):  # dict() of a list was a ValueError traceback
        raise ModelError(f"{path}: 'hyper_parameters' is a {type(ckpt['hyper_parameters']).__name__}, expected a "
                         "mapping of TorchMD-NET's options (damaged or edited?)")
    hp = dict(ckpt["hyper_parameters"])
    model = hp.get("model")
    if model != "equivariant-transformer":
        raise ModelError(f"{path}: only TorchMD-NET's equivariant-transformer can be imported, this checkpoint holds {model!r}")
    if hp.get("atom_filter") is not None and _hparam(hp, "atom_filter", int, path) > 0:  # 0 filters Z <= 0: none
        raise ModelError(f"{path}: checkpoints trained with atom_filter are not supported")
    output_model = hp.get("output_model", "Scalar")
    if output_model not in ("Scalar", "EquivariantScalar"):
        raise ModelError(f"{path}: output model {output_model!r} is not an energy head; only Scalar is supported")
    reduce_op = _REDUCE.get(str(hp.get("reduce_op", "add")))
    if reduce_op is None:
        raise ModelError(f"{path}: reduce_op {hp.get('reduce_op')!r} is not supported (add, sum or mean)")
    precision = hp.get("precision", 32)
    dtype = _PRECISION.get(precision, "float32")

    raw_state = ckpt["state_dict"]
    if not isinstance(raw_state, Mapping) or not all(isinstance(k, str) and torch.is_tensor(v)
                                                     for k, v in raw_state.items()):
        raise ModelError(f"{path}: 'state_dict' is not a mapping of weight names to tensors (damaged or edited?)")
    state = {re.sub(r"^model\.", "", k): v for k, v in raw_state.items()}
    for pattern, repl in _LEGACY:
        state = {re.sub(pattern, repl, k): v for k, v in state.items()}
    if any(k.startswith("output_model.output_network.layers.") for k in state):
        head = "scalar"
    elif any(".update_net." in k for k in state):
        head = "gated_equivariant"
    else:
        raise ModelError(f"{path}: no output-model weights found in the state_dict")
    _warn_fixed_box(path, hp, state)

    energy = energy_factor(_dataset_energy_unit(path, hp, energy_unit))
    config = {
        "embedding_dimension": _hparam(hp, "embedding_dimension", int, path),
        "num_layers": _hparam(hp, "num_layers", int, path),
        "num_heads": _hparam(hp, "num_heads", int, path),
        "num_rbf": _hparam(hp, "num_rbf", int, path),
        "rbf_type": hp.get("rbf_type", "expnorm"),
        "trainable_rbf": bool(hp.get("trainable_rbf", False)),
        "activation": hp.get("activation", "silu"),
        "attn_activation": hp.get("attn_activation", "silu"),
        "neighbor_embedding": bool(hp.get("neighbor_embedding", True)),
        "distance_influence": hp.get("distance_influence", "both"),
        "vector_cutoff": bool(hp.get("vector_cutoff", False)),
        "cutoff_lower": _hparam(hp, "cutoff_lower", float, path, 0.0),
        "cutoff_upper": _hparam(hp, "cutoff_upper", float, path, 5.0),
        "max_z": _hparam(hp, "max_z", int, path, 100),
        "output_model": head,
        "reduce_op": reduce_op,
        "dtype": dtype,
    }
    try:  # the ET's own checks (an activation torchmdx lacks, heads not dividing the embedding) name no file
        potential = ETPotential(config)
    except TorchmdxError as exc:
        raise ModelError(f"{path}: its TorchMD-NET hyper-parameters do not make a torchmdx ET: {exc}") from None

    mapped, source_key = {}, {}  # torchmdx name -> weight; -> the checkpoint's (state_dict) name
    atomref = None
    for key, value in state.items():
        if key in ("mean", "std") or key.startswith("prior_model."):
            continue
        if key == "representation_model.distance.box" or key.startswith("output_model.distance."):
            continue
        new = key
        for pattern, repl in _RENAMES:
            new, count = re.subn(pattern, repl, new)
            if count:
                break
        mapped[new] = value
        source_key[new] = f"model.{key}"

    priors = _prior_list(hp)
    for index, (name, args) in enumerate(priors):
        if name not in ("Atomref", "LearnableAtomref"):
            raise ModelError(f"{path}: prior model {name!r} is not supported (only Atomref)")
        weight = state.get(f"prior_model.{index}.atomref.weight")
        if weight is None:
            raise ModelError(f"{path}: Atomref prior {index} has no weights in the state_dict")
        enabled = bool(args.get("enable", True)) if enable_atomref is None else bool(enable_atomref)
        if enabled:
            table = weight.detach().double().flatten()
            atomref = table if atomref is None else _add_tables(atomref, table)

    own = potential.state_dict()
    for key in list(mapped):
        if key not in own:
            raise ModelError(f"{path}: unexpected weight {key!r} for the ET (architecture not supported)")
    missing = [k for k in own if k not in mapped and k not in ("atomref", "scale", "shift", "energy_offset", "known_elements")]
    if missing:
        raise ModelError(f"{path}: weights missing from the checkpoint: {', '.join(missing[:4])}")
    for key, value in mapped.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise ModelError(f"{path}: weight {key!r} has shape {list(value.shape)}, expected {list(own[key].shape)}")
        # as load_model checks a torchmdx model file: an integer weight was copied into the float one (0.03 -> 0)
        # and a NaN weight gave NaN energies, both silently
        if own[key].is_floating_point() and not value.is_floating_point():
            raise ModelError(f"{path}: weight {source_key[key]!r} is {str(value.dtype).replace('torch.', '')}, expected "
                             "floating-point numbers (damaged or edited?)")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ModelError(f"{path}: weight {source_key[key]!r} holds NaN or infinite values: the model is unusable (its "
                             "training diverged?)")
    potential.load_state_dict({**own, **mapped})

    std = _scalar(state["std"], "std", path) if "std" in state else 1.0
    mean = _scalar(state["mean"], "mean", path) if "mean" in state else 0.0
    if not (math.isfinite(std) and std > 0):  # set_normalisation's line named neither the file nor 'std'
        raise ModelError(f"{path}: 'std' (the standardisation of the energies) is {std:g}, expected a finite number > 0")
    if not math.isfinite(mean):
        raise ModelError(f"{path}: 'mean' (the standardisation of the energies) is {mean:g}, expected a finite number")
    if atomref is not None and not bool(torch.isfinite(atomref).all()):
        bad = int((~torch.isfinite(atomref)).nonzero()[0, 0])
        raise ModelError(f"{path}: the Atomref prior's energy of Z={bad} is {float(atomref[bad]):g}, expected a "
                         "finite number")
    if atomref is not None and atomref.numel() > potential.config.max_z:
        extra = atomref[potential.config.max_z:]
        if bool((extra != 0).any()):
            raise ModelError(f"{path}: the Atomref table is longer than max_z {potential.config.max_z}")
        atomref = atomref[: potential.config.max_z]
    potential.set_normalisation(
        atomref=None if atomref is None else atomref * energy,
        scale=std * energy,
        shift=0.0,
        energy_offset=mean * energy,
    )
    return potential.eval()


def _add_tables(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    n = max(a.numel(), b.numel())
    out = torch.zeros(n, dtype=torch.float64)
    out[: a.numel()] += a
    out[: b.numel()] += b
    return out
