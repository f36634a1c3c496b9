"""Hyper-parameters of Equiformer (``model.architecture: equiformer``): one typed dataclass.

Defaults are the paper's MD17 model (Liao & Smidt, "Equiformer: Equivariant Graph Attention
Transformer for 3D Atomistic Graphs", ICLR 2023, arXiv:2206.11990, Table 10 / the authors'
``graph_attention_transformer_nonlinear_exp_l2_md17``): 6 blocks, irreps features
128x0e+64x1o+32x2e (lmax 2), 4 heads of 32x0e+16x1o+8x2e, feed-forward irreps 3 x the features,
512 scalar output features, 32 exp-normal radial functions, radial MLP 64-64, non-linear
messages, cutoff 5 Å. One deliberate difference: the authors' MD17 models use irreps of even
parity only (``1e``, SE(3)); torchmdx's default is the natural parity of spherical harmonics
(0e, 1o, 2e), which makes the model E(3)-equivariant (energies invariant under reflections as
well); ``irreps_node`` can name any other irreps, both parities included.

Build with :func:`equiformer_config` (dict, YAML path or config); unknown keys, wrong types and
irreps settings that cannot be built are one-line ConfigErrors naming the key and the choices.
Validation parses irreps with e3nn, imported only then.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Union

from torchmdx.config import bad_key, to_dict

#: largest degree accepted for features and spherical harmonics
MAX_LMAX = 6

#: the paper's QM9 statistic (cutoff 5 Å), which its authors also use for MD17: average number of
#: neighbours, the edge-degree embedding's sum is divided by its square root
PAPER_AVG_NUM_NEIGHBORS = 15.57930850982666


@dataclass
class EquiformerConfig:
    """Equiformer hyper-parameters (lengths in Å).

    architecture        'equiformer' (the key that selects this section's class)
    lmax                largest degree l of the features and of the edges' spherical harmonics
    channels            multiplicity of the l = 0 features; degree l gets channels / 2^l, with the
                        parity (-1)^l: 128 -> 128x0e+64x1o+32x2e
    irreps_node         explicit hidden irreps (e3nn syntax, e.g. '128x0e+32x0o+32x1e+32x1o');
                        overrides ``channels``; degrees <= lmax, with scalar (0e) channels
    num_layers          Transformer blocks (graph attention + feed-forward)
    num_heads           attention heads; divides every multiplicity of the hidden irreps
                        (each head gets 1/num_heads of every irrep's channels)
    ffn_multiplier      hidden irreps of the feed-forward blocks = ffn_multiplier x irreps_node
    feature_channels    scalar features (0e) the last block outputs for the energy head
    num_rbf             radial basis functions
    rbf_type            'expnorm' (exp-normal with a cosine envelope, the ET's), 'gauss' (the
                        ET's Gaussians) or 'bessel' (spherical Bessel with a polynomial envelope)
    trainable_rbf       train the radial basis's centres and widths
    radial_hidden       hidden widths of the radial MLP that gives the tensor-product weights
    nonlinear_message   values through gate + a second depth-wise tensor product (the paper's
                        non-linear message passing); false: linear messages
    attention_dropout   dropout on the attention weights while training
    avg_num_neighbors   the edge-degree embedding's sum over neighbours is divided by its root
    cutoff_upper        neighbours within this distance; every edge term is multiplied by the
                        cosine cutoff, so energies and forces are smooth where atoms cross it
    max_z               atomic numbers 0 .. max_z - 1 are accepted
    reduce_op           'sum' (extensive, energies) or 'mean' of the per-atom outputs
    dtype               parameter dtype
    seed                seed of the weight initialisation (None: torch's global RNG)
    """

    architecture: Literal["equiformer"] = "equiformer"
    lmax: int = 2
    channels: int = 128
    irreps_node: Optional[str] = None
    num_layers: int = 6
    num_heads: int = 4
    ffn_multiplier: int = 3
    feature_channels: int = 512
    num_rbf: int = 32
    rbf_type: Literal["expnorm", "gauss", "bessel"] = "expnorm"
    trainable_rbf: bool = False
    radial_hidden: list[int] = field(default_factory=lambda: [64, 64])
    nonlinear_message: bool = True
    attention_dropout: float = 0.0
    avg_num_neighbors: float = PAPER_AVG_NUM_NEIGHBORS
    cutoff_upper: float = 5.0
    max_z: int = 100
    reduce_op: Literal["sum", "mean"] = "sum"
    dtype: Literal["float32", "float64"] = "float32"
    seed: Optional[int] = None

    # ------------------------------------------------------------------ derived irreps
    def node_irreps(self):
        """The hidden irreps (e3nn ``Irreps``, simplified)."""
        from e3nn import o3

        if self.irreps_node is not None:
            return o3.Irreps(self.irreps_node).simplify()
        return o3.Irreps([(self.channels >> l, (l, (-1) ** l)) for l in range(self.lmax + 1)])

    def validate(self, section: str = "model") -> None:
        bad = partial(bad_key, section)
        if not 0 <= self.lmax <= MAX_LMAX:
            bad("lmax", f"must be between 0 and {MAX_LMAX}, got {self.lmax}")
        if self.irreps_node is None and self.channels < 2 ** self.lmax:
            bad("channels", f"must be at least 2^lmax = {2 ** self.lmax} (degree l gets channels / 2^l), got {self.channels}")
        irreps = self._checked_irreps(bad)
        muls = sorted({mul for mul, _ in irreps})
        divisors = [h for h in range(1, min(muls) + 1) if all(m % h == 0 for m in muls)]
        if self.num_heads not in divisors:
            bad("num_heads", f"must divide every multiplicity of the hidden irreps {irreps}; "
                             f"choices: {', '.join(map(str, divisors))}; got {self.num_heads}")
        if self.num_layers < 1:
            bad("num_layers", f"must be >= 1, got {self.num_layers}")
        if self.ffn_multiplier < 1:
            bad("ffn_multiplier", f"must be >= 1, got {self.ffn_multiplier}")
        if self.feature_channels < 1:
            bad("feature_channels", f"must be >= 1, got {self.feature_channels}")
        if self.num_rbf < 1 or (self.rbf_type == "gauss" and self.num_rbf < 2):
            bad("num_rbf", f"must be >= {2 if self.rbf_type == 'gauss' else 1}, got {self.num_rbf}")
        if any(width < 1 for width in self.radial_hidden):
            bad("radial_hidden", f"widths must be >= 1, got {self.radial_hidden}")
        if not 0.0 <= self.attention_dropout < 1.0:
            bad("attention_dropout", f"must be in [0, 1), got {self.attention_dropout}")
        if not self.avg_num_neighbors > 0:
            bad("avg_num_neighbors", f"must be > 0, got {self.avg_num_neighbors}")
        if not self.cutoff_upper > 0:
            bad("cutoff_upper", f"must be > 0 Å, got {self.cutoff_upper}")
        if self.max_z < 2:
            bad("max_z", f"must be >= 2, got {self.max_z}")

    def _checked_irreps(self, bad):
        if self.irreps_node is None:
            return self.node_irreps()
        example = "e.g. '128x0e+64x1o+32x2e' (multiplicity x degree, parity e or o)"
        try:
            irreps = self.node_irreps()
        except (ValueError, AssertionError, TypeError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            bad("irreps_node", f"is not an irreps string: {self.irreps_node!r} ({reason}); {example}")
        if irreps.dim == 0:
            bad("irreps_node", f"is empty: {self.irreps_node!r}; {example}")
        degrees = sorted({ir.l for _, ir in irreps})
        if degrees[-1] > self.lmax:
            bad("irreps_node", f"has degree l={degrees[-1]} above lmax ({self.lmax}); "
                               f"choices: degrees 0..{self.lmax}, or raise lmax")
        if not any(ir.l == 0 and ir.p == 1 for _, ir in irreps):
            bad("irreps_node", f"has no scalar (0e) channels: {irreps}; the attention and the energy need them")
        return irreps

    def to_dict(self) -> dict:
        return to_dict(self)


def equiformer_config(config: Union[EquiformerConfig, Mapping[str, Any], str, Path, None] = None,
                      **overrides) -> EquiformerConfig:
    """An :class:`EquiformerConfig` from a dict, a YAML path (``model:`` section or bare
    mapping), an existing config, or None (defaults); keyword overrides on top."""
    from torchmdx.nn.config import typed_section

    return typed_section(config, EquiformerConfig, "equiformer", overrides)
