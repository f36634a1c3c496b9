"""The equivariant transformer (ET) representation: embedding, L attention layers, final norm.

Per atom i: scalars x_i in R^F, vectors vec_i in R^{3xF} (start at 0). Per edge (i <- j) with
r_lo <= r_ij < r_hi: unit vector d_ij = (pos_j - pos_i + shift) / r_ij, RBF e(r_ij) [K] and
cosine cutoff phi(r_ij). Every atom also has a self edge (j = i, r = 0, d = 0), as in
TorchMD-NET (``loop=True``), so checkpoints trained there give the same numbers here.

    x_i   = Emb(z_i);  with neighbor embedding x_i = W_c [x_i, sum_j W_d e(r_ij) phi(r_ij) Emb'(z_j)]
    layer (x, vec -> x + dx, vec + dvec), on xn = LayerNorm(x):
        q, k = W_q xn, W_k xn;  v = W_v xn (3F);  (u1, u2, u3) = W_u vec (no bias)
        dk = act(W_dk e(r)),  dv = act(W_dv e(r))            (per distance_influence)
        (m_i, w_i) = message(q, k, v, vec, dk, dv, phi, d)    (:mod:`torchmdx.kernels.message_ref`)
        (o1, o2, o3) = W_o m_i
        dx_i   = (u1_i · u2_i) ⊙ o2 + o3                       (dot over the 3 components)
        dvec_i = u3_i ⊙ o1 + w_i
    x <- LayerNorm(x) after the last layer.

The message + aggregation step is a pure function chosen by :func:`message_function` (the
torch reference, or the fused Triton kernels of :mod:`torchmdx.kernels.message_triton` on
CUDA); for inference the dense parts around it can be compiled (:func:`compiled_function`).
"""

from __future__ import annotations

import copy
import functools
from typing import Callable

import torch
from torch import nn

from torchmdx.errors import ModelError
from torchmdx.kernels import filter_table, message_ops, message_ref
from torchmdx.kernels.filter_table import FilterTable
from torchmdx.nn.config import ModelConfig
from torchmdx.nn.layers import RBF_TYPES, Activation, CosineCutoff, NeighborEmbedding, xavier_linear


def message_function(backend: str, device: torch.device) -> Callable:
    """The ET message function for ``backend`` ('auto', 'torch', 'triton') on ``device``.

    'auto' uses the Triton kernels on CUDA when :mod:`torchmdx.kernels.message_triton` is
    available, else the torch reference; 'triton' insists on them. The Triton path returns a
    fresh ``FusedMessage`` per call (i.e. per forward pass): it shares the edge layout between
    the layers and offers ``.filtered`` (radial filters from the RBF rows and weights, evaluated by the
    kernels' own products: ``message_triton.CONFIG.filters``). The ET's edge lists are full
    neighbor lists and its filters depend on the distance only, so the list is declared
    symmetric (the backward may take the sender side from the reverse edges:
    ``message_triton.CONFIG.sender_side``).
    """
    if backend == "torch":
        return message_ref.et_message
    if backend in ("auto", "triton"):
        if device.type == "cuda" or backend == "triton":
            try:
                from torchmdx.kernels import message_triton  # noqa: WPS433 (optional backend)

                return message_triton.FusedMessage(symmetric=True)
            except (ImportError, AttributeError) as exc:
                if backend == "triton":
                    raise ModelError(f"message backend 'triton' is not available: {exc}") from None
        return message_ref.et_message
    raise ModelError(f"unknown message backend {backend!r}; choose auto, torch or triton")


class EquivariantAttention(nn.Module):
    """One ET interaction layer (see the module docstring for the equations)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        f = config.embedding_dimension
        self.hidden = f
        self.num_heads = config.num_heads
        self.attn_activation = config.attn_activation
        self.vector_cutoff = config.vector_cutoff
        self.layernorm = nn.LayerNorm(f)
        self.act = Activation(config.activation)
        self.q_proj = xavier_linear(f, f)
        self.k_proj = xavier_linear(f, f)
        self.v_proj = xavier_linear(f, 3 * f)
        self.o_proj = xavier_linear(f, 3 * f)
        self.vec_proj = xavier_linear(f, 3 * f, bias=False)
        influence = config.distance_influence
        self.dk_proj = xavier_linear(config.num_rbf, f) if influence in ("keys", "both") else None
        self.dv_proj = xavier_linear(config.num_rbf, 3 * f) if influence in ("values", "both") else None

    def prepare(self, x, vec, self_rbf, small: bool = False, need_self_filters: bool = True):
        """Dense part before the message: (q, k, v, u3, vec_dot, dk0, dv0) on xn = LayerNorm(x);
        dk0 / dv0 are the self edge's filters act(W e(0) + b) (None without distance influence,
        or when not ``need_self_filters``). ``small``: products as reductions (:func:`linear`)."""
        f = self.hidden
        xn = self.layernorm(x)
        # q, k and v from one product [q | k | v] = xn [W_q; W_k; W_v]^T + [b_q; b_k; b_v]: one
        # matrix kernel instead of three in the forward pass and in the force pass's backward
        q, k, v = linear_stack((self.q_proj, self.k_proj, self.v_proj), xn, small)
        u1, u2, u3 = torch.split(linear(self.vec_proj, vec, small), f, dim=-1)
        vec_dot = (u1 * u2).sum(dim=1)
        dk0 = dv0 = None
        if need_self_filters:
            # the self edge's filters of keys and values, also from one product
            filters = [proj for proj in (self.dk_proj, self.dv_proj) if proj is not None]
            values = [self.act(t).squeeze(0) for t in linear_stack(filters, self_rbf, small)] if filters else []
            dk0 = values.pop(0) if self.dk_proj is not None else None
            dv0 = values.pop(0) if self.dv_proj is not None else None
        return q, k, v, u3, vec_dot, dk0, dv0

    def filter_weights(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(weight [out, K], bias [out]) of the radial filters this layer uses, keys first."""
        return [(p.weight, p.bias) for p in (self.dk_proj, self.dv_proj) if p is not None]

    def update(self, x, vec, m, w, vec_dot, u3, small: bool = False):
        """Dense part after the message: (x + dx, vec + dvec), (o1, o2, o3) = W_o m."""
        o1, o2, o3 = torch.split(linear(self.o_proj, m, small), self.hidden, dim=-1)
        return x + vec_dot * o2 + o3, vec + u3 * o1.unsqueeze(1) + w

    def forward(self, x, vec, edge_index, rbf, cutoff_weight, unit_vectors, edge_mask, self_rbf, self_cutoff, message,
                compiled: bool = False, filters=None, tables=None):
        """One layer: (x, vec) -> (x + dx, vec + dvec). ``compiled``: run :meth:`prepare` and
        :meth:`update` through ``torch.compile`` (see :func:`compiled_function`). ``filters``: the
        radial filters already evaluated (:meth:`ETRepresentation.radial_filters`, reference message
        path), (dk [E, F] | None, dv [E, 3F] | None, (dk0, dv0) of the self edge, or None when the
        edges include every atom's self edge and the message needs no separate self-loop term).
        ``tables``: (edge lengths r [E], key table | None, value table | None) to interpolate the
        filters from (:meth:`ETRepresentation.filter_tables`; fused message only)."""
        device_type = x.device.type
        prepare = compiled_function(EquivariantAttention.prepare, device_type) if compiled else EquivariantAttention.prepare
        update = compiled_function(EquivariantAttention.update, device_type) if compiled else EquivariantAttention.update
        small = compiled and x.shape[0] <= SMALL_MATMUL_ATOMS
        q, k, v, u3, vec_dot, dk0, dv0 = prepare(self, x, vec, self_rbf, small, filters is None)
        self_loop = (dk0, dv0, self_cutoff)
        if filters is not None:
            dk, dv, self_filters = filters
            self_loop = None if self_filters is None else (*self_filters, self_cutoff)
        options = dict(edge_mask=edge_mask, self_loop=self_loop,
                       attn_activation=self.attn_activation, vector_cutoff=self.vector_cutoff)
        filtered = getattr(message, "filtered", None)
        if tables is not None:
            # the fused kernels interpolate dk(r), dv(r) from the tables: no filter product at all
            m, w = message.tabulated(q, k, v, vec, *tables, cutoff_weight, unit_vectors, edge_index, self.num_heads,
                                     **options)
        elif filtered is not None:
            # fused Triton kernels evaluate dk = act(W_dk e(r) + b), dv likewise, per block of
            # edges themselves: no [E, F] / [E, 3F] filter tensors (torchmdx.kernels.message_triton)
            wk, bk = (self.dk_proj.weight, self.dk_proj.bias) if self.dk_proj is not None else (None, None)
            wv, bv = (self.dv_proj.weight, self.dv_proj.bias) if self.dv_proj is not None else (None, None)
            m, w = filtered(q, k, v, vec, rbf, wk, bk, wv, bv, cutoff_weight, unit_vectors, edge_index,
                            self.num_heads, filter_activation=self.act.name, **options)
        else:
            if filters is None:
                dk = self.act(self.dk_proj(rbf)) if self.dk_proj is not None else None
                dv = self.act(self.dv_proj(rbf)) if self.dv_proj is not None else None
            m, w = message(q, k, v, vec, dk, dv, cutoff_weight, unit_vectors, edge_index, self.num_heads, **options)
        return update(self, x, vec, m, w, vec_dot, u3, small)


#: intervals of the filter tables (:meth:`ETRepresentation.filter_tables`; accuracy in
#: :mod:`torchmdx.kernels.filter_table` and docs/kernels_message.md "Filter tables")
FILTER_TABLE_INTERVALS = filter_table.DEFAULT_INTERVALS

#: compiled layers of structures with at most this many atoms compute their products as
#: reductions (:func:`linear`)
SMALL_MATMUL_ATOMS = 64


def linear(layer: nn.Linear, x: torch.Tensor, small: bool) -> torch.Tensor:
    """``layer(x)`` = x W^T + b. With ``small``, as a broadcast product summed over the input
    features: inside torch.compile that becomes one fused reduction kernel (forward and
    backward), where cuBLAS runs split-K kernels (3-4 launches, ~10-15 µs per product for a few
    dozen rows: half of the GPU time of a 22-atom ET call, measured on an H100)."""
    if not small:
        return layer(x)
    y = (x.unsqueeze(-2) * layer.weight).sum(-1)
    return y if layer.bias is None else y + layer.bias


def linear_stack(layers, x: torch.Tensor, small: bool) -> list:
    """``[layer(x) for layer in layers]`` from one product with the layers' weights stacked
    (x [W_1; W_2; ...]^T + [b_1; b_2; ...], then split by output width): the dense parts of small
    and medium systems are launch-bound (each cuBLAS product ~5-6 µs whatever its size at
    166 atoms, H100), so one product replaces several. Every layer has a bias or none does."""
    if len(layers) == 1:
        return [linear(layers[0], x, small)]
    weight = torch.cat([layer.weight for layer in layers], dim=0)
    bias = None if layers[0].bias is None else torch.cat([layer.bias for layer in layers])
    if small:
        y = (x.unsqueeze(-2) * weight).sum(-1)
        y = y if bias is None else y + bias
    else:
        y = nn.functional.linear(x, weight, bias)
    return list(torch.split(y, [layer.weight.shape[0] for layer in layers], dim=-1))


_COMPILED: dict = {}

#: inductor options on CUDA. Autotuning the matmuls (``{"max_autotune_gemm": True,
#: "max_autotune_gemm_backends": "TRITON,ATEN"}``) was measured on an H100 (22-atom ET): GPU time
#: per call 1.15 -> 1.03 ms, MD 789 -> 941 steps/s, but 10-35 s of benchmarking per matrix shape
#: (minutes per new system): not the default.
CUDA_COMPILE_OPTIONS: dict = {}


def compiled_function(fn: Callable, device_type: str = "cpu") -> Callable:
    """``torch.compile(fn)``, one per function and device type (shared by every layer and
    model: modules are passed as arguments, so identical layers reuse one compiled graph).
    Used for the dense parts of an inference call, where inductor fuses the element-wise work
    around the matmuls (:data:`CUDA_COMPILE_OPTIONS` on CUDA); the message step stays on its own
    (Triton or reference) kernels. The first shape is compiled static; when a second atom count
    comes, dynamo's automatic dynamic shapes compile one shape-generic graph instead of one per
    size, and past dynamo's recompile limit the function runs eagerly (``fullgraph=False``:
    a calculator walking through a data set of different molecules must never fail on it)."""
    key = (fn, device_type)
    compiled = _COMPILED.get(key)
    if compiled is None:
        from torchmdx.nn import compile_cache

        compile_cache.ensure()  # compiled graphs kept across runs (keyed by content)
        options = dict(CUDA_COMPILE_OPTIONS) if device_type == "cuda" and CUDA_COMPILE_OPTIONS else None
        compiled = _COMPILED[key] = torch.compile(fn, options=options)
    return compiled


class ETRepresentation(nn.Module):
    """Atoms + edges -> (x [N, F] after the final LayerNorm, vec [N, 3, F])."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        f = config.embedding_dimension
        self.embedding = nn.Embedding(config.max_z, f)
        self.rbf = RBF_TYPES[config.rbf_type](config.cutoff_lower, config.cutoff_upper, config.num_rbf, config.trainable_rbf)
        self.cutoff_fn = CosineCutoff(config.cutoff_lower, config.cutoff_upper)
        self.neighbor_embedding = (
            NeighborEmbedding(f, config.num_rbf, config.max_z) if config.neighbor_embedding else None
        )
        self.layers = nn.ModuleList([EquivariantAttention(config) for _ in range(config.num_layers)])
        self.out_norm = nn.LayerNorm(f)

    def edge_features(self, vectors, distances, mask):
        """(valid [E], rbf [E, K], phi [E], unit vectors [E, 3]) with nothing divided by an
        invalid (padded, out-of-range) distance."""
        c = self.config
        valid = (distances >= c.cutoff_lower) & (distances < c.cutoff_upper)
        if mask is not None:
            valid = valid & mask
        # a pair of distinct atoms at distance 0 has no direction: treat d_ij = 0 like TorchMD-NET
        # does for self pairs (the caller reports overlapping atoms as an error beforehand)
        has_direction = valid & (distances > 0)
        r_safe = torch.where(valid, distances, torch.full_like(distances, 0.5 * c.cutoff_upper))
        r_dir = torch.where(has_direction, distances, torch.ones_like(distances))
        unit = torch.where(has_direction.unsqueeze(-1), vectors / r_dir.unsqueeze(-1), torch.zeros_like(vectors))
        rbf = self.rbf(r_safe)
        phi = self.cutoff_fn(r_safe) * valid.to(distances.dtype)
        return valid, rbf, phi, unit

    def embed(self, z, edge_index, vectors, distances, mask, pairs=None):
        """Edge features and the first atom features: (valid, rbf, phi, unit, x, self_rbf, self_cutoff)."""
        valid, rbf, phi, unit = self.edge_features(vectors, distances, mask)
        x = self.embedding(z)
        if self.neighbor_embedding is not None:
            # a masked (fixed-capacity) list: its padding rows' zeros spread over the atoms
            x = self.neighbor_embedding(z, x, edge_index, rbf, phi, valid if mask is not None else None, pairs=pairs)
        zero = torch.zeros(1, dtype=distances.dtype, device=distances.device)
        self_rbf = self.rbf(zero)  # [1, K]
        self_cutoff = self.cutoff_fn(zero)[0]
        return valid, rbf, phi, unit, x, self_rbf, self_cutoff

    def forward(self, z, edge_index, vectors, distances, mask=None, backend: str = "auto", compiled: bool = False,
                self_edges: bool = True, pairs=None, given_tables=None):
        """(x, vec) of every atom. ``compiled``: the dense parts (edge features and embedding,
        each layer's :meth:`~EquivariantAttention.prepare` / :meth:`~EquivariantAttention.update`)
        run through ``torch.compile`` (:func:`compiled_function`).

        On the reference message path (uncompiled), every layer's radial filters come from one
        product (:meth:`radial_filters`), and with ``self_edges`` each atom's self edge (length 0,
        d_ii = 0, filters and cutoff at r = 0: the terms of the message's self-loop branch) joins
        the edge list: fewer, larger kernels for the launch-bound training step (with the mask
        products left out under ``vector_cutoff``, 3 747 -> 2 676 kernel-launching operations per
        batch-8 aspirin step, ``bench/count_step_ops.py``; 11.7 vs 14.9 ms per step with the fused
        kernels, H100). The
        traced graphs (:mod:`torchmdx.nn.traced`) keep the self-loop branch (``self_edges=False``):
        inductor (torch 2.13, CPU) computed wrong parameter gradients for the double backward of
        the traced graph with self edges appended, while eager and ``aot_eager`` agreed with finite
        differences (``tests/test_traced.py``).

        ``pairs`` n: the edges are the all-pairs layout of structures of n atoms
        (:mod:`torchmdx.kernels.pairs`): the reference message with broadcasts and sums over the
        senders, the self edges kept in the self-loop branch (the diagonal pairs stay masked).

        ``given_tables``: per layer (key :class:`~torchmdx.kernels.filter_table.FilterTable` | None,
        value table | None), the filter tables of a traced inference graph's inputs
        (:meth:`tables_from_inputs`): every layer's message is then the custom operator
        ``torchmdx::et_message_table`` (:mod:`torchmdx.kernels.message_ops`; not with ``pairs``)."""
        embed = compiled_function(ETRepresentation.embed, z.device.type) if compiled else ETRepresentation.embed
        valid, rbf, phi, unit, x, self_rbf, self_cutoff = embed(self, z, edge_index, vectors, distances, mask, pairs)
        vec = torch.zeros(x.shape[0], 3, x.shape[1], dtype=x.dtype, device=x.device)
        if pairs is not None:
            self_edges = False  # the self edges stay in the self-loop branch
            message = functools.partial(message_ref.et_message, pairs=pairs)
            given_tables = None
        elif given_tables is not None:  # the fused kernels as custom operators of a traced graph
            message = message_ops.TableMessage(symmetric=True)
        else:
            message = message_function(backend, x.device)
        edge_mask = valid  # no host sync: invalid (padded / skin) edges are zeroed in the message
        filters = [None] * len(self.layers)
        if getattr(message, "filtered", None) is None and not compiled and given_tables is None:
            if self_edges:
                n = x.shape[0]
                loops = torch.arange(n, dtype=edge_index.dtype, device=edge_index.device)
                edge_index = torch.cat([edge_index, loops.expand(2, n)], dim=1)
                rbf = torch.cat([rbf, self_rbf.to(rbf.dtype).expand(n, -1)], dim=0)
                phi = torch.cat([phi, self_cutoff.to(phi.dtype).expand(n)])
                unit = torch.cat([unit, unit.new_zeros(n, 3)])
                edge_mask = torch.cat([edge_mask, edge_mask.new_ones(n)])
                filters = [(dk, dv, None) for dk, dv in self.radial_filters(rbf)]
            else:  # the last row is the self edge's: (dk [E, F], dv [E, 3F], (dk0 [F], dv0 [3F])) per layer
                e = rbf.shape[0]
                filters = []
                for both in self.radial_filters(torch.cat([rbf, self_rbf.to(rbf.dtype)], dim=0)):
                    (dk, dk0), (dv, dv0) = [t.split([e, 1]) if t is not None else (None, None) for t in both]
                    self_filters = tuple(t.squeeze(0) if t is not None else None for t in (dk0, dv0))
                    filters.append((dk, dv, self_filters))
            if self.config.vector_cutoff:
                # phi is 0 on every invalid edge (edge_features) and scales the whole message
                # here, so the mask's own products would change nothing: leave them out
                edge_mask = None
        tables = [None] * len(self.layers)
        if given_tables is not None or self.tables_usable(message, x.shape[0], x.device):
            # inside the cutoff every valid edge's length; invalid edges a safe one (edge_features)
            r = torch.where(valid, distances, torch.full_like(distances, 0.5 * self.config.cutoff_upper))
            pairs_of_tables = given_tables if given_tables is not None else self.filter_tables(x.device, rbf.dtype)
            tables = [(r, *pair) for pair in pairs_of_tables]
        for layer, layer_filters, layer_tables in zip(self.layers, filters, tables):
            x, vec = layer(x, vec, edge_index, rbf, phi, unit, edge_mask, self_rbf, self_cutoff, message, compiled=compiled,
                           filters=layer_filters, tables=layer_tables)
        return self.out_norm(x), vec

    def filter_tensors(self) -> list:
        """The tensors the radial filters depend on: the RBF's parameters and buffers, every
        layer's filter weights and biases."""
        tensors = [*self.rbf.parameters(), *self.rbf.buffers()]
        return tensors + [t for layer in self.layers for wb in layer.filter_weights() for t in wb if t is not None]

    def tables_usable(self, message, num_atoms: int, device: torch.device) -> bool:
        """Interpolate the filters from tables on this call? Where the message offers it and
        wants it (``message.wants_tables``: ``message_triton.CONFIG.filters``), outside a
        compiler trace, and only when no filter tensor needs a gradient (a frozen, inference
        model: ``Potential.set_compiled``, which the MD engine and the calculator use on CUDA)."""
        wants = getattr(message, "wants_tables", None)
        if wants is None or torch.compiler.is_compiling() or not wants(num_atoms, device):
            return False
        return not (torch.is_grad_enabled() and any(t.requires_grad for t in self.filter_tensors()))

    def filter_tables(self, device: torch.device, dtype: torch.dtype) -> list:
        """Every layer's radial filters tabulated in r on [cutoff_lower, cutoff_upper]
        (:mod:`torchmdx.kernels.filter_table`, :data:`FILTER_TABLE_INTERVALS` intervals, nodes
        in float64): per layer (key table [G, 4, F] | None, value table [G, 4, 3F] | None).
        Kept until a filter tensor changes (its storage or version) or another device / dtype
        is asked for; not part of the state dict."""
        tensors = self.filter_tensors()
        key = (device, dtype, FILTER_TABLE_INTERVALS, tuple((t.data_ptr(), t._version) for t in tensors))
        cached = self.__dict__.get("_filter_tables")
        if cached is not None and cached[0] == key:
            return cached[1]
        weights = [wb for layer in self.layers for wb in layer.filter_weights()]
        tables = [(None, None)] * len(self.layers)
        if weights:
            rbf64 = copy.deepcopy(self.rbf).to(device=device, dtype=torch.float64)
            w = torch.cat([wt for wt, _ in weights], dim=0).detach().to(device, torch.float64)
            b = torch.cat([bias if bias is not None else torch.zeros(wt.shape[0], device=wt.device, dtype=wt.dtype)
                           for wt, bias in weights]).detach().to(device, torch.float64)
            act = self.layers[0].act
            table = filter_table.build_filter_table(lambda r: act(nn.functional.linear(rbf64(r), w, b)),
                                                    self.config.cutoff_lower, self.config.cutoff_upper,
                                                    FILTER_TABLE_INTERVALS, dtype, device)
            start, tables = 0, []
            for layer in self.layers:
                pair = []
                for proj in (layer.dk_proj, layer.dv_proj):
                    if proj is None:
                        pair.append(None)
                        continue
                    stop = start + proj.weight.shape[0]
                    pair.append(table.columns(start, stop))
                    start = stop
                tables.append(tuple(pair))
        self.__dict__["_filter_tables"] = (key, tables)
        return tables

    def table_inputs(self, device: torch.device, dtype: torch.dtype) -> dict:
        """:meth:`filter_tables`' coefficients by name ('filter_tables.<layer>.key' / '.value'): the
        inputs of a traced inference graph with the message operators (:meth:`tables_from_inputs`)."""
        return {f"filter_tables.{index}.{kind}": table.coefficients
                for index, pair in enumerate(self.filter_tables(device, dtype))
                for kind, table in zip(("key", "value"), pair) if table is not None}

    def tables_from_inputs(self, inputs: dict) -> list:
        """Per layer (key table | None, value table | None) from :meth:`table_inputs`' names (the
        coefficients may be a trace's tensors); the grid is [cutoff_lower, cutoff_upper]."""
        c = self.config
        return [tuple(FilterTable(inputs[name], float(c.cutoff_lower), float(c.cutoff_upper)) if name in inputs else None
                      for name in (f"filter_tables.{index}.key", f"filter_tables.{index}.value"))
                for index in range(len(self.layers))]

    def radial_filters(self, rbf: torch.Tensor) -> list:
        """Every layer's radial filters from one product: per layer (dk [E, F], dv [E, 3F]) with

            [dk | dv] = act(e(r_ij) [W_dk | W_dv]^T + [b_dk | b_dv])

        the same numbers as each layer's own ``act(W e + b)``, in one matmul and one activation
        over the columns of all layers (split into per-layer views): the training step is
        launch-bound, and per layer these were two products and two activations in the forward
        pass, each repeated in the force pass and the double backward (``bench/count_step_ops.py``).
        None where a layer has no such filter."""
        weights = [wb for layer in self.layers for wb in layer.filter_weights()]
        if not weights:
            return [(None, None)] * len(self.layers)
        w = torch.cat([wt for wt, _ in weights], dim=0)
        b = torch.cat([bias for _, bias in weights], dim=0)
        values = self.layers[0].act(torch.nn.functional.linear(rbf, w, b))  # [E, sum of filter widths]
        # split, not slices: the backward of a split is one cat, of each slice a zero-filled copy
        blocks = iter(values.split([wt.shape[0] for wt, _ in weights], dim=1))
        return [tuple(next(blocks) if proj is not None else None for proj in (layer.dk_proj, layer.dv_proj))
                for layer in self.layers]
