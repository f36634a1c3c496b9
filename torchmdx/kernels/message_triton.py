"""Fused Triton message step of one equivariant-transformer (ET) layer, forward and backward.

Same function as :func:`torchmdx.kernels.message_ref.et_message` (see its docstring for the
shapes), computed without materialising any per-edge feature tensor. For edge e = (i <- j),
head h with channels c (D = F / H of them), N atoms, E edges sorted by receiver i:

    dk_e   = act_f(W_k rbf_e + b_k)  [F]      dv_e = act_f(W_v rbf_e + b_v)  [3F]
    a_eh   = act_a( sum_{c in h} q_ic k_jc dk_ec )
    (s1, s2, s3)_e = v_j * dv_e                                     (3 blocks of D per head)
    cutoff phi_e on a_eh (standard ET) or on (s1, s2, s3)_e (``vector_cutoff``)
    m_i    = sum_e a_e s1_e                                          [N, F]
    u_i    = sum_e vec_j s2_e + s3_e (x) d_ij                        [N, 3, F]
    plus the self edge (i <- i, r = 0, d = 0) with filters dk0, dv0 and cutoff phi0.

Entry points
------------
- :func:`et_message`: drop-in for the reference (``dk`` [E, F] and ``dv`` [E, 3F] given,
  or None). Used where the caller already holds the filters.
- :func:`et_message_filtered`: takes the RBF rows ``rbf`` [E, K] and the filter weights
  (W_k [F, K], b_k, W_v [3F, K], b_v, activation ``filter_activation``); where the filters are
  evaluated is ``CONFIG.filters``: 'gemm' (what 'table', the default, means here) computes the pre-activation
  z = rbf [W_k; W_v]^T + b [E, 4F] by one Triton product per layer, the kernels apply
  act_f, the backward recomputes z, overwrites it with dL/dz and turns that into dL/drbf by one
  more product (transient memory E x 4F per layer, not kept between forward and backward);
  'kernel' evaluates dk, dv inside every kernel with ``tl.dot`` on blocks of edges (O(E K)
  memory, but about three times the registers: slower, docs/kernels_message.md). The
  backward returns dL/drbf [E, K] (which carries the position dependence together with phi
  and the unit vectors).
- :class:`FusedMessage`: one object per model forward pass (what
  :func:`torchmdx.nn.et.message_function` returns). Calling it is :func:`et_message`; its
  :meth:`FusedMessage.filtered` is :func:`et_message_filtered`; it computes the edge layout
  (receiver row pointers, sender permutation) once and reuses it in every layer.

Kernel launches, the autograd wiring and the kernels' design:
:mod:`torchmdx.kernels.message_triton_autograd` (its names used elsewhere are re-exported here:
``_FusedMessageFunction``, ``_preactivation``, ``_rbf_gradient``, ``_stack_filters``, ``LAST_BACKWARD``,
``interpreted``). Segments and the launch spec: :mod:`torchmdx.kernels.message_triton_spec`.
Design notes and measurements: ``docs/kernels_message.md``.

Gradients and their limits (which are produced, and the reference backward behind second
derivatives): :mod:`torchmdx.kernels.message_triton_grad`.

Dtypes float32 and float64 (float64 for tests). In float32 the filter products use
``CONFIG.dot_precision`` ("tf32x3": three tf32 tensor-core passes, float32 accuracy; falls
back to "ieee" if the compiler refuses it). Any F divisible by H: D is padded to a power of
two with masked channels. Runs on CUDA tensors, and on CPU tensors under the Triton
interpreter (``TRITON_INTERPRET=1`` set before ``triton`` is imported); anything else goes to
the torch reference.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch

from torchmdx.kernels import message_ref
from torchmdx.kernels.message_triton_autograd import (  # noqa: F401 - some re-exported (see the docstring)
    HAVE_TRITON,
    LAST_BACKWARD,
    _dot_precision,
    _FusedMessageFunction,
    _launch,
    _preactivation,
    _rbf_gradient,
    _stack_filters,
    interpreted,
    kernels,
    triton,
)
from torchmdx.kernels.message_triton_grad import _grad_node, reference_filtered, reference_tabulated
from torchmdx.kernels.message_triton_spec import ACTIVATION_CODES, EdgeLayout, _pow2, _Spec


@dataclass(slots=True)  # slots: a misspelt or removed field set on CONFIG is an AttributeError, not ignored
class LaunchConfig:
    """Launch parameters (the benchmark may change them).

    A field left at None / 'auto' is chosen per call (:func:`resolved_config`): on a CUDA GPU
    from the measured launch table (:mod:`torchmdx.kernels.launch_table`, keyed by the GPU's
    name and the call's size class) when ``table`` is True and it has an entry, else the
    built-in default named below. A field set explicitly always wins.

    block_edges      edges per block (BE); at least 16 where the filters use tl.dot (default 16)
    chunk_channels   channels per chunk (whole heads; at least one head) (default 32)
    num_warps        warps per program (default 4)
    dot_precision    tl.dot input precision of the float32 filter products: 'tf32x3'
                     (default: three tf32 passes, float32 accuracy), 'tf32', 'ieee', 'bf16x3'
                     or 'bf16x6' (split-bf16 products; Triton >= 3.5); float64 always uses a
                     multiply-sum ('fma'); the table may pick only a precision that passed
                     the force-error gate (:func:`torchmdx.kernels.launch_table.gate`)
    programs_per_sm  persistent grid: at most this many programs per multiprocessor and
                     channel chunk, each looping over atoms (0, the default: one program per atom)
    num_stages       Triton software-pipelining depth (None: the table's, else Triton's default)
    maxnreg          register cap per thread (None: the table's, else no cap)
    sender_side      how the backward gets the sender-side gradients dL/dk, dL/dv, dL/dvec:
                     'sorted' (the default: a second kernel walks the edges of each sender
                     through a stable sort of the senders), 'merged' (for calls that declare a
                     symmetric edge list, :class:`FusedMessage` ``symmetric=True``: the
                     receiver kernel adds them while it walks each atom's own segment, using
                     the reverse edges; no sort, no second kernel, the filters read once) or
                     'reverse' (symmetric lists too: the sender kernel walks each atom's own
                     receiver segment and takes the reverse edges, as 'merged' does, but in a
                     kernel of its own: no sort and no permutation gather, and two kernels of
                     fewer registers than the merged one; a list not declared symmetric runs
                     'sorted' for both)
    filters          where the radial filters are evaluated: 'table' (the default, see below;
                     calls of :func:`et_message_filtered`, i.e. with trainable filter weights,
                     then run 'gemm'), 'gemm' (one matrix product z = rbf W^T + b per layer before
                     the kernels, which apply act_f; the backward recomputes z and overwrites
                     it with dL/dz, and one more product gives dL/drbf: transient GPU memory
                     E x 4F; keeping z from the forward instead was measured slower, even on
                     small systems, docs/kernels_message.md changelog 2026-12-06 night),
                     'kernel' (tl.dot on blocks of edges inside every kernel: O(E K)
                     memory, but three times the registers),
                     'table' (inference with frozen filter weights: the model passes the edge
                     lengths and cubic tables of its filters, :mod:`torchmdx.kernels.filter_table`,
                     and the kernels interpolate; no product, no [E, 4F] buffer; 15-42 % faster
                     calls on an H100 at 22-30 327 atoms, docs/kernels_message.md "Filter tables";
                     :meth:`FusedMessage.wants_tables`)
    table_storage    how 'table' calls store the coefficients: 'float32' (the default: c0..c3,
                     16 B per channel and interval) or 'compact' (c0, c1 float32, c2 and c3 as
                     fixed-point integers in one word: 12 B, error 2^-20 of the channel's largest
                     c2; :meth:`torchmdx.kernels.filter_table.FilterTable.compact`); float64 tables
                     are always 'float32'
    table            consult the measured launch table for the fields left None / 'auto'
    """

    block_edges: Optional[int] = None
    chunk_channels: Optional[int] = None
    num_warps: Optional[int] = None
    dot_precision: str = "auto"
    programs_per_sm: Optional[int] = None
    num_stages: Optional[int] = None
    maxnreg: Optional[int] = None
    filters: str = "auto"
    sender_side: str = "auto"
    table_storage: str = "auto"
    table: bool = True


CONFIG = LaunchConfig()

FILTER_PLACES = ("auto", "gemm", "kernel", "table")
SENDER_SIDES = ("auto", "sorted", "merged", "reverse")
TABLE_STORAGES = ("auto", "float32", "compact")

#: the resolved launch configuration of the last fused call (diagnostics, benchmarks and tests);
#: its ``filters`` is the place that ran: 'table', 'gemm', 'kernel', 'given' or 'none'
LAST_CONFIG: dict = {}


def runs_on(device: torch.device) -> bool:
    """Do the fused kernels run on ``device``? CUDA devices, or the CPU under the interpreter."""
    return HAVE_TRITON and (device.type == "cuda") != interpreted()


def supported(tensor: torch.Tensor) -> bool:
    """Can the fused kernels run on this tensor's device and dtype?"""
    return tensor.dtype in (torch.float32, torch.float64) and runs_on(tensor.device)


_GPU_NAMES: dict = {}


def _gpu_name(device: torch.device) -> Optional[str]:
    """``torch.cuda.get_device_name`` of a CUDA device (cached), None elsewhere (the
    interpreter, the CPU): the key of the launch table."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _GPU_NAMES:
        _GPU_NAMES[index] = torch.cuda.get_device_name(index)
    return _GPU_NAMES[index]


def resolved_config(num_atoms: int, gpu_name: Optional[str] = None, place: str = "gemm") -> LaunchConfig:
    """:data:`CONFIG` with every None / 'auto' field decided for a call of ``num_atoms`` atoms
    on the GPU named ``gpu_name`` (None: no GPU, so no table) whose filters come from ``place``
    ('gemm': RBF rows and weights; 'table': interpolated, :meth:`FusedMessage.tabulated`): the
    launch table's entry for that GPU, size class and place where ``CONFIG.table``
    (:func:`torchmdx.kernels.launch_table.lookup`), else the built-in defaults."""
    from torchmdx.kernels import launch_table

    explicit = {name: getattr(CONFIG, name) for name in launch_table.DEFAULTS}
    values = launch_table.resolve(explicit, gpu_name, num_atoms, use_table=CONFIG.table, place=place)
    return LaunchConfig(**values, table=CONFIG.table)


def _make_spec(dtype, heads, head_dim, num_rbf, dk_mode, dv_mode, has_mask, self_loop, self_dk, self_dv,
               vector_cutoff, attn_activation, filter_activation, merged=False, cfg: Optional[LaunchConfig] = None,
               table_geometry: tuple = (1, 0.0, 1.0), reverse: bool = False, table_packed: bool = False) -> _Spec:
    cfg = cfg if cfg is not None else resolved_config(0)
    uses_dot = dk_mode == 2 or dv_mode == 2
    dp = _pow2(head_dim)
    hp = _pow2(heads)
    hb = max(1, min(hp, _pow2(max(cfg.chunk_channels, 1)) // dp))
    be = _pow2(max(cfg.block_edges, 1))
    kp = _pow2(max(num_rbf, 1))
    if uses_dot:  # tl.dot needs every dimension >= 16
        if hb * dp < 16:
            hb = min(hp, max(1, 16 // dp))
        if hb * dp < 16:
            dp = 16 // hb
        be = max(be, 16)
        kp = max(kp, 16)
    precision = _dot_precision(dtype, cfg.dot_precision)
    f = heads * head_dim
    if dk_mode == 3 or dv_mode == 3:  # one buffer z = [z_k | z_v]
        dk_stride = dv_stride = f * ((dk_mode == 3) + 3 * (dv_mode == 3))
    else:
        dk_stride, dv_stride = f, 3 * f
    return _Spec(heads, head_dim, num_rbf, dk_mode, dv_mode, has_mask, self_loop, self_dk, self_dv, vector_cutoff,
                 attn_activation, filter_activation, hb, hp, dp, kp, be, cfg.num_warps, precision,
                 cfg.programs_per_sm, cfg.num_stages, cfg.maxnreg, dk_stride, dv_stride, merged, *table_geometry,
                 reverse, table_packed)


# ---------------------------------------------------------------------------------- entry points
class FusedMessage:
    """The fused message function for one model forward pass (see the module docstring).

    ``FusedMessage()(q, k, v, vec, dk, dv, ...)`` has the signature of
    :func:`torchmdx.kernels.message_ref.et_message`; :meth:`filtered` takes the RBF rows and
    filter weights instead of dk / dv. The edge layout of the last ``edge_index`` seen is kept
    (same tensor object, unchanged version), so the layers of one forward pass share it.
    Create a new object per forward pass: a kept layout is not refreshed when a CUDA graph
    replay rewrites ``edge_index`` in place.

    ``symmetric=True`` declares that the edge list is symmetric: every edge (i <- j) has a
    reverse edge (j <- i) with the same filters (rbf, or the given dk / dv), cutoff weight and
    mask, and the opposite unit vector. A full neighbor list with distance-only filters is (the
    ET model's lists). The backward may then take the sender side from the reverse edges
    (``CONFIG.sender_side``); on a list that is not symmetric that would be wrong.
    """

    def __init__(self, symmetric: bool = False):
        self._layout: Optional[EdgeLayout] = None
        self.symmetric = bool(symmetric)

    def layout(self, edge_index: torch.Tensor, num_nodes: int, mask: Optional[torch.Tensor] = None) -> EdgeLayout:
        if self._layout is None or not self._layout.matches(edge_index, num_nodes, mask):
            self._layout = EdgeLayout(edge_index, num_nodes, mask)
        return self._layout

    def __call__(self, q, k, v, vec, dk, dv, cutoff_weight, unit_vectors, edge_index, num_heads, *,
                 edge_mask=None, self_loop=None, attn_activation="silu", vector_cutoff=False):
        return self._run(q, k, v, vec, dk, dv, None, None, None, None, None, "silu", cutoff_weight, unit_vectors,
                         edge_index, num_heads, edge_mask, self_loop, attn_activation, vector_cutoff)

    def filtered(self, q, k, v, vec, rbf, dk_weight, dk_bias, dv_weight, dv_bias, cutoff_weight, unit_vectors,
                 edge_index, num_heads, *, filter_activation="silu", edge_mask=None, self_loop=None,
                 attn_activation="silu", vector_cutoff=False):
        return self._run(q, k, v, vec, None, None, rbf, dk_weight, dk_bias, dv_weight, dv_bias, filter_activation,
                         cutoff_weight, unit_vectors, edge_index, num_heads, edge_mask, self_loop, attn_activation,
                         vector_cutoff)

    def tabulated(self, q, k, v, vec, r, key_table, value_table, cutoff_weight, unit_vectors, edge_index, num_heads,
                  *, edge_mask=None, self_loop=None, attn_activation="silu", vector_cutoff=False):
        """:meth:`filtered` with the radial filters interpolated from tables in the edge lengths
        ``r`` [E] (Å; invalid edges carry any length inside the tables' range):
        ``key_table`` / ``value_table`` are :class:`~torchmdx.kernels.filter_table.FilterTable` of
        F / 3F channels (or None: no such filter) on one grid. Inference only: the tables get no
        gradient; dL/dr does. What a model passes when :meth:`wants_tables` says so."""
        tables = (key_table, value_table)
        if key_table is None and value_table is None:  # no distance influence: nothing to interpolate
            return self(q, k, v, vec, None, None, cutoff_weight, unit_vectors, edge_index, num_heads,
                        edge_mask=edge_mask, self_loop=self_loop, attn_activation=attn_activation,
                        vector_cutoff=vector_cutoff)
        if key_table is not None and value_table is not None and (
                (key_table.intervals, key_table.r_min, key_table.r_max)
                != (value_table.intervals, value_table.r_min, value_table.r_max)):
            raise ValueError("the key and value filter tables must share one grid (intervals, r_min, r_max)")
        return self._run(q, k, v, vec, None, None, r, None, None, None, None, "silu", cutoff_weight, unit_vectors,
                         edge_index, num_heads, edge_mask, self_loop, attn_activation, vector_cutoff, tables)

    @staticmethod
    def wants_tables(num_atoms: int, device: torch.device) -> bool:
        """Should a model whose filter weights are frozen call :meth:`tabulated` for a call of
        ``num_atoms`` atoms on ``device``? True where the resolved ``CONFIG.filters`` is 'table'
        (set, or from the launch table) and the kernels run there."""
        return runs_on(device) and resolved_config(num_atoms, _gpu_name(device)).filters == "table"

    def _run(self, q, k, v, vec, dk, dv, rbf, wk, bk, wv, bv, filter_activation, phi, unit, edge_index, num_heads,
             edge_mask, self_loop, attn_activation, vector_cutoff, tables=None):
        plan = self._plan(q, k, v, vec, dk, dv, rbf, wk, bk, wv, bv, filter_activation, phi, unit, edge_index,
                          num_heads, edge_mask, self_loop, attn_activation, vector_cutoff, tables)
        if plan is None:
            return self._reference(q, k, v, vec, dk, dv, rbf, wk, bk, wv, bv, filter_activation, phi, unit, edge_index,
                                   num_heads, edge_mask, self_loop, attn_activation, vector_cutoff, tables)
        spec, layout, weight_nodes, tensors = plan
        return _FusedMessageFunction.apply(spec, layout, weight_nodes, *tensors)

    @staticmethod
    def _reference(q, k, v, vec, dk, dv, rbf, wk, bk, wv, bv, filter_activation, phi, unit, edge_index, num_heads,
                   edge_mask, self_loop, attn_activation, vector_cutoff, tables=None):
        """The torch reference of the call (where the kernels cannot run it)."""
        kwargs = dict(edge_mask=edge_mask, self_loop=self_loop, attn_activation=attn_activation,
                      vector_cutoff=vector_cutoff)
        if tables is not None:
            return reference_tabulated(q, k, v, vec, rbf, *tables, phi, unit, edge_index, num_heads, **kwargs)
        if rbf is not None:
            return reference_filtered(q, k, v, vec, rbf, wk, bk, wv, bv, phi, unit, edge_index, num_heads,
                                      filter_activation=filter_activation, **kwargs)
        return message_ref.et_message(q, k, v, vec, dk, dv, phi, unit, edge_index, num_heads, **kwargs)

    def _plan(self, q, k, v, vec, dk, dv, rbf, wk, bk, wv, bv, filter_activation, phi, unit, edge_index, num_heads,
              edge_mask, self_loop, attn_activation, vector_cutoff, tables=None, layout: Optional[EdgeLayout] = None):
        """(spec, layout, weight_nodes, tensors) of the kernels' launch for this call, or None where
        the torch reference must run it (:meth:`_reference`). ``layout``: the edge layout to use
        (default: :meth:`layout`'s, kept between the layers of a forward pass)."""
        filtered = rbf is not None and tables is None
        dk0 = dv0 = phi0 = None
        if self_loop is not None:
            dk0, dv0, phi0 = self_loop
            if not torch.is_tensor(phi0):
                phi0 = torch.tensor(float(phi0), dtype=q.dtype, device=q.device)
        n, f = q.shape
        if tables is not None:  # the edge lengths in the rbf slot, the coefficients in the weights' slots
            key_table, value_table = tables
            geometry = next(t for t in tables if t is not None)
            wk = key_table.coefficients if key_table is not None else None
            wv = value_table.coefficients if value_table is not None else None
        others = [t for t in (k, v, vec, dk, dv, rbf, wk, bk, wv, bv, phi, unit, dk0, dv0, phi0) if t is not None]
        fallback = (
            not supported(q)
            or any(t.dtype != q.dtype or t.device != q.device for t in others)
            or attn_activation not in ACTIVATION_CODES
            or (filtered and filter_activation not in ACTIVATION_CODES)
            or f % num_heads != 0
            or (phi0 is not None and phi0.requires_grad)
        )
        if fallback:
            return None
        head_dim = f // num_heads
        if CONFIG.sender_side not in SENDER_SIDES:
            raise ValueError(f"message_triton.CONFIG.sender_side must be one of {SENDER_SIDES}, "
                             f"not {CONFIG.sender_side!r}")
        if CONFIG.filters not in FILTER_PLACES:
            raise ValueError(f"message_triton.CONFIG.filters must be one of {FILTER_PLACES}, not {CONFIG.filters!r}")
        if CONFIG.table_storage not in TABLE_STORAGES:
            raise ValueError(f"message_triton.CONFIG.table_storage must be one of {TABLE_STORAGES}, "
                             f"not {CONFIG.table_storage!r}")
        cfg = resolved_config(n, _gpu_name(q.device), "table" if tables is not None else "gemm")
        LAST_CONFIG.clear()
        LAST_CONFIG.update(asdict(cfg))
        merged = self.symmetric and cfg.sender_side == "merged"
        reverse = self.symmetric and cfg.sender_side == "reverse"
        table_geometry = (1, 0.0, 1.0)
        table_packed = False
        if tables is not None:  # mode 4: interpolated from the tables
            dk_mode = 4 if wk is not None else 0
            dv_mode = 4 if wv is not None else 0
            num_rbf = 1
            table_geometry = (geometry.intervals, geometry.r_min, geometry.inverse_step)
            table_packed = cfg.table_storage == "compact" and q.dtype == torch.float32
            if table_packed:  # the compact buffers (made once per table, cached on it)
                wk = key_table.compact().packed if key_table is not None else None
                wv = value_table.compact().packed if value_table is not None else None
        elif filtered:
            mode = 2 if cfg.filters == "kernel" else 3  # 'table' without tables: the GEMM place
            dk_mode = mode if wk is not None else 0
            dv_mode = mode if wv is not None else 0
            num_rbf = rbf.shape[-1]
            if bk is None and wk is not None:
                bk_t = torch.zeros(f, dtype=q.dtype, device=q.device)
            else:
                bk_t = bk
            if bv is None and wv is not None:
                bv_t = torch.zeros(3 * f, dtype=q.dtype, device=q.device)
            else:
                bv_t = bv
            bk, bv = bk_t, bv_t
        else:
            dk_mode = 1 if dk is not None else 0
            dv_mode = 1 if dv is not None else 0
            num_rbf = 1
        # the place that runs (a resolved 'table' runs 'gemm' for calls with RBF rows and weights)
        LAST_CONFIG["filters"] = {4: "table", 3: "gemm", 2: "kernel", 1: "given", 0: "none"}[max(dk_mode, dv_mode)]
        LAST_CONFIG["table_storage"] = "compact" if table_packed else "float32"
        mask = edge_mask.view(torch.uint8) if edge_mask is not None and edge_mask.dtype == torch.bool else edge_mask
        spec = _make_spec(q.dtype, num_heads, head_dim, num_rbf, dk_mode, dv_mode, mask is not None,
                          self_loop is not None, dk0 is not None, dv0 is not None, bool(vector_cutoff),
                          attn_activation, filter_activation, merged, cfg, table_geometry, reverse, table_packed)
        layout = layout if layout is not None else self.layout(edge_index, n, edge_mask)
        tensors = [q, k, v, vec, dk, dv, rbf, wk, bk, wv, bv, phi, unit, mask, dk0, dv0, phi0]
        tensors = [t.contiguous() if t is not None else None for t in tensors]
        # grad mode is off inside Function.forward: find the weights' gradient nodes here
        weight_nodes = [_grad_node(t) for t in (wk, bk, wv, bv)] if torch.is_grad_enabled() else [None] * 4
        return spec, layout, weight_nodes, tensors


def et_message(q, k, v, vec, dk, dv, cutoff_weight, unit_vectors, edge_index, num_heads, *,
               edge_mask=None, self_loop=None, attn_activation="silu", vector_cutoff=False, symmetric=False):
    """Fused drop-in for :func:`torchmdx.kernels.message_ref.et_message` (same arguments;
    ``symmetric``: see :class:`FusedMessage`)."""
    return FusedMessage(symmetric)(q, k, v, vec, dk, dv, cutoff_weight, unit_vectors, edge_index, num_heads,
                                   edge_mask=edge_mask, self_loop=self_loop, attn_activation=attn_activation,
                                   vector_cutoff=vector_cutoff)


def et_message_filtered(q, k, v, vec, rbf, dk_weight, dk_bias, dv_weight, dv_bias, cutoff_weight, unit_vectors,
                        edge_index, num_heads, *, filter_activation="silu", edge_mask=None, self_loop=None,
                        attn_activation="silu", vector_cutoff=False, symmetric=False):
    """Fused message with the radial filters computed in the kernels (see the module docstring).

    rbf [E, K]; dk_weight [F, K] and dk_bias [F] (or None: no key filter); dv_weight [3F, K]
    and dv_bias [3F] (or None); ``filter_activation`` act_f. Other arguments as
    :func:`et_message`.
    """
    return FusedMessage(symmetric).filtered(q, k, v, vec, rbf, dk_weight, dk_bias, dv_weight, dv_bias,
                                            cutoff_weight, unit_vectors, edge_index, num_heads,
                                            filter_activation=filter_activation, edge_mask=edge_mask,
                                            self_loop=self_loop, attn_activation=attn_activation,
                                            vector_cutoff=vector_cutoff)
