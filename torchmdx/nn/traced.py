"""Energy and forces of a potential as ONE traced and compiled graph (forward and backward).

For a structure (or batch) of fixed shape, the whole evaluation

    vectors_e = pos[j_e] - pos[i_e] + offset_e,   valid_e = mask_e and |vectors_e| < cutoff
    t_a       = potential.atomic_energies(graph)                                (eV)
    E_b       = sum_{a in b} t_a,                  F_a = -dE/dpos_a             (eV, eV/Å)

is traced with ``make_fx`` *through* ``torch.autograd.grad`` into one FX graph of aten
operations (the forces' backward pass included; parameters and buffers are graph inputs), then
compiled by inductor (``torch.compile``). Inductor fuses across everything: the element-wise
work of one layer's backward with the next layer's, the per-edge message of the reference path
(gathers, filters, attention, messages, scatter) into a few kernels, the dense parts around it.
For a 22-atom molecule one call is 167 kernel launches (with combo kernels) where the per-part
compilation (:meth:`ETPotential.set_compiled`) needs 303 (H200, 2026-12-03; docs/model.md).

Training. The traced graph is an ordinary differentiable function of the parameters: called
with ``training=True`` (parameters that require grad), AOTAutograd differentiates it once more,
so a force loss gets its parameter gradients (the double backward) from compiled, fused
kernels too. Backward operators without a derivative of their own (``silu_backward`` and
friends) are decomposed into primitives at trace time (:data:`DECOMPOSITION_OPS`).

Shapes are static: one graph per (atoms, edges, structures, dtype, device, inputs present); a
capacity-padded neighbor list (the MD engine's and the training graph's) keeps the edge count
fixed. The message step runs the torch reference here (inductor compiles it), unless the
inference graph takes the fused Triton message as custom operators (:data:`FUSED_MESSAGE_IN_GRAPH`,
``fused_message``; :mod:`torchmdx.kernels.message_ops`, off by default until timed on a GPU). The
scatter sums inductor generates use atomic adds on the GPU, so float32 results are not bitwise reproducible run to run (the
fused Triton message kernels are); they agree with the eager path to float32 rounding (tested).
"""

from __future__ import annotations

from typing import Optional

import torch

from torchmdx.nn.base import Graph, masked_edges, pair_edges
from torchmdx.nn.et import SMALL_MATMUL_ATOMS

aten = torch.ops.aten

#: operators decomposed at trace time, because the training graph differentiates the traced
#: backward once more: the backward operators have no derivative formula of their own, and
#: ``native_layer_norm``'s mean / 1/std outputs (which its decomposed backward reads) are not
#: differentiable outputs, so gradients through them would be lost silently
DECOMPOSITION_OPS = (
    "silu_backward", "sigmoid_backward", "tanh_backward", "softplus_backward", "mish_backward",
    "native_layer_norm", "native_layer_norm_backward", "embedding_dense_backward", "gelu_backward", "threshold_backward",
)


def _decompositions() -> dict:
    from torch._decomp import get_decompositions

    ops = [getattr(aten, name) for name in DECOMPOSITION_OPS if hasattr(aten, name)]
    return get_decompositions(ops)


#: inductor options by device type. CUDA: combo kernels (independent kernels launched as one)
#: took a 22-atom ET call from 0.82 to 0.64 ms per replay, 257 -> 167 launches (H200,
#: 2026-12-03). On the CPU the vectorised C++ code generator fails on a scatter of a constant
#: into a float64 buffer (torch 2.13: an assertion in cpp.py's store); the CPU graph is for
#: tests, so it is generated without vectorisation.
COMPILE_OPTIONS: dict = {"cpu": {"cpp.simdlen": 0}, "cuda": {"combo_kernels": True}}

#: tried once more with these options when compiling a graph fails: Triton 3.6 (torch 2.11,
#: H200) failed in make_ttgir on a persistent reduction of the training graph
FALLBACK_OPTIONS: dict = {"triton.persistent_reductions": False, "combo_kernels": False}

#: inductor options of the training graphs (``training=True``) by device type: on CUDA the
#: options that compiled there (the defaults failed, see :data:`FALLBACK_OPTIONS`); 32 x 21-atom
#: step 16.4 ms vs 22.2 ms with the model's eager autograd in the captured step (H200, 2026-12-03)
TRAINING_COMPILE_OPTIONS: dict = {"cpu": COMPILE_OPTIONS["cpu"], "cuda": dict(FALLBACK_OPTIONS)}

#: how a traced graph reaches inductor. "dynamo": ``torch.compile`` of the FX graph module (dynamo
#: traces the aten graph's Python code once more, and every call evaluates its frame and guards);
#: "inductor": the aten graph straight to inductor (``compile_fx``, what ``torch.compile``'s
#: backend does after dynamo), called as a plain function afterwards. make_fx's graph needs
#: nothing dynamo adds, so "inductor" only removes a layer (and its failure modes: the
#: Equiformer's graph failed on an H100 with dynamo's ``Unsupported: Attempt to trace generator``,
#: 2026-12-05). A potential picks one with ``traced_frontend`` (default "dynamo": the ET's
#: measured path)
FRONTENDS = ("dynamo", "inductor")

#: frontends whose graphs' structure energies are summed from the graph's per-atom energies outside the
#: compiled graph (one index_add after it; :class:`TracedForces` ``energy_outside`` "auto"). Measured on an
#: H100 (torch 2.11, 2026-12-07 evening, ``docs/benchmarks/2026-12-07-h100-e/``): the Equiformer's graph through
#: "inductor" with a capacity-padded list (mask) and the small products rewritten returned per-atom
#: energies equal to the eager model's (to 1e-4 eV) and forces within 1e-7 eV/Å, but a structure energy
#: 0.814 eV off (the sum of those same per-atom energies, -4179.7 eV, computed inside the graph); without
#: the mask, without the rewrite, or on the CPU it agreed to 1e-7. The ET's graphs ("dynamo") are checked
#: against float64 energies on the GPU (tests/test_traced.py, tests/test_calculator.py) and keep the sum in the graph.
ENERGY_OUTSIDE_FRONTENDS = ("inductor",)


def _strip_detach(graph_module) -> int:
    """Remove every ``aten.detach`` of a traced graph (returns how many).

    The autograd engine unpacks the results it saved for the backward (exp, sqrt, norms) as
    detached aliases, and make_fx records those as ``aten.detach``: they would cut the
    parameter-dependence of the traced forces, i.e. the double backward of training. The traced
    function detaches nothing of its own that matters (the positions only start the graph)."""
    removed = 0
    for node in list(graph_module.graph.nodes):
        if node.op == "call_function" and node.target is aten.detach.default:
            node.replace_all_uses_with(node.args[0])
            graph_module.graph.erase_node(node)
            removed += 1
    if removed:
        graph_module.recompile()
    return removed


#: matrix products A [M, K] @ B [K, N] of the traced inference graph with M <= this many rows, or
#: with K <= :data:`SMALL_INNER`, and with at most :data:`SMALL_OUTPUT` elements M N in the
#: result, are computed as a broadcast product summed over K (see :func:`small_products`).
#: 192 rather than 64 also turns the 22-atom call's remaining [128-192, K] products into fused
#: reductions: 159 -> 131 kernel launches, 0.575 -> 0.535 ms per replay (GPU 0.524 -> 0.455 ms;
#: H100, 2026-12-06, ``docs/benchmarks/2026-12-06-h100-e/``, small16 column ``rows192``).
SMALL_ROWS = 192
#: inference graphs (``small_rows`` "auto") of more atoms than this, all structures together, rewrite
#: no product as a reduction. At 166 atoms (chignolin, the fused message as operators in the graph)
#: cuBLAS's products beat the reductions, 0.916 against 1.019 ms per call (GPU 0.804 against 0.867
#: ms, 178 against 142 launches), while at 22 atoms the reductions win, 0.408 against 0.550 ms
#: (H100, 2026-12-07, ``docs/benchmarks/2026-12-07-h100-c/call7``, ``graph_traced_nosmall``
#: column). From a few thousand atoms up no product is small enough to be rewritten either way.
SMALL_PRODUCTS_MAX_ATOMS = 64
#: ``small_row_inner`` "auto" of inference graphs: the longest inner dimension of a product rewritten for its few rows
#: (:func:`small_products` ``max_row_inner``; None: any). Timed None: the 22-atom call's
#: [22, 384] @ [384, 128] products are its largest reductions (8-30 µs each), but leaving those of inner
#: dimension above 128 to cuBLAS lost in native MD, 2 219 against 2 808 steps/s (160 against 124 launches per
#: step; H100, 2026-12-07 afternoon, ``bench/bench_md.py --small-row-inner 128``,
#: ``docs/benchmarks/2026-12-07-h100-d/call1``)
SMALL_ROW_INNER: Optional[int] = None
#: the same bound for the training graph (:class:`TracedForces` with ``training=True``): its
#: weight-gradient products [F, atoms] @ [atoms, 3F] have F = 128 <= 192 rows and a long inner
#: dimension (672 for 32 x 21 atoms), a poor reduction; 64 is the bound the 7.82-ms captured
#: training step was measured with
TRAINING_SMALL_ROWS = SMALL_MATMUL_ATOMS
SMALL_INNER = 32
#: the largest product result (M N elements) rewritten as a reduction. Above it a reduction
#: kernel is slower than one cuBLAS product: the every-layer radial filters of a 22-atom call,
#: [535 edges, 32] @ [32, 3 072], took 48.5 µs as inductor's persistent reduction, 9 % of the
#: call's GPU time; with the bound the call went from 0.602 to 0.513 ms per replay (GPU time
#: 0.543 -> 0.465 ms), native MD from 1 530 to 1 810 steps/s, and the traced training step
#: (32 x 21 atoms) from 9.84 to 7.82 ms (H100, 2026-12-06, ``docs/benchmarks/2026-12-06-h100-d/``).
#: The per-layer products of small molecules (22 x 384) and the neighbour embedding's
#: (534 x 128) stay below it.
SMALL_OUTPUT = 1 << 18


def small_products(graph_module, max_rows: int = SMALL_ROWS, max_inner: int = SMALL_INNER,
                   max_output: Optional[int] = SMALL_OUTPUT, max_row_inner: Optional[int] = None) -> int:
    """Rewrite small matrix products (``aten.mm`` / ``aten.addmm``, forward and backward) as
    (A[:, :, None] * B[None]).sum(1) (+ bias); returns how many.

    Inductor turns such a sum into one fused reduction kernel, often merged with the
    element-wise work around it, where cuBLAS runs split-K kernels (3-4 launches of
    ~10 µs for a few dozen rows, measured on an H100: half the GPU time of a 22-atom call).
    Products with few rows (the atoms of a small molecule) or a short inner dimension (the 32
    radial basis functions of every edge filter) qualify, as long as the result has at most
    ``max_output`` elements (None: no bound); a large result is one efficient cuBLAS product.
    ``max_row_inner``: a product that qualifies by its rows alone (inner dimension above
    ``max_inner``) is rewritten only up to this inner dimension (None: any), e.g. to leave a
    22-atom call's [22, 384] @ [384, 128] products to cuBLAS and keep the shorter ones fused."""
    graph = graph_module.graph
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (aten.mm.default, aten.addmm.default):
            continue
        if node.target is aten.addmm.default:
            if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
                continue
            bias, a, b = node.args[:3]
        else:
            bias, (a, b) = None, node.args[:2]
        value = a.meta.get("val")
        if value is None:  # no shape recorded (not from make_fx's trace): leave the product alone
            continue
        rows, inner = value.shape
        if not (rows <= max_rows or inner <= max_inner):
            continue
        if inner > max_inner and max_row_inner is not None and inner > max_row_inner:
            continue
        columns = b.meta["val"].shape[1] if "val" in b.meta else None
        if max_output is not None and (columns is None or rows * columns > max_output):
            continue
        with graph.inserting_before(node):
            left = graph.call_function(aten.unsqueeze.default, (a, 2))
            right = graph.call_function(aten.unsqueeze.default, (b, 0))
            product = graph.call_function(aten.mul.Tensor, (left, right))
            result = graph.call_function(aten.sum.dim_IntList, (product, [1]))
            if bias is not None:
                result = graph.call_function(aten.add.Tensor, (result, bias))
        if "val" in node.meta:  # a product fed by this one ((x @ A) @ B) reads its shape from here
            result.meta["val"] = node.meta["val"]
        node.replace_all_uses_with(result)
        graph.erase_node(node)
        count += 1
    if count:
        graph_module.recompile()
    return count


#: what ``compile`` may be (the MD engine, the calculator, ``torchmdx md --compile``):
#: "whole" the whole model, forces included, as one traced + compiled graph (this module);
#: "parts" the model's dense parts compiled around the message kernels
#: (:meth:`ETPotential.set_compiled`); "off"; "auto" picks by device and size (:func:`compile_mode`)
COMPILE_MODES = ("auto", "whole", "parts", "off")

#: "auto" on CUDA traces the whole model for structures (batches) of at most this many atoms
#: when its graph takes the potential's fused message operators (:data:`FUSED_MESSAGE_IN_GRAPH`,
#: :attr:`~torchmdx.nn.base.Potential.graph_ops`; else :data:`WHOLE_GRAPH_MAX_ATOMS_TRACED_MESSAGE`);
#: larger ones compile the parts around the fused Triton message kernels. Since the whole graph
#: calls the same message kernels (:data:`FUSED_MESSAGE_IN_GRAPH`) it wins at every size timed,
#: with about half the launches (H100, 2026-12-07, ms per energy + forces replay, whole vs parts
#: in one call, ``docs/benchmarks/2026-12-07-h100-c/call4``): 22 atoms 0.471 vs 0.666, 166 atoms
#: 0.968 vs 1.200, DHFR (2 489) 3.78 vs 4.15, factor IX (5 807) 7.86 vs 8.37; on another H100 that
#: night (``docs/benchmarks/2026-12-07-h100-f/call3``) DHFR 4.34 vs 4.18 and factor IX 8.53 vs 8.29,
#: within a few per cent either way. STMV (30 327), timed whole that night (``call2``): 41.5 vs 33.96
#: for the parts, hence the bound. (Before the operators, 2026-12-03, H200: 166 atoms whole 2.48-2.73
#: vs parts 1.83, and the bound was 64.)
WHOLE_GRAPH_MAX_ATOMS = 6000
#: the bound of a whole graph that traces its message in torch (no :attr:`Potential.graph_ops`, or
#: :data:`FUSED_MESSAGE_IN_GRAPH` off): the 64 measured before the operators
WHOLE_GRAPH_MAX_ATOMS_TRACED_MESSAGE = 64


#: the whole-model graph of structures of at most this many atoms each takes the all-pairs layout
#: (:mod:`torchmdx.kernels.pairs`: every ordered pair an edge, the list never searched or stale;
#: gathers and scatter-adds over the edges become broadcasts and sums) where
#: :func:`pair_layout_size` allows it. 0: never. 0 since the A/B on an H100 (2026-12-07,
#: ``bench/bench_dense_pairs.py``): 22 atoms 0.552 ms per call on pairs vs 0.544 on the list (12 fewer
#: launches, but slower reductions in place of the scatters), MD 1 695 vs 1 682 steps/s
#: (docs/kernels_small.md, "All pairs")
PAIR_LAYOUT_MAX_ATOMS = 0


#: inference graphs (:class:`TracedForces` without ``training``, ``fused_message`` None) of a
#: potential with :attr:`~torchmdx.nn.base.Potential.graph_ops` (the ET) take its fused message
#: kernels as custom operators (``torchmdx::et_message_table`` and its backward, filters from
#: tables passed in as graph inputs; :mod:`torchmdx.kernels.message_ops`) instead of tracing the
#: torch reference message. Read at each call. True since the A/B on an H100 (2026-12-07,
#: ``bench/bench_dense_pairs.py --variants list,ops``, ``docs/benchmarks/2026-12-07-h100-c/call1``):
#: 22 atoms 0.433 ms per call (118 launches) against 0.597 (139) with the traced reference message,
#: MD 2 497 against 1 551 steps/s, force error against float64 6.6e-7 against 7.6e-7
#: (docs/kernels_small.md, "The fused message inside the whole graph")
FUSED_MESSAGE_IN_GRAPH = True


def pair_layout_size(potential, counts, periodic: bool) -> Optional[int]:
    """n, the atoms of each structure, where the whole-model graph of structures of ``counts``
    atoms takes the all-pairs layout: ``potential`` supports it (:attr:`Potential.pair_layout`),
    no structure is periodic, all have the same n atoms and n <= :data:`PAIR_LAYOUT_MAX_ATOMS`;
    else None (a neighbor list)."""
    sizes = {int(c) for c in counts}
    if periodic or len(sizes) != 1 or not getattr(potential, "pair_layout", False):
        return None
    (n,) = sizes
    return n if 0 < n <= PAIR_LAYOUT_MAX_ATOMS else None


def compile_mode(mode, device, num_atoms: int, potential) -> str:
    """Resolve ``mode`` (one of :data:`COMPILE_MODES`, or True = "auto", False/None-on-CPU = "off")
    to "whole", "parts" or "off" for ``num_atoms`` atoms of ``potential`` on ``device``.

    "auto": off on the CPU (the compiled graphs are for GPUs; on the CPU they mainly cost compile
    time); on CUDA "whole" up to :data:`WHOLE_GRAPH_MAX_ATOMS` atoms (whole graphs with the fused
    message operators) or :data:`WHOLE_GRAPH_MAX_ATOMS_TRACED_MESSAGE` (the others) when the potential
    can be traced and allows it (:attr:`Potential.whole_graph_auto`), else "parts". An explicit "whole"
    for a potential that cannot be traced falls back to "parts"."""
    from torchmdx.errors import ConfigError

    if mode is None or mode is True:
        mode = "auto"
    elif mode is False:
        mode = "off"
    if mode not in COMPILE_MODES:
        raise ConfigError(f"compile must be one of {', '.join(COMPILE_MODES)} (or true/false), got {mode!r}")
    traceable = bool(getattr(potential, "traceable", False))
    if mode == "auto":
        if torch.device(device).type != "cuda":
            return "off"
        operators = FUSED_MESSAGE_IN_GRAPH and bool(getattr(potential, "graph_ops", False))
        small = num_atoms <= (WHOLE_GRAPH_MAX_ATOMS if operators else WHOLE_GRAPH_MAX_ATOMS_TRACED_MESSAGE)
        mode = "whole" if small and getattr(potential, "whole_graph_auto", True) else "parts"
    if mode == "whole" and not traceable:
        return "parts"
    return mode


#: prefix of the names of a potential's :meth:`~torchmdx.nn.base.Potential.graph_inputs` among a
#: traced graph's state inputs
GRAPH_INPUT = "graph_input:"


class _Energy(torch.nn.Module):
    """Wraps ``potential.atomic_energies`` so :func:`torch.func.functional_call` can swap its
    parameters and buffers for graph inputs."""

    def __init__(self, potential):
        super().__init__()
        self.potential = potential

    def forward(self, graph: Graph) -> torch.Tensor:
        return self.potential.atomic_energies(graph)


class TracedForces:
    """Energies and forces of ``potential`` through one compiled graph per input shape.

    ``TracedForces(potential)(z, pos, batch, num_structures, edge_index, offsets, mask)`` returns
    ``(energy [B] float64 eV, forces [N, 3] eV/Å, per-atom energies [N] eV)``. ``edge_index``
    [2, E] sorted by receiver (any torchmdx neighbor list, capacity-padded or not), ``offsets``
    [E, 3] the image offsets n_e @ cell in Å (None: no periodic images), ``mask`` [E] bool valid
    rows (None: all). Edges at or beyond ``cutoff`` (default: the potential's) are masked, as in
    :meth:`torchmdx.md.forces.ForceField.evaluate`.

    ``training=True``: the parameters enter as they are (requiring grad), and the outputs are
    differentiable w.r.t. them (a loss on forces backpropagates through compiled kernels).
    Otherwise the parameters are detached: inference only. A potential whose ``traced_training``
    is False (or a tuple of device types without the inputs' one) gets a ModelError at the first
    compiled training call (its callers then use the
    model's autograd); ``compile=False`` still traces it.

    The potential must support tracing (:attr:`Potential.traceable`): no host reads, no
    data-dependent Python branches in :meth:`atomic_energies` while ``potential.tracing``.
    ``compile=False`` runs the traced graph without inductor (tests); ``small``: rewrite small
    matrix products as reductions (:func:`small_products`), ``small_output`` the largest result
    rewritten (None: any size; "auto": :data:`SMALL_OUTPUT` when traced) and ``small_rows`` the
    most rows a rewritten product may have whatever its inner dimension ("auto":
    :data:`SMALL_ROWS`, or :data:`TRAINING_SMALL_ROWS` when ``training``; "auto" inference graphs of more
    than :data:`SMALL_PRODUCTS_MAX_ATOMS` atoms rewrite none), ``small_row_inner`` the longest inner dimension
    of a product rewritten for its rows (None: any; "auto": :data:`SMALL_ROW_INNER`; :func:`small_products`
    ``max_row_inner``); ``options``: inductor options (default :data:`COMPILE_OPTIONS`, or
    :data:`TRAINING_COMPILE_OPTIONS`, of the device type); ``frontend``: how the graph reaches inductor (:data:`FRONTENDS`; default the potential's
    ``traced_frontend``, else "dynamo"). ``fused_message``: the inference graph takes the
    potential's fused message kernels as custom operators (:data:`FUSED_MESSAGE_IN_GRAPH`, which
    None reads at each call; only without ``training`` and where the potential has
    :attr:`~torchmdx.nn.base.Potential.graph_ops`, else ignored): its :meth:`graph_inputs
    <torchmdx.nn.base.Potential.graph_inputs>` (the filter tables) become inputs of the graph,
    made again when the weights change (a graph replayed by a CUDA graph keeps the ones of its
    capture). ``energy_outside``: the structure energies are summed from the graph's per-atom
    energies after the compiled graph, E_b = Σ_{i in b} ε_i (one index_add; "auto": for the frontends of
    :data:`ENERGY_OUTSIDE_FRONTENDS`), instead of taken from the graph's own sum.
    """

    def __init__(self, potential, training: bool = False, cutoff: Optional[float] = None, compile: bool = True,
                 small: bool = True, options: Optional[dict] = None, frontend: Optional[str] = None,
                 small_output="auto", small_rows="auto", fused_message: Optional[bool] = None,
                 small_row_inner="auto", energy_outside="auto"):
        if not getattr(potential, "traceable", False):
            raise TypeError(f"{type(potential).__name__} cannot be traced into one graph")
        frontend = frontend or getattr(potential, "traced_frontend", "dynamo")
        if frontend not in FRONTENDS:
            raise ValueError(f"frontend must be one of {', '.join(FRONTENDS)}, got {frontend!r}")
        self.frontend = frontend
        if energy_outside == "auto":
            energy_outside = frontend in ENERGY_OUTSIDE_FRONTENDS
        self.energy_outside = bool(energy_outside)
        self.potential = potential
        self.module = _Energy(potential)
        self.training = bool(training)
        self.cutoff = float(potential.cutoff if cutoff is None else cutoff)
        self.compile = bool(compile)
        self.small = bool(small)
        self.small_output = small_output
        self.small_rows = small_rows
        self.small_row_inner = small_row_inner
        self.options = options
        self.fused_message = fused_message
        self.small_products = 0  # products rewritten as reductions in the last trace
        self._graphs: dict = {}
        self.traces = 0

    # ------------------------------------------------------------------ the traced function
    @property
    def ops(self) -> bool:
        """Does the next inference graph take the fused message as custom operators
        (``fused_message``, :data:`FUSED_MESSAGE_IN_GRAPH`)?"""
        wanted = FUSED_MESSAGE_IN_GRAPH if self.fused_message is None else bool(self.fused_message)
        return wanted and not self.training and bool(getattr(self.potential, "graph_ops", False))

    def _state(self, ops: bool = False, device=None):
        """(names, tensors): the parameters and buffers, then with ``ops`` the potential's
        :meth:`~torchmdx.nn.base.Potential.graph_inputs` (named with the prefix :data:`GRAPH_INPUT`)."""
        names, tensors = [], []
        for name, value in self.module.named_parameters():
            names.append(name)
            tensors.append(value if self.training else value.detach())
        for name, value in self.module.named_buffers():
            names.append(name)
            tensors.append(value)
        if ops:
            for name, value in self.potential.graph_inputs(device).items():
                names.append(GRAPH_INPUT + name)
                tensors.append(value.detach())
        return names, tensors

    def _function(self, names, num_structures: int, pairs: Optional[int] = None, ops: bool = False):
        module, cutoff, potential = self.module, self.cutoff, self.potential

        def energy_and_forces(state, z, pos, batch, edge_index, offsets, mask):
            weights = {name: t for name, t in zip(names, state) if not name.startswith(GRAPH_INPUT)}
            inputs = {name[len(GRAPH_INPUT):]: t for name, t in zip(names, state) if name.startswith(GRAPH_INPUT)}
            previous = potential.traced_inputs
            potential.traced_inputs = inputs if ops else None
            try:
                with torch.enable_grad():
                    pos = pos.detach().requires_grad_(True)
                    if pairs is None:
                        vectors, distances, valid = masked_edges(pos, edge_index[0], edge_index[1], offsets, cutoff,
                                                                 mask)
                    else:  # the all-pairs layout: no gathers (kernels.pairs)
                        vectors, distances, valid = pair_edges(pos, pairs, cutoff, mask)
                    graph = Graph(z, pos, batch, num_structures, edge_index, vectors, distances, valid, pairs)
                    atomic = torch.func.functional_call(module, weights, (graph,))
                    energy = torch.zeros(num_structures, dtype=atomic.dtype, device=atomic.device).index_add(0, batch,
                                                                                                             atomic)
                    (grad,) = torch.autograd.grad(energy.sum(), pos)
            finally:
                potential.traced_inputs = previous
            return energy, -grad, atomic

        return energy_and_forces

    def _build(self, names, args, num_structures: int, pairs: Optional[int] = None, ops: bool = False):
        from torch.fx.experimental.proxy_tensor import make_fx

        allowed = getattr(self.potential, "traced_training", True)
        if not isinstance(allowed, bool):  # the device types where it may be compiled
            device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
            allowed = device.type in allowed
        if self.training and self.compile and not allowed:
            from torchmdx.errors import ModelError

            raise ModelError(f"{type(self.potential).__name__}'s compiled training graph is not used here: inductor "
                             f"computed its forces wrongly (see {type(self.potential).__name__}.traced_training)")
        fn = self._function(names, num_structures, pairs, ops)
        potential = self.potential
        previous = potential.tracing
        potential.tracing = True
        try:
            graph_module = make_fx(fn, tracing_mode="fake", decomposition_table=_decompositions())(*args)
        finally:
            potential.tracing = previous
        _strip_detach(graph_module)
        max_output = SMALL_OUTPUT if self.small_output == "auto" else self.small_output
        auto_rows = TRAINING_SMALL_ROWS if self.training else SMALL_ROWS
        max_rows = auto_rows if self.small_rows == "auto" else self.small_rows
        rewrite = self.small and (self.training or self.small_rows != "auto"
                                  or args[1].shape[0] <= SMALL_PRODUCTS_MAX_ATOMS)  # args[1]: the atomic numbers
        if self.small_row_inner == "auto":  # the training graph keeps the bounds it was measured with
            row_inner = None if self.training else SMALL_ROW_INNER
        else:
            row_inner = self.small_row_inner
        self.small_products = (small_products(graph_module, max_rows, max_output=max_output,
                                              max_row_inner=row_inner) if rewrite else 0)
        self.traces += 1
        if not self.compile:
            return graph_module
        device_type = args[2].device.type
        defaults = TRAINING_COMPILE_OPTIONS if self.training else COMPILE_OPTIONS
        options = self.options if self.options is not None else defaults.get(device_type)
        from torchmdx.nn import compile_cache

        compile_cache.ensure()  # compiled graphs kept across runs (keyed by content)
        return _CompiledGraph(graph_module, options, self.frontend)

    def __call__(self, z, pos, batch, num_structures: int, edge_index, offsets=None, mask=None,
                 pairs: Optional[int] = None):
        """``pairs`` n: ``edge_index`` and ``mask`` are the all-pairs layout of structures of n atoms
        (:func:`torchmdx.kernels.pairs.pair_index`; no ``offsets``), for a potential with
        :attr:`~torchmdx.nn.base.Potential.pair_layout`: the graph then has no gathers or scatters
        over the edges (``edge_index`` is not read)."""
        if pairs is not None and (offsets is not None or mask is None
                                  or not getattr(self.potential, "pair_layout", False)):
            raise ValueError("pairs needs the all-pairs mask, no image offsets and a potential with pair_layout")
        ops = self.ops
        names, state = self._state(ops, pos.device)
        args = (state, z, pos.detach(), batch, edge_index, offsets, mask)
        key = (
            tuple(z.shape), tuple(edge_index.shape), int(num_structures), pos.dtype, pos.device,
            offsets is not None, mask is not None, tuple(names), tuple(t.dtype for t in state),
            self.training and torch.is_grad_enabled(), pairs, ops,
        )
        fn = self._graphs.get(key)
        if fn is None:
            fn = self._graphs[key] = self._build(names, args, int(num_structures), pairs, ops)
        energy, forces, atomic = fn(*args)
        if self.energy_outside:  # see ENERGY_OUTSIDE_FRONTENDS: the graph's own sum was measured wrong there
            energy = torch.zeros(int(num_structures), dtype=atomic.dtype, device=atomic.device).index_add(0, batch,
                                                                                                           atomic)
        return energy, forces, atomic


class _CompiledGraph:
    """A compiled traced graph; compilation happens at the first call, and if it fails there it
    is tried once more with :data:`FALLBACK_OPTIONS` (then the error propagates); a failure to read
    the compile cache (:mod:`torchmdx.nn.compile_cache`) empties it and compiles again.

    ``frontend`` (:data:`FRONTENDS`): "dynamo" compiles with ``torch.compile(graph_module,
    fullgraph=True)``; "inductor" hands the aten graph to inductor directly
    (``torch._inductor.compile_fx.compile_fx``, its inputs flattened here), so that no call, the
    first or a later one, goes through dynamo's frame evaluation and guards."""

    def __init__(self, graph_module, options, frontend: str = "dynamo"):
        self.graph_module = graph_module
        self.options = options
        self.frontend = frontend
        self.ready = False
        self.codegen = None
        if frontend == "inductor":
            from torch.fx.graph import _PyTreeCodeGen

            codegen = graph_module.graph._codegen
            if isinstance(codegen, _PyTreeCodeGen):  # make_fx's nested inputs (the state list, None)
                self.codegen = codegen
                graph_module.graph._codegen = torch.fx.graph.CodeGen()
                graph_module.recompile()
        self.compiled = self._compiler(options)

    def _compiler(self, options):
        if self.frontend == "dynamo":
            return torch.compile(self.graph_module, dynamic=False, fullgraph=True, options=options or None)
        return _InductorGraph(self.graph_module, options)

    def __call__(self, *args):
        if self.codegen is not None:
            out = self._call(*self.codegen.process_inputs(*args))
            return self.codegen.process_outputs(out)
        return self._call(*args)

    def _call(self, *args):
        if self.ready:
            return self.compiled(*args)
        try:
            out = self.compiled(*args)
        except Exception as exc:  # noqa: BLE001 - compiler failures have no stable type
            import warnings

            from torchmdx.nn import compile_cache

            if compile_cache.rebuild_after(exc):  # an unreadable cache entry: compile afresh
                self.compiled = self._compiler(self.options)
                out = self.compiled(*args)
                self.ready = True
                return out
            warnings.warn(f"compiling the traced graph failed ({type(exc).__name__}); trying {FALLBACK_OPTIONS}")
            options = {**(self.options or {}), **FALLBACK_OPTIONS}
            self.compiled = self._compiler(options)
            out = self.compiled(*args)
        self.ready = True
        return out


class _InductorGraph:
    """A flat-input aten graph compiled by inductor at its first call (no dynamo), then called
    directly."""

    def __init__(self, graph_module, options):
        self.graph_module = graph_module
        self.options = options
        self.fn = None

    def __call__(self, *args):
        if self.fn is None:
            from torch._inductor.compile_fx import compile_fx

            self.fn = compile_fx(self.graph_module, list(args), config_patches=dict(self.options or {}))
        return self.fn(*args)
