"""Radial filters tabulated in the distance: inference without the filter products.

An ET layer's radial filters depend on the edge length r only:

    f_c(r) = act_f(sum_k W_ck e_k(r) + b_c)        c over the F key and 3F value channels

With frozen weights (inference: molecular dynamics, the calculator) f is a fixed smooth function
of one variable, so it can be tabulated once and interpolated per edge instead of evaluating a
K-term product per edge and channel (and, on the GPU, instead of writing and reading the
pre-activations [E, 4F] that the 'gemm' filters move through memory twice per layer). The
table is a piecewise cubic Hermite interpolant on G equal intervals of [r_min, r_max] with the
exact values and r-derivatives at the nodes (C1, error <= h^4 max|f''''| / 384 in the value,
O(h^3) in the derivative; h = (r_max - r_min) / G). On interval g, with t = (r - r_min) / h - g
in [0, 1):

    f_c(r)    = c0 + t (c1 + t (c2 + t c3))              (coefficients [G, 4, C]: c0..c3 of interval g)
    df_c / dr = (c1 + t (2 c2 + 3 t c3)) / h

with, from the node values y and scaled derivatives m = h dy/dr at t = 0 and t = 1,
c0 = y0, c1 = m0, c2 = 3 (y1 - y0) - 2 m0 - m1, c3 = 2 (y0 - y1) + m0 + m1.

The nodes are evaluated in float64 (derivatives by forward-mode autodiff), the coefficients
stored in the model's dtype. Accuracy (ET-MD17 filters, 2 048 intervals on [0, 5] Å, float32
coefficients; docs/kernels_message.md "Filter tables"): filter derivatives within about 2e-6
of each channel's largest for r >= 0.5 Å (direct float32 evaluation: 1.8e-6), 1e-5 below.
:func:`table_error` measures a built table against the exact filter between the nodes, where
the interpolation error peaks (the tests bound it; the model's force error against float64 is
the gate, measured by ``bench/bench_filter_table.py``).

Compact storage (:meth:`FilterTable.compact`, ``LaunchConfig.table_storage = 'compact'``; off by
default): the kernels read the coefficients of every edge's interval from L2, 16 B per channel, which at
DHFR / STMV sizes looked like the forward kernel's bound (~4.8 TB/s). Measured on an H100 on 2026-12-07
(docs/kernels_message.md): 25 % fewer table bytes changed the calls by -1 % to +4 %, so it was not.
c2 and c3 scale as h^2 f'' and h^3 f''' (h ~ 2.4e-3 Å) and need far fewer bits than float32 gives
them: the derivative takes them as (2 c2 t + 3 c3 t^2) / h. They share one 32-bit word
as fixed-point integers with a power-of-two scale per channel: c2 in 20 bits (error <= 2^-20 of the
channel's largest |c2|, i.e. ~2e-9 h max|f''| in df/dr), c3 in 12 bits; c0 and c1 stay float32. Per
interval three 4-byte rows (12 B per channel instead of 16, -25 %):

    [c0 (float32), c1 (float32), (q2 & 0xFFFFF) | (q3 << 20)]    q2 = round(c2 s2_c), q3 = round(c3 s3_c)

then two rows of the per-channel inverse scales 1 / s2_c, 1 / s3_c (s = 2^k with the channel's
largest |q2| < 2^19 and |q3| < 2^11; powers of two, so the kernels' q / s equals the reference's).
The compact table's ``coefficients`` are the dequantized values, so :meth:`lookup` is the torch
reference of what the kernels compute.

:meth:`FilterTable.lookup` is the torch reference of the lookup (differentiable in r); the
fused message kernels read the same coefficients (``torchmdx.kernels._message_kernels_common._table_filter``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

#: intervals of a table unless the caller says otherwise (see the module docstring for accuracy)
DEFAULT_INTERVALS = 2048


@dataclass(frozen=True)
class FilterTable:
    """Cubic Hermite table of C filter channels on [r_min, r_max]: ``coefficients`` [G, 4, C]
    (per interval the four coefficient rows, each over the channels: a block of edges reads each
    coefficient of its channels as one contiguous row, coalesced)."""

    coefficients: torch.Tensor
    r_min: float
    r_max: float
    #: the kernels' compact buffer [3 G + 2, C] (module docstring), only on a compact table
    packed: Optional[torch.Tensor] = field(default=None, compare=False, repr=False)
    _compact: dict = field(default_factory=dict, compare=False, repr=False)  # the cached compact form

    @property
    def intervals(self) -> int:
        return self.coefficients.shape[0]

    @property
    def channels(self) -> int:
        return self.coefficients.shape[2]

    @property
    def inverse_step(self) -> float:
        """1 / h = G / (r_max - r_min), Å^-1."""
        return self.intervals / (self.r_max - self.r_min)

    def columns(self, start: int, stop: int) -> "FilterTable":
        """The table of channels [start, stop) (contiguous copy; a compact table stays compact)."""
        packed = None if self.packed is None else self.packed[:, start:stop].contiguous()
        return FilterTable(self.coefficients[:, :, start:stop].contiguous(), self.r_min, self.r_max, packed)

    def compact(self) -> "FilterTable":
        """The compact form (module docstring): c2, c3 rounded to scaled fixed-point integers,
        ``coefficients`` dequantized, ``packed`` the kernels' buffer. Made once per table (cached);
        float32 only."""
        if self.packed is not None:
            return self
        if "table" not in self._compact:
            self._compact["table"] = _compact(self)
        return self._compact["table"]

    def position(self, r: torch.Tensor) -> tuple:
        """(coefficients of each length's interval [..., 4, C], t = (r - r_min) / h - g [..., 1]) for
        edge lengths r (Å); the interval g is clamped to the table, t carries r's gradient."""
        s = (r - self.r_min) * self.inverse_step
        g = s.detach().floor().clamp(0, self.intervals - 1)
        c = self.coefficients.index_select(0, g.long().reshape(-1)).reshape(*r.shape, 4, self.channels)
        return c, (s - g).unsqueeze(-1)

    def lookup(self, r: torch.Tensor) -> torch.Tensor:
        """f(r) [E, C] for edge lengths r [E] (Å), differentiable in r (the torch reference of
        the kernels' lookup). Lengths outside [r_min, r_max] extrapolate the end intervals'
        cubics; callers pass lengths inside (invalid edges carry a safe in-range length)."""
        c, t = self.position(r)
        return c[..., 0, :] + t * (c[..., 1, :] + t * (c[..., 2, :] + t * c[..., 3, :]))


#: bits of the fixed-point c2 and c3 of the compact form (one 32-bit word)
COMPACT_BITS = (20, 12)


def _power_of_two_scale(c: torch.Tensor, bits: int) -> torch.Tensor:
    """Per channel s = 2^k, the largest with max |c s| < 2^(bits - 1) - 1 ([C], float64; 1 for an
    all-zero channel)."""
    largest = c.abs().amax(dim=0).double()
    limit = 2.0 ** (bits - 1) - 1
    exponent = torch.where(largest > 0, torch.floor(torch.log2(limit / largest.clamp_min(1e-300))), 0.0)
    return torch.exp2(exponent.clamp(-126, 126))


def _compact(table: FilterTable) -> FilterTable:
    c = table.coefficients
    if c.dtype != torch.float32:
        raise ValueError(f"a compact filter table needs float32 coefficients, not {c.dtype}")
    c0, c1, c2, c3 = c.unbind(1)
    bits2, bits3 = COMPACT_BITS
    s2, s3 = _power_of_two_scale(c2, bits2), _power_of_two_scale(c3, bits3)
    q2 = torch.round(c2.double() * s2).long()
    q3 = torch.round(c3.double() * s3).long()
    word = ((q2 & ((1 << bits2) - 1)) + q3 * (1 << bits2)).to(torch.int32)  # in [-2^31, 2^31): exact
    inverse2, inverse3 = (1.0 / s2).to(torch.float32), (1.0 / s3).to(torch.float32)
    g, channels = c0.shape
    rows = torch.stack([c0.view(torch.int32), c1.view(torch.int32), word], dim=1).reshape(3 * g, channels)
    packed = torch.cat([rows, inverse2.view(torch.int32)[None, :], inverse3.view(torch.int32)[None, :]], dim=0)
    dequantized = torch.stack([c0, c1, q2.to(torch.float32) * inverse2, q3.to(torch.float32) * inverse3], dim=1)
    return FilterTable(dequantized.contiguous(), table.r_min, table.r_max, packed.contiguous().view(torch.float32))


def _values_and_derivatives(filter_fn: Callable, r: torch.Tensor):
    """(f(r) [n, C], df/dr [n, C]): forward-mode derivative, each row depends on its own r."""
    with torch.no_grad():
        return torch.func.jvp(filter_fn, (r,), (torch.ones_like(r),))


def build_filter_table(filter_fn: Callable, r_min: float, r_max: float, intervals: int = DEFAULT_INTERVALS,
                       dtype: torch.dtype = torch.float32, device=None) -> FilterTable:
    """Tabulate ``filter_fn`` (float64 r [n] -> [n, C], row-wise in r) on ``intervals`` equal
    intervals of [r_min, r_max] (see the module docstring); coefficients in ``dtype``."""
    if not r_max > r_min or intervals < 1:
        raise ValueError(f"a filter table needs r_max > r_min and at least one interval, got "
                         f"[{r_min}, {r_max}] with {intervals}")
    h = (r_max - r_min) / intervals
    nodes = r_min + h * torch.arange(intervals + 1, dtype=torch.float64, device=device)
    y, dy = _values_and_derivatives(filter_fn, nodes)
    y0, y1 = y[:-1], y[1:]
    m0, m1 = h * dy[:-1], h * dy[1:]
    coefficients = torch.stack([y0, m0, 3 * (y1 - y0) - 2 * m0 - m1, 2 * (y0 - y1) + m0 + m1], dim=1)
    return FilterTable(coefficients.to(dtype).contiguous(), float(r_min), float(r_max))


def table_error(table: FilterTable, filter_fn: Callable, points_per_interval: int = 3) -> tuple[float, float]:
    """(value error, derivative error) of ``table`` against ``filter_fn`` (float64) at
    ``points_per_interval`` points inside every interval: the largest absolute error of each
    channel over its largest |f| (resp. |df/dr|) on those points, maximised over channels."""
    g = table.intervals
    h = (table.r_max - table.r_min) / g
    frac = torch.arange(1, points_per_interval + 1, dtype=torch.float64) / (points_per_interval + 1)
    device = table.coefficients.device
    r = table.r_min + h * (torch.arange(g, dtype=torch.float64)[:, None] + frac[None, :]).reshape(-1)
    r = r.to(device)
    exact, dexact = _values_and_derivatives(filter_fn, r)
    rt = r.to(table.coefficients.dtype)
    approx, dapprox = table.lookup(rt), lookup_derivative(table, rt)
    tiny = torch.finfo(torch.float64).tiny

    def relative(a, b):
        scale = b.abs().amax(dim=0).clamp_min(tiny)
        return float(((a.double() - b).abs().amax(dim=0) / scale).max())

    return relative(approx, exact), relative(dapprox, dexact)


def lookup_derivative(table: FilterTable, r: torch.Tensor) -> torch.Tensor:
    """df/dr [E, C] of the table's interpolant at lengths r [E] (what the kernels' backward uses),
    in closed form."""
    c, t = table.position(r)
    return (c[..., 1, :] + t * (2 * c[..., 2, :] + 3 * t * c[..., 3, :])) * table.inverse_step
