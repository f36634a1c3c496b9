"""What a fused message launch is given besides its tensors (:mod:`torchmdx.kernels.message_triton`):
the edge layout and the compile-time spec.

- :class:`EdgeLayout`: segments of an edge list sorted by receiver (row pointers from
  ``torch.searchsorted``) and, on first use, the sender-sorted permutation with its segments.
  Segments end after their last valid row (:func:`segment_ends`), so the padding rows of a fixed-capacity
  neighbor list (all on atom N - 1) are not walked. Nothing synchronises with the host: grids come from tensor
  shapes, so the whole message step can be captured in a CUDA graph.
- :class:`_Spec`: the kernels' constexprs (filter modes, activations, padded sizes, tile sizes,
  precision) and the launch grid (programs over atoms x channel chunks); built from the launch
  configuration by ``message_triton._make_spec``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

#: activation name -> code understood by the kernels
ACTIVATION_CODES = {"silu": 0, "swish": 0, "ssp": 1, "tanh": 2, "sigmoid": 3, "mish": 4}


def _pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


# ---------------------------------------------------------------------------------- layout
def segment_ends(ptr: torch.Tensor, keys: torch.Tensor, mask: Optional[torch.Tensor],
                 traced: bool = False) -> torch.Tensor:
    """End of each segment of sorted ``keys`` (segment i: rows ``ptr[i]`` to ``ptr[i + 1]``) after its last
    valid row (``mask``; None: every row valid), at least ``ptr[i]`` (empty or fully masked segments stay
    empty); no host sync, no atomics. With c_p the number of valid rows before row p (an exclusive prefix sum
    of the mask, c_0 = 0), segment i's valid rows end where c first reaches c at the segment's end:

        end_i = max(ptr_i, min{p : c_p >= c_(ptr_(i+1))})     (``searchsorted``, left side)

    since c_p steps up by one just after each valid row. Exact and deterministic. It replaced
    a ``scatter_reduce`` amax of (index + 1) keyed by segment, whose atomics all hit atom
    N - 1 on a capacity-padded list (the padding rows): one 35-95 µs kernel per call on
    22-166 atoms (H100, 2026-12-06), the largest element-wise kernel of chignolin's call.
    A cummax scan before it cost 0.28 ms on 10^5 rows.

    One function, two forms (same numbers): eager (``traced=False``, :class:`EdgeLayout`) writes the prefix
    count into a slice of its zero-initialised buffer with ``torch.cumsum(..., out=)`` (no ``cat`` launch) and,
    without a mask, returns the view ``ptr[1:]``; ``traced=True``
    (:func:`torchmdx.kernels.message_ops.segments`, recorded by ``make_fx`` / ``torch.compile``) builds the
    prefix count with ``cat`` (no ``out=`` into a view inside a traced graph) and, without a mask, returns a
    fresh tensor (``ptr[1:].clone()``), not a view of ``ptr``: the traced graph hands both to the custom
    operators of :mod:`torchmdx.kernels.message_ops`, which keep their tensors free of aliasing (a custom
    operator's outputs must not alias its inputs)."""
    count = keys.numel()
    if mask is None or count == 0:
        return ptr[1:].clone() if traced else ptr[1:]
    if traced:
        valid_before = torch.cat([ptr.new_zeros(1), torch.cumsum(mask != 0, dim=0, dtype=ptr.dtype)])
    else:
        valid_before = torch.zeros(count + 1, device=keys.device, dtype=ptr.dtype)
        torch.cumsum(mask != 0, dim=0, dtype=ptr.dtype, out=valid_before[1:])
    ends = torch.searchsorted(valid_before, valid_before.index_select(0, ptr[1:]))
    return torch.maximum(ends, ptr[:-1])


class EdgeLayout:
    """Segments of an edge list sorted by receiver: row pointers of receivers and, on first
    use, the sender-sorted permutation with its row pointers (no host synchronisation).

    Segment i runs from ``rowptr[i]`` to ``rowend[i]``, which drops the segment's trailing
    masked rows: a fixed-capacity neighbor list puts all its padding rows (i = j = N - 1, mask
    False) on the last atom, and one program would otherwise walk them all. ``rowend`` is the
    index after the segment's last valid row (from a prefix count of valid rows: deterministic,
    no atomics); the sender side does the same in sender-sorted order (``colend``).
    """

    def __init__(self, edge_index: torch.Tensor, num_nodes: int, mask: Optional[torch.Tensor] = None,
                 segments: Optional[tuple] = None):
        self.edge_index = edge_index
        self.version = edge_index._version
        self.num_nodes = num_nodes
        self.mask = mask
        self.mask_version = mask._version if mask is not None else None
        self.receivers = edge_index[0].contiguous()
        self.senders = edge_index[1].contiguous()
        self._sender = None
        if segments is not None:  # computed elsewhere (from_segments)
            self._nodes = None  # made by sender_order when a call needs it (no launch otherwise)
            self.rowptr, self.rowend = segments
            return
        self._nodes = torch.arange(num_nodes + 1, device=edge_index.device, dtype=edge_index.dtype)
        self.rowptr = torch.searchsorted(self.receivers, self._nodes)
        self.rowend = segment_ends(self.rowptr, self.receivers, mask)

    @classmethod
    def from_segments(cls, edge_index: torch.Tensor, num_nodes: int, mask: Optional[torch.Tensor],
                      rowptr: torch.Tensor, rowend: torch.Tensor) -> "EdgeLayout":
        """The layout with receiver segments computed elsewhere (``rowptr`` [N + 1], ``rowend`` [N]:
        what :meth:`__init__` would compute; the custom operators of
        :mod:`torchmdx.kernels.message_ops` take them as inputs, made once per graph by
        :func:`~torchmdx.kernels.message_ops.segments`)."""
        return cls(edge_index, num_nodes, mask, segments=(rowptr, rowend))

    def sender_order(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(colptr [N+1], colend [N], perm [E]): edges perm[colptr[j]:colend[j]] are those sent
        by j (trailing masked ones dropped)."""
        if self._sender is None:
            if self._nodes is None:
                self._nodes = torch.arange(self.num_nodes + 1, device=self.senders.device, dtype=self.senders.dtype)
            sorted_senders, perm = torch.sort(self.senders, stable=True)
            colptr = torch.searchsorted(sorted_senders, self._nodes)
            mask = self.mask.index_select(0, perm) if self.mask is not None else None
            self._sender = (colptr, segment_ends(colptr, sorted_senders, mask), perm)
        return self._sender

    def matches(self, edge_index: torch.Tensor, num_nodes: int, mask: Optional[torch.Tensor]) -> bool:
        return (self.edge_index is edge_index and self.version == edge_index._version and self.num_nodes == num_nodes
                and self.mask is mask and (mask is None or self.mask_version == mask._version))


# ---------------------------------------------------------------------------------- spec
@dataclass(frozen=True)
class _Spec:
    heads: int
    head_dim: int
    num_rbf: int
    dk_mode: int  # 0 none, 1 given [E, F], 2 from rbf in the kernels, 3 pre-activation from one matrix product,
    #               4 interpolated from a table in the edge length
    dv_mode: int
    has_mask: bool
    self_loop: bool
    self_dk: bool
    self_dv: bool
    vector_cutoff: bool
    attn_activation: str
    filter_activation: str
    # launch
    hb: int
    hp: int
    dp: int
    kp: int
    be: int
    num_warps: int
    precision: str
    programs_per_sm: int = 0
    num_stages: Optional[int] = None
    maxnreg: Optional[int] = None
    dk_stride: int = 0  # row strides of the given / pre-activation filter buffers (modes 1 and 3)
    dv_stride: int = 0
    merged: bool = False  # backward: sender side inside the receiver kernel (symmetric lists)
    # mode 4 (filters interpolated from tables, torchmdx.kernels.filter_table): intervals G, r_min (Å),
    # 1 / h (Å^-1); the edge lengths travel in the rbf slot, the coefficients in the weights' slots
    table_intervals: int = 1
    table_r_min: float = 0.0
    table_inverse_step: float = 1.0
    reverse: bool = False  # backward: sender kernel over the receiver segments' reverse edges (symmetric lists)
    table_packed: bool = False  # mode 4 with the compact coefficient buffers (FilterTable.compact)

    @property
    def chunks(self) -> int:
        """Channel chunks of ``hb`` heads: the second grid dimension of every kernel."""
        return -(-self.heads // self.hb)

    def constexprs(self) -> dict:
        return dict(
            H=self.heads, D=self.head_dim, K=self.num_rbf, HB=self.hb, DP=self.dp, KP=self.kp, BE=self.be,
            DK_MODE=self.dk_mode, DV_MODE=self.dv_mode, HAS_MASK=self.has_mask, SELF_LOOP=self.self_loop,
            SELF_DK=self.self_dk, SELF_DV=self.self_dv, VCUT=self.vector_cutoff,
            ATT=ACTIVATION_CODES[self.attn_activation], FACT=ACTIVATION_CODES[self.filter_activation],
            PREC=self.precision, DKS=self.dk_stride, DVS=self.dv_stride, num_warps=self.num_warps,
            TG=self.table_intervals, TR0=float(self.table_r_min), TIH=float(self.table_inverse_step),
            TPK=self.table_packed,
            **({} if self.num_stages is None else {"num_stages": self.num_stages}),
            **({} if self.maxnreg is None else {"maxnreg": self.maxnreg}),
        )

    def grid(self, num_atoms: int, device: torch.device) -> tuple:
        """(programs over atoms, channel chunks)."""
        programs = num_atoms
        if self.programs_per_sm > 0 and device.type == "cuda":
            programs = min(num_atoms, self.programs_per_sm * _multiprocessors(device))
        return (max(programs, 1), self.chunks)


_SM_COUNT: dict = {}


def _multiprocessors(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]
