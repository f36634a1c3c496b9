"""Hyper-parameters of the plain (not equivariant) transformer (``model.architecture: transformer``).

The baseline of "Does equivariance matter at scale?" (Brehmer, Behrends, de Haan, Cohen, 2024):
a standard pre-norm transformer on atoms that takes the positions as input features and adds a
learned bias of the relative position vector r_ij to the attention scores. It has no built-in
rotation symmetry (only translations: positions relative to the structure's centroid, and
r_ij); train it with ``train.augment: rotations`` so that it learns the symmetry from data.

Build with :func:`transformer_config`; unknown keys, wrong types and bad values are one-line
ConfigErrors naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Union

from torchmdx.config import bad_key, to_dict
from torchmdx.nn.config import WHOLE_STRUCTURE_CUTOFF


@dataclass
class TransformerConfig:
    """Transformer hyper-parameters (lengths in Å).

    architecture         'transformer'
    embedding_dimension  F, features per atom
    num_layers           transformer blocks (attention + feed-forward, pre-norm, residual)
    num_heads            attention heads; divides embedding_dimension
    ffn_multiplier       hidden width of the feed-forward blocks = ffn_multiplier x F
    num_rbf              Gaussian distance features of the relative-position bias
    bias_hidden          hidden width of the bias MLP [r_ij (3 components), rbf(|r_ij|)] -> one
                         bias per head (per block)
    cutoff_upper         attention range, with the cosine cutoff in the softmax (smooth); null:
                         every atom of the structure (non-periodic structures only)
    max_z                atomic numbers 0 .. max_z - 1 are accepted
    reduce_op            'sum' or 'mean' of the per-atom outputs
    dtype                parameter dtype
    seed                 seed of the weight initialisation (None: torch's global RNG)
    """

    architecture: Literal["transformer"] = "transformer"
    embedding_dimension: int = 128
    num_layers: int = 6
    num_heads: int = 8
    ffn_multiplier: int = 4
    num_rbf: int = 16
    bias_hidden: int = 64
    cutoff_upper: Optional[float] = 5.0
    max_z: int = 100
    reduce_op: Literal["sum", "mean"] = "sum"
    dtype: Literal["float32", "float64"] = "float32"
    seed: Optional[int] = None

    @property
    def neighbor_cutoff(self) -> float:
        return WHOLE_STRUCTURE_CUTOFF if self.cutoff_upper is None else float(self.cutoff_upper)

    def validate(self, section: str = "model") -> None:
        bad = partial(bad_key, section)
        if self.embedding_dimension < 2:
            bad("embedding_dimension", f"must be >= 2, got {self.embedding_dimension}")
        if self.num_layers < 1:
            bad("num_layers", f"must be >= 1, got {self.num_layers}")
        if self.num_heads < 1 or self.embedding_dimension % self.num_heads:
            bad("num_heads", f"must divide embedding_dimension ({self.embedding_dimension}), got {self.num_heads}")
        if self.ffn_multiplier < 1:
            bad("ffn_multiplier", f"must be >= 1, got {self.ffn_multiplier}")
        if self.num_rbf < 2:
            bad("num_rbf", f"must be >= 2, got {self.num_rbf}")
        if self.bias_hidden < 1:
            bad("bias_hidden", f"must be >= 1, got {self.bias_hidden}")
        if self.cutoff_upper is not None and not 0 < self.cutoff_upper < WHOLE_STRUCTURE_CUTOFF:
            bad("cutoff_upper", f"must be > 0 Å (or null: the whole structure), got {self.cutoff_upper}")
        if self.max_z < 2:
            bad("max_z", f"must be >= 2, got {self.max_z}")

    def to_dict(self) -> dict:
        return to_dict(self)


def transformer_config(config: Union[TransformerConfig, Mapping[str, Any], str, Path, None] = None,
                       **overrides) -> TransformerConfig:
    """A :class:`TransformerConfig` from a dict, a YAML path (``model:`` section or bare
    mapping), an existing config, or None (defaults); keyword overrides on top."""
    from torchmdx.nn.config import typed_section

    return typed_section(config, TransformerConfig, "transformer", overrides)
