"""Hyper-parameters of the Geometric Algebra Transformer (``model.architecture: gatr``).

GATr (Brehmer, de Haan, Behrends, Cohen, NeurIPS 2023) generalised to any geometric algebra
(de Haan, Cohen, Brehmer, AISTATS 2024): ``algebra`` picks the Euclidean G(3,0,0), projective
G(3,0,1) or conformal G(4,1) algebra. Defaults are a small molecular model (16 multivector and
32 scalar channels, 6 blocks, 4 heads); the projective algebra gets the improvements that make
it expressive (the join bilinear and distance-aware attention), as in the papers.

Build with :func:`gatr_config` (a dict, a YAML path or a config); unknown keys, wrong types and
bad values are one-line ConfigErrors naming the key and the choices.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Union

from torchmdx.config import bad_key, to_dict
from torchmdx.nn.config import WHOLE_STRUCTURE_CUTOFF


@dataclass
class GATrConfig:
    """GATr hyper-parameters (lengths in Å).

    architecture      'gatr'
    algebra           'euclidean' (G(3,0,0), group O(3); atoms are vectors from their structure's
                      centroid), 'projective' (G(3,0,1), group E(3); atoms are trivector points) or
                      'conformal' (G(4,1), group E(3); atoms are null-vector points)
    channels          multivector channels per atom (C)
    scalar_channels   auxiliary scalar channels per atom (S)
    num_layers        GATr blocks (attention + bilinear MLP, pre-norm, residual)
    num_heads         attention heads; divides channels and scalar_channels
    mlp_multiplier    bilinear channels of the MLP = mlp_multiplier x channels
    join              add the equivariant join bilinear (null: yes for 'projective', the
                      improved projective GATr; no otherwise)
    distance_aware    projective only: add -Σ_c |w_k p_q - w_q p_k|² (the squared distance of the
                      query's and key's points) to the attention scores (null: yes); the
                      projective inner product alone cannot see distances
    distance_normalised  projective only, with distance_aware: dehomogenise each channel's
                      trivector before the distance features, T -> T w / (w² + 1e-3) (GATr's
                      normaliser), so that the term is -Σ_c |x_q - x_k|² of the points the channels
                      hold, whatever their homogeneous weights w. Off (the default, the first
                      formulation; files written before the key load unchanged): -Σ_c |w_k p_q -
                      w_q p_k|² = -Σ_c w_q² w_k² |x_q - x_k|², fourth order in the learned w, ~1e-4
                      of the scores at initialisation (docs/sweep.md, "Why GATr trails here")
    join_reference    the join's factor (the join changes sign under reflections, so must its
                      factor): 'block' (default, the first formulation) the mean pseudoscalar
                      (e0123) coefficient of the block input, ~0.1 at initialisation; 'input'
                      (projective only) the e123 coefficient of the atom's input point, ±1 (GATr's
                      reference from the data: an O(1) factor)
    sign_average      projective only: a PGA point is a pseudo-trivector (a reflection maps
                      P(x) to -P(Rx)), so the energy is averaged over both signs of the input
                      points, which makes it invariant under reflections (null: yes; costs a
                      second pass)
    radial_bias       add b_h(r_ij) = MLP(Gaussian rbf(r_ij)) to the attention scores of head h
                      (invariant: equivariance is kept); a molecular addition to GATr, which
                      otherwise sees distances only through products of points
    num_rbf           Gaussian distance features of the radial bias
    cutoff_upper      attention range: atoms attend to neighbours within it, with the cosine
                      cutoff in the softmax (smooth); null: every atom of the structure
                      (non-periodic structures only)
    max_z             atomic numbers 0 .. max_z - 1 are accepted
    reduce_op         'sum' (extensive, energies) or 'mean' of the per-atom outputs
    dtype             parameter dtype
    seed              seed of the weight initialisation (None: torch's global RNG)
    """

    architecture: Literal["gatr"] = "gatr"
    algebra: Literal["euclidean", "projective", "conformal"] = "projective"
    channels: int = 16
    scalar_channels: int = 32
    num_layers: int = 6
    num_heads: int = 4
    mlp_multiplier: int = 2
    join: Optional[bool] = None
    distance_aware: Optional[bool] = None
    distance_normalised: bool = False
    join_reference: Literal["block", "input"] = "block"
    sign_average: Optional[bool] = None
    radial_bias: bool = True
    num_rbf: int = 16
    cutoff_upper: Optional[float] = 5.0
    max_z: int = 100
    reduce_op: Literal["sum", "mean"] = "sum"
    dtype: Literal["float32", "float64"] = "float32"
    seed: Optional[int] = None

    @property
    def uses_join(self) -> bool:
        return self.algebra == "projective" if self.join is None else bool(self.join)

    @property
    def uses_distance(self) -> bool:
        return self.algebra == "projective" and (self.distance_aware is None or bool(self.distance_aware))

    @property
    def normalises_distance(self) -> bool:
        return self.uses_distance and bool(self.distance_normalised)

    @property
    def averages_sign(self) -> bool:
        return self.algebra == "projective" and (self.sign_average is None or bool(self.sign_average))

    @property
    def neighbor_cutoff(self) -> float:
        return WHOLE_STRUCTURE_CUTOFF if self.cutoff_upper is None else float(self.cutoff_upper)

    def validate(self, section: str = "model") -> None:
        bad = partial(bad_key, section)
        if self.channels < 1:
            bad("channels", f"must be >= 1, got {self.channels}")
        if self.scalar_channels < 1:
            bad("scalar_channels", f"must be >= 1, got {self.scalar_channels}")
        if self.num_layers < 1:
            bad("num_layers", f"must be >= 1, got {self.num_layers}")
        if self.num_heads < 1 or self.channels % self.num_heads or self.scalar_channels % self.num_heads:
            bad("num_heads", f"must divide channels ({self.channels}) and scalar_channels ({self.scalar_channels}), "
                             f"got {self.num_heads}")
        if self.mlp_multiplier < 1:
            bad("mlp_multiplier", f"must be >= 1, got {self.mlp_multiplier}")
        if self.join_reference not in ("block", "input"):
            bad("join_reference", f"must be 'block' or 'input', got {self.join_reference!r}")
        if self.join_reference == "input" and self.algebra != "projective":
            bad("join_reference", f"'input' applies to algebra 'projective' only (algebra is {self.algebra!r}); "
                                  "use 'block'")
        for key in ("distance_aware", "distance_normalised", "sign_average"):
            if getattr(self, key) and self.algebra != "projective":
                bad(key, f"applies to algebra 'projective' only (algebra is {self.algebra!r}); leave it null")
        if self.num_rbf < 2:
            bad("num_rbf", f"must be >= 2, got {self.num_rbf}")
        if self.cutoff_upper is not None and not 0 < self.cutoff_upper < WHOLE_STRUCTURE_CUTOFF:
            bad("cutoff_upper", f"must be > 0 Å (or null: the whole structure), got {self.cutoff_upper}")
        if self.max_z < 2:
            bad("max_z", f"must be >= 2, got {self.max_z}")

    def to_dict(self) -> dict:
        return to_dict(self)


def gatr_config(config: Union[GATrConfig, Mapping[str, Any], str, Path, None] = None, **overrides) -> GATrConfig:
    """A :class:`GATrConfig` from a dict, a YAML path (``model:`` section or bare mapping), an
    existing config, or None (defaults); keyword overrides on top."""
    from torchmdx.nn.config import typed_section

    return typed_section(config, GATrConfig, "gatr", overrides)
