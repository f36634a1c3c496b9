"""Hyper-parameters of the equivariant transformer (ET): one typed dataclass, ``ModelConfig``.

Defaults are TorchMD-NET's ET MD17 example (``examples/ET-MD17.yaml``): 128 channels, 6 layers,
8 heads, 32 exp-normal radial functions (not trainable), cutoff 0-5 Å, SiLU, neighbor
embedding, distance influence on keys and values, max_z 100, scalar output summed per
structure, float32. Keys use TorchMD-NET's names so a TorchMD-NET YAML's model keys carry over
(``output_model``/``reduce_op`` take torchmdx's spelling, see :data:`OUTPUT_MODELS`).

Build with :func:`model_config` (a dict, a YAML path with a ``model:`` section or a bare
mapping, or a ``ModelConfig``); unknown keys and wrong types are one-line ConfigErrors.

Other architectures: ``model.architecture`` (default ``et``) selects the config and potential
classes (:data:`ARCHITECTURES`; :func:`architecture_config` builds the typed section of any of
them, an unknown name is a one-line ConfigError naming the choices).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Union

from torchmdx.config import bad_key, from_dict, load_yaml, to_dict
from torchmdx.errors import ConfigError

#: the neighbor-list range (Å) of attention over every pair of a structure (``cutoff_upper: null``
#: of the GATr and transformer configs): larger than any molecule
WHOLE_STRUCTURE_CUTOFF = 1.0e4

Activation = Literal["silu", "ssp", "tanh", "sigmoid", "swish", "mish"]

#: output heads: per-atom MLP on the scalar features, or gated-equivariant blocks (vector-aware)
OUTPUT_MODELS = ("scalar", "gated_equivariant")


@dataclass
class ModelConfig:
    """ET hyper-parameters (lengths in Å).

    embedding_dimension  F, scalar channels per atom (also the vector channels)
    num_layers           L, interaction (attention) layers
    num_heads            H, attention heads; F must be divisible by H
    num_rbf              K, radial basis functions
    rbf_type             'expnorm' exp(-beta_k (exp(-alpha (r - r_lo)) - mu_k)^2) * phi(r)
                         or 'gauss' exp(-(r - mu_k)^2 / (2 delta^2))
    trainable_rbf        train mu_k, beta_k (resp. offsets and width)
    activation           activation of the MLPs and distance filters
    attn_activation      activation applied to the attention scores
    neighbor_embedding   add the distance-weighted embedding of the neighbors to the input
    distance_influence   where the RBF filters enter: keys, values, both or none
    vector_cutoff        multiply the values (scalar and vector messages) by the cutoff
                         instead of the attention only: energy smooth at the cutoff
    cutoff_lower/upper   r_lo <= r < r_hi are neighbors; cosine cutoff between them
    max_z                rows of the embeddings: atomic numbers 0 .. max_z - 1 are accepted
    output_model         'scalar' (per-atom MLP) or 'gated_equivariant'
    dipole               add a dipole-moment head (QM9-style vector target, e·Å)
    reduce_op            'sum' (extensive, energies) or 'mean' of per-atom outputs;
                         'torchmdnet_mean' = sum / (n + 1), what TorchMD-NET 3.0's 'mean' computes
                         (its scatter includes the zero it starts from); set by the importer
    dtype                parameter dtype
    backend              message passing: 'auto' (Triton on CUDA when available, else torch;
                         training steps, which differentiate the forces once more, take the
                         torch reference: :data:`torchmdx.nn.potential.AUTO_TRAINING_BACKEND`),
                         'torch' (reference) or 'triton'
    seed                 seed of the weight initialisation (None: torch's global RNG)
    """

    embedding_dimension: int = 128
    num_layers: int = 6
    num_heads: int = 8
    num_rbf: int = 32
    rbf_type: Literal["expnorm", "gauss"] = "expnorm"
    trainable_rbf: bool = False
    activation: Activation = "silu"
    attn_activation: Activation = "silu"
    neighbor_embedding: bool = True
    distance_influence: Literal["keys", "values", "both", "none"] = "both"
    vector_cutoff: bool = False
    cutoff_lower: float = 0.0
    cutoff_upper: float = 5.0
    max_z: int = 100
    output_model: Literal["scalar", "gated_equivariant"] = "scalar"
    dipole: bool = False
    reduce_op: Literal["sum", "mean", "torchmdnet_mean"] = "sum"
    dtype: Literal["float32", "float64"] = "float32"
    backend: Literal["auto", "torch", "triton"] = "auto"
    seed: Optional[int] = None

    def validate(self, section: str = "model") -> None:
        bad = partial(bad_key, section)

        if self.embedding_dimension < 2:
            bad("embedding_dimension", f"must be at least 2, got {self.embedding_dimension}")
        if self.num_heads < 1 or self.embedding_dimension % self.num_heads:
            bad(
                "num_heads",
                f"must divide embedding_dimension ({self.embedding_dimension}), got {self.num_heads}",
            )
        if self.num_layers < 0:
            bad("num_layers", f"must be >= 0, got {self.num_layers}")
        if self.num_layers == 0 and not self.neighbor_embedding:  # trained silently, forces all zero
            bad("num_layers", "is 0 and model.neighbor_embedding is false: such a model sees no geometry (the energy "
                              "of the elements only, zero forces); set num_layers >= 1 or neighbor_embedding: true")
        if self.num_rbf < 1 or (self.rbf_type == "gauss" and self.num_rbf < 2):
            bad("num_rbf", f"must be >= {2 if self.rbf_type == 'gauss' else 1}, got {self.num_rbf}")
        if not self.cutoff_upper > 0:
            bad("cutoff_upper", f"must be > 0 Å, got {self.cutoff_upper}")
        if not 0 <= self.cutoff_lower < self.cutoff_upper:
            bad("cutoff_lower", f"must satisfy 0 <= cutoff_lower < cutoff_upper ({self.cutoff_upper}), got {self.cutoff_lower}")
        if self.max_z < 2:
            bad("max_z", f"must be >= 2, got {self.max_z}")

    def to_dict(self) -> dict:
        return to_dict(self)


def section_values(config, config_class: type, overrides: Mapping[str, Any]) -> dict:
    """The ``model:`` values of a dict, a YAML path (``model:`` section or a bare mapping), an
    existing ``config_class`` instance or None (defaults), with keyword ``overrides`` on top
    (``kind``, a model-file field, dropped)."""
    if isinstance(config, config_class):
        values = to_dict(config)
    elif config is None:
        values = {}
    elif isinstance(config, (str, Path)):
        data = load_yaml(config)
        values = data["model"] if isinstance(data.get("model"), Mapping) else data
        if not isinstance(values, Mapping):
            raise ConfigError(f"{config}: the 'model' section must be a mapping")
    elif isinstance(config, Mapping):
        values = config["model"] if isinstance(config.get("model"), Mapping) else config
    else:
        raise ConfigError(f"model config must be a mapping, a YAML path or a {config_class.__name__}, "
                          f"got {type(config).__name__}")
    values = dict(values)
    values.pop("kind", None)
    values.update(overrides)
    return values


def typed_section(config, config_class: type, architecture: str, overrides: Mapping[str, Any]):
    """``config`` (see :func:`section_values`) as the typed ``model:`` section of ``architecture``;
    keys of another architecture and unknown keys are one-line ConfigErrors."""
    values = section_values(config, config_class, overrides)
    check_keys_of_other_architectures(values, architecture)
    return from_dict(config_class, values, "model")


def model_config(config: Union[ModelConfig, Mapping[str, Any], str, Path, None] = None, **overrides) -> ModelConfig:
    """A :class:`ModelConfig` from a dict, a YAML path (``model:`` section or bare mapping),
    an existing config, or None (defaults); keyword overrides are applied on top."""
    values = section_values(config, ModelConfig, overrides)
    architecture = values.pop("architecture", "et")
    if architecture != "et":
        check_architecture(architecture)
        raise ConfigError(f"config key 'model.architecture' is {architecture!r}: build it with torchmdx.build_model, "
                          "not as an ET config")
    check_keys_of_other_architectures(values, "et")
    return from_dict(ModelConfig, values, "model")


# ---------------------------------------------------------------------------- architectures
#: model.architecture -> (config class, potential class), as "module:attribute" (imported lazily:
#: the ET needs no e3nn). Every potential class is a torchmdx.nn.base.Potential with ``kind``
#: equal to its architecture name, registered in torchmdx.nn.model_file.
ARCHITECTURES = {
    "et": ("torchmdx.nn.config:ModelConfig", "torchmdx.nn.potential:ETPotential"),
    "equiformer": ("torchmdx.nn.equiformer.config:EquiformerConfig", "torchmdx.nn.equiformer.potential:EquiformerPotential"),
    "gatr": ("torchmdx.nn.gatr.config:GATrConfig", "torchmdx.nn.gatr.potential:GATrPotential"),
    "transformer": ("torchmdx.nn.transformer.config:TransformerConfig",
                    "torchmdx.nn.transformer.potential:TransformerPotential"),
}
DEFAULT_ARCHITECTURE = "et"


def _import(target: str):
    import importlib

    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def check_architecture(name: Any) -> str:
    """``name`` if it is a known architecture, else a one-line ConfigError naming the choices."""
    if not isinstance(name, str) or name not in ARCHITECTURES:
        raise ConfigError(f"config key 'model.architecture' must be one of {', '.join(ARCHITECTURES)}, got {name!r}")
    return name


def architecture_of(values: Optional[Mapping[str, Any]]) -> str:
    """The architecture a ``model:`` mapping selects (``architecture``, default 'et'), checked."""
    return check_architecture((values or {}).get("architecture", DEFAULT_ARCHITECTURE))


def model_config_class(values: Optional[Mapping[str, Any]] = None) -> type:
    """The typed config class of the architecture that ``values`` (a ``model:`` mapping) selects."""
    return _import(ARCHITECTURES[architecture_of(values)][0])


def potential_class_of(values: Optional[Mapping[str, Any]] = None) -> type:
    """The Potential class of the architecture that ``values`` (a ``model:`` mapping) selects."""
    return _import(ARCHITECTURES[architecture_of(values)][1])


def check_keys_of_other_architectures(values: Mapping[str, Any], architecture: str, section: str = "model") -> None:
    """A one-line ConfigError for a key that only another architecture's config has (``lmax``
    under the default 'et'): say which architecture it belongs to, rather than "does not exist"."""
    import dataclasses

    own = {f.name for f in dataclasses.fields(model_config_class({"architecture": architecture}))}
    for key in values:
        if key in own or key in ("architecture", "kind"):
            continue
        for other, (config_path, _) in ARCHITECTURES.items():
            if other != architecture and key in {f.name for f in dataclasses.fields(_import(config_path))}:
                raise ConfigError(f"config key '{section}.{key}' belongs to architecture {other!r}, but "
                                  f"{section}.architecture is {architecture!r}; set {section}.architecture: {other}")


def architecture_config(values: Optional[Mapping[str, Any]], section: str = "model"):
    """The typed config of a ``model:`` mapping: its ``architecture`` (default 'et') picks the class
    (ModelConfig, EquiformerConfig, ...); unknown keys and bad values are one-line ConfigErrors.
    The ET's config has no ``architecture`` field (default), the others carry theirs."""
    values = dict(values or {})
    name = architecture_of(values)
    check_keys_of_other_architectures(values, name, section)
    if name == DEFAULT_ARCHITECTURE:
        values.pop("architecture", None)
    return from_dict(model_config_class({"architecture": name}), values, section)
