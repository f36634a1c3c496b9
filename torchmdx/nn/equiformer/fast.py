"""Grouped fast paths of e3nn's linear layer, depth-wise tensor product and gate: the same
functions as e3nn's code (to float rounding), in a few large operations instead of one or more
per irreps path.

e3nn's generated code issues, per irreps path, an einsum (a permute, a reshape copy, a matmul),
a scaling and a sum; the paper-size MD17 model's forward was ~2 450 aten operations on alanine
dipeptide, ~1 000 of them in ``o3.Linear`` and ~570 in the tensor products
(``bench/count_equiformer_ops.py``). Here:

- :class:`GroupedLinear` (an ``o3.Linear``: same parameters, same ``state_dict``): the paths into
  the output irreps of one input set are one matrix product. For an output of degree l the
  weight [U, W] (path weights folded in) acts on the [N, U·(2l+1)] input through its Kronecker
  product with the identity of size 2l + 1, [U·(2l+1), W·(2l+1)], which keeps e3nn's layout
  (channel-major, 2l + 1 components contiguous) on both sides without copies:
  ~8 operations per layer instead of ~30-130.
- :class:`DepthwiseTensorProductPlan`: the 'uvu' tensor product of ``x`` with the spherical
  harmonics ``Y``, for all paths at once. With C^{path}_{i j k} = path weight · w3j(l1, l2, L),
  for each input block l1 (channels u, components i):

      B = Y · C             [E, d1, K]  (one matmul for all blocks: Y [E, Σ dY] @ C [Σ dY, Σ d1 K])
      t[e, u, k] = Σ_i x[e, u, i] B[e, i, k]        (one batched matmul per input block)
      out = (t · w[e, u, path(k)])  permuted to e3nn's output layout (one gather each)

  ~8 operations per tensor product instead of ~45.
- :class:`GroupedGate` (an e3nn ``Gate``): SiLU on the scalars, sigmoid gates spread over the
  gated components by one gather, one product, one concatenation.

Each keeps e3nn's code beside it as the reference: inside
:func:`torchmdx.nn.equiformer.layers.reference_ops` the e3nn path runs
(tests/test_equiformer_fast.py compares the two in float64).
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict

import torch
from e3nn import nn as e3nn_nn
from e3nn import o3

_REFERENCE = [False]


@contextlib.contextmanager
def reference_ops(enabled: bool = True):
    """Inside it, the Equiformer layers run e3nn's reference code paths (one operation or more per
    irreps path) and the per-degree loops instead of the grouped fast paths; for the tests and
    ``bench/count_equiformer_ops.py --reference``."""
    previous = _REFERENCE[0]
    _REFERENCE[0] = bool(enabled)
    try:
        yield
    finally:
        _REFERENCE[0] = previous


def reference_enabled() -> bool:
    return _REFERENCE[0]


def _long(values) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.long)


def _is_identity(index: list) -> bool:
    return index == list(range(len(index)))


def _sizes(sizes: list, total: int) -> list:
    """``sizes`` plus the remainder up to ``total`` (if any): arguments for ``Tensor.split``."""
    rest = total - sum(sizes)
    assert rest >= 0
    return list(sizes) + ([rest] if rest else [])


def b_offsets_of(linear) -> dict:
    """{output block: start in the flat bias} of an ``o3.Linear``."""
    offsets, off = {}, 0
    for ins in linear.instructions:
        if ins.i_in == -1:
            offsets[ins.i_out] = off
            off += ins.path_shape[0]
    return offsets


class GroupedLinear(o3.Linear):
    """``o3.Linear`` (no per-sample weights, no ``f_in``) with the grouped forward of the module
    docstring; parameters and ``state_dict`` are e3nn's."""

    def __init__(self, irreps_in, irreps_out, biases: bool = False):
        super().__init__(irreps_in, irreps_out, biases=biases)
        ins_w = [ins for ins in self.instructions if ins.i_in != -1 and 0 not in ins.path_shape]
        w_offset, off = {}, 0
        for ins in ins_w:
            w_offset[(ins.i_in, ins.i_out)] = (off, ins.path_weight)
            off += ins.path_shape[0] * ins.path_shape[1]
        b_offset = b_offsets_of(self)
        in_slices = self.irreps_in.slices()
        # groups: outputs (mul > 0) fed by the same input blocks, in order of first appearance
        groups: "OrderedDict[tuple, list]" = OrderedDict()
        self._zero_outputs = []
        for i_out, (mul, ir) in enumerate(self.irreps_out):
            if mul == 0:
                continue
            inputs = tuple(ins.i_in for ins in ins_w if ins.i_out == i_out and self.irreps_in[ins.i_in].mul > 0)
            if not inputs:
                self._zero_outputs.append(i_out)
                continue
            groups.setdefault(inputs, []).append(i_out)
        x_index, w_index, w_scale, b_index = [], [], [], []
        self._groups = []  # (x start, x stop, w start, U, C, d, bias start or -1, [(i_out, c0, c1)])
        for inputs, outputs in groups.items():
            d = self.irreps_in[inputs[0]].ir.dim
            x0 = len(x_index)
            for i in inputs:
                x_index += range(in_slices[i].start, in_slices[i].stop)
            big_u = sum(self.irreps_in[i].mul for i in inputs)
            cols = sum(self.irreps_out[o].mul for o in outputs)
            w0 = len(w_index)
            for i in inputs:  # rows: input channel u of block i; columns: output channel w of block o
                for u in range(self.irreps_in[i].mul):
                    for o in outputs:
                        start, pw = w_offset[(i, o)]
                        mul_o = self.irreps_out[o].mul
                        w_index += range(start + u * mul_o, start + (u + 1) * mul_o)
                        w_scale += [pw] * mul_o
            bias = -1
            if any(o in b_offset for o in outputs):  # e3nn puts biases on all even-scalar outputs
                assert all(o in b_offset for o in outputs) and d == 1
                bias = len(b_index)
                for o in outputs:
                    b_index += range(b_offset[o], b_offset[o] + self.irreps_out[o].mul)
            spans, c = [], 0
            for o in outputs:
                spans.append((o, c, c + self.irreps_out[o].mul))
                c += self.irreps_out[o].mul
            self._groups.append((x0, len(x_index), w0, big_u, cols, d, bias, spans))
        #: {output block without paths: start of its bias} (those outputs are zeros plus their bias)
        self._zero_bias = {o: b_offset[o] for o in self._zero_outputs if o in b_offset}
        # consecutive pieces (slices' backward would write a full-size zero tensor each; a split's
        # backward is one concatenation)
        self._set_input_index(x_index)
        self._w_sizes = _sizes([g[3] * g[4] for g in self._groups], self.weight.numel() if _is_identity(w_index)
                               else len(w_index))
        self._b_sizes = _sizes([g[4] for g in self._groups if g[6] >= 0], self.bias.numel() if _is_identity(b_index)
                               else len(b_index))
        self._w_identity = _is_identity(w_index)
        self.register_buffer("_w_index", _long(w_index), persistent=False)
        self.register_buffer("_w_scale", torch.tensor(w_scale, dtype=torch.float64).to(torch.get_default_dtype()),
                             persistent=False)
        self._b_identity = _is_identity(b_index) and len(b_index) == self.bias.numel()
        self.register_buffer("_b_index", _long(b_index), persistent=False)
        # identities of the Kronecker products. e3nn's path weights (1/sqrt(fan-in)) multiply the
        # weights (_w_scale): one operation forward and none in the force pass (addmm's alpha
        # instead costs one there per group)
        for d in sorted({g[5] for g in self._groups if g[5] > 1}):
            self.register_buffer(f"_eye{d}", torch.eye(d), persistent=False)

    def _set_input_index(self, x_index: list) -> None:
        self._x_list = list(x_index)
        self._x_identity = _is_identity(x_index)
        self._x_sizes = _sizes([g[1] - g[0] for g in self._groups], self.irreps_in.dim if self._x_identity
                               else len(x_index))
        if "_x_index" in self._buffers:
            self._x_index = _long(x_index).to(self._x_index.device)
        else:
            self.register_buffer("_x_index", _long(x_index), persistent=False)

    def take_input_order(self, order: torch.Tensor) -> "GroupedLinear":
        """From now on the fast path takes its input with its columns in another order: e3nn's
        column j at ``order[j]`` (a :class:`DepthwiseTensorProductPlan`'s ``out_index``: its
        raw output, which saves the permutation there; the reference path is unchanged). The
        permutation goes into this layer's own gather of the input blocks."""
        order = order.tolist()
        self._set_input_index([order[j] for j in self._x_list])
        return self

    def forward(self, features, weight=None, bias=None):
        if reference_enabled() or weight is not None or bias is not None:
            return super().forward(features, weight, bias)
        shape = features.shape[:-1]
        x = features.reshape(-1, self.irreps_in.dim)
        n = x.shape[0]
        if not self._x_identity:
            x = x.index_select(1, self._x_index)
        w = self.weight if self._w_identity else self.weight.index_select(0, self._w_index)
        w = w * self._w_scale
        b = self.bias if self._b_identity else self.bias.index_select(0, self._b_index)
        pieces = {}
        xs, ws = (x.split(self._x_sizes, dim=1), w.split(self._w_sizes)) if self._groups else ((), ())
        bs = iter(b.split(self._b_sizes) if b.numel() > 0 else ())
        for k, (x0, x1, w0, big_u, cols, d, b0, spans) in enumerate(self._groups):
            xg = xs[k]
            wg = ws[k].view(big_u, cols)
            if d > 1:
                eye = getattr(self, f"_eye{d}")
                wg = (wg[:, None, :, None] * eye[None, :, None, :]).reshape(big_u * d, cols * d)
            y = torch.addmm(next(bs), xg, wg) if b0 >= 0 else xg @ wg
            ys = y.split([(c1 - c0) * d for _, c0, c1 in spans], dim=1) if len(spans) > 1 else (y,)
            for (o, _, _), piece in zip(spans, ys):
                pieces[o] = piece
        for o in self._zero_outputs:  # no path into it: zeros (plus its bias)
            mul, ir = self.irreps_out[o]
            pieces[o] = x.new_zeros(n, mul * ir.dim)
            if o in self._zero_bias:
                start = self._zero_bias[o]
                pieces[o] = pieces[o] + self.bias[start: start + mul]
        ordered = [pieces[o] for o in range(len(self.irreps_out)) if o in pieces]
        out = ordered[0] if len(ordered) == 1 else torch.cat(ordered, dim=-1)
        return out.reshape(*shape, self.irreps_out.dim)


class DepthwiseTensorProductPlan(torch.nn.Module):
    """Index tensors and the combined Clebsch-Gordan matrix of a 'uvu' ``o3.TensorProduct``
    whose second input has multiplicity 1 (the spherical harmonics); :meth:`apply` is its grouped
    forward (module docstring)."""

    def __init__(self, tp: o3.TensorProduct):
        super().__init__()
        irreps1, irreps2, irreps_out = tp.irreps_in1, tp.irreps_in2, tp.irreps_out
        assert all(mul == 1 for mul, _ in irreps2), "the second input must have multiplicity 1"
        slices1, slices2, slices_out = irreps1.slices(), irreps2.slices(), irreps_out.slices()
        weight_offsets, off = [], 0
        for ins in tp.instructions:
            assert ins.connection_mode == "uvu" and ins.has_weight
            weight_offsets.append(off)
            off += math.prod(ins.path_shape)
        by_input: "OrderedDict[int, list]" = OrderedDict()
        for k, ins in enumerate(tp.instructions):
            by_input.setdefault(ins.i_in1, []).append(k)
        blocks, columns = [], 0
        cg = torch.zeros(irreps2.dim, sum(irreps1[i].ir.dim * sum(irreps_out[tp.instructions[k].i_out].ir.dim
                                                                    for k in ks) for i, ks in by_input.items()),
                         dtype=torch.float64)
        flat_size = 0
        weight_index, out_index = [], [0] * irreps_out.dim
        for i1, ks in by_input.items():
            mul, ir1 = irreps1[i1]
            d1 = ir1.dim
            dims = [irreps_out[tp.instructions[k].i_out].ir.dim for k in ks]
            big_k = sum(dims)
            koff = 0
            for k, dk in zip(ks, dims):
                ins = tp.instructions[k]
                l1, l2, lo = ir1.l, irreps2[ins.i_in2].ir.l, irreps_out[ins.i_out].ir.l
                w3j = o3.wigner_3j(l1, l2, lo, dtype=torch.float64) * ins.path_weight  # [d1, d2, dk]
                rows = slices2[ins.i_in2]
                for i in range(d1):
                    cg[rows, columns + i * big_k + koff: columns + i * big_k + koff + dk] = w3j[i]
                for u in range(mul):  # flat product layout: [u, k] per block; output: e3nn [u, m] per path
                    for m in range(dk):
                        out_index[slices_out[ins.i_out].start + u * dk + m] = flat_size + u * big_k + koff + m
                koff += dk
            for u in range(mul):
                for k, dk in zip(ks, dims):
                    weight_index += [weight_offsets[k] + u] * dk
            blocks.append((slices1[i1].start, slices1[i1].stop, mul, d1, columns, big_k))
            columns += d1 * big_k
            flat_size += mul * big_k
        self.blocks = blocks
        used = [i for i in by_input]
        self.x_sizes = [mul_ir.dim for mul_ir in irreps1]
        self.x_used = used
        self.b_sizes = [d1 * big_k for _, _, _, d1, _, big_k in blocks]
        self.out_identity = _is_identity(out_index)
        self.register_buffer("cg", cg.to(torch.get_default_dtype()), persistent=False)
        self.register_buffer("weight_index", _long(weight_index), persistent=False)
        self.register_buffer("out_index", _long(out_index), persistent=False)

    def apply(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, raw: bool = False) -> torch.Tensor:
        """x [E, irreps1.dim], y [E, irreps2.dim], weight [E, numel] or [numel] -> [E, irreps_out.dim];
        with ``raw`` in the plan's own column order (e3nn's column j at ``out_index[j]``), for a
        :meth:`GroupedLinear.take_input_order` layer."""
        e = x.shape[0]
        b = y @ self.cg
        products = []
        xs, bs = x.split(self.x_sizes, dim=1), b.split(self.b_sizes, dim=1)
        for i1, bk, (x0, x1, mul, d1, c0, big_k) in zip(self.x_used, bs, self.blocks):
            xb = xs[i1].reshape(e, mul, d1)
            bb = bk.reshape(e, d1, big_k)
            products.append(torch.bmm(xb, bb).reshape(e, mul * big_k))
        flat = products[0] if len(products) == 1 else torch.cat(products, dim=-1)
        flat = flat * weight.index_select(-1, self.weight_index)
        return flat if (raw or self.out_identity) else flat.index_select(1, self.out_index)


class GroupedGate(e3nn_nn.Gate):
    """e3nn's ``Gate`` (SiLU on the even scalars, sigmoid gates; their second-moment constants
    kept) with the grouped forward of the module docstring."""

    def __init__(self, irreps_scalars, irreps_gates, irreps_gated):
        super().__init__(irreps_scalars, [torch.nn.functional.silu] * len(o3.Irreps(irreps_scalars)),
                         irreps_gates, [torch.sigmoid] * len(o3.Irreps(irreps_gates)), irreps_gated)
        # where each of [scalars | gates | gated] sits in the input (e3nn sorts the input irreps)
        probe = torch.arange(self.irreps_in.dim, dtype=torch.float64).unsqueeze(0)
        order = torch.cat(self.sc(probe), dim=-1)[0].round().long().tolist()
        self._perm_identity = _is_identity(order)
        self.register_buffer("_perm", _long(order), persistent=False)
        self._num_scalars, self._num_gates = self.irreps_scalars.dim, self.irreps_gates.dim
        self._scalar_cst = self._constant(self.act_scalars)
        self._gate_cst = self._constant(self.act_gates)
        spread = []
        channel = 0
        for mul, ir in self.irreps_gated:
            for _ in range(mul):
                spread += [channel] * ir.dim
                channel += 1
        # gates [.., n] -> [.., gated dim] as a product with a 0/1 matrix (exact: one term per
        # column; its backward is one product, a gather's is a zero tensor and a scatter)
        spread_matrix = torch.zeros(channel, len(spread))
        spread_matrix[torch.tensor(spread, dtype=torch.long), torch.arange(len(spread))] = 1.0
        self.register_buffer("_spread", spread_matrix, persistent=False)
        # e3nn's element-wise product 0e x l -> l: path weight sqrt(2l+1) times w3j = 1/sqrt(2l+1)
        factors = []
        for ins in self.mul.instructions:
            mul, ir = self.mul.irreps_out[ins.i_out]
            assert ins.connection_mode == "uuu" and self.mul.irreps_in2[ins.i_in2].ir.l == 0
            factors.append(ins.path_weight / math.sqrt(ir.dim))
        assert all(abs(f - 1.0) < 1e-12 for f in factors), factors

    @staticmethod
    def _constant(activation) -> float:
        """The second-moment constant e3nn's ``Activation`` multiplies its one function by."""
        acts = [act for _, _, act in activation.paths]
        first = acts[0]
        assert all(a is not None and a._is_id == first._is_id and a.cst == first.cst for a in acts)
        return 1.0 if first._is_id else float(first.cst)

    def forward(self, features):
        if reference_enabled():
            return super().forward(features)
        x = features if self._perm_identity else features.index_select(-1, self._perm)
        ns, ng = self._num_scalars, self._num_gates
        if ng == 0:
            return torch.nn.functional.silu(x) * self._scalar_cst
        scalars, gates, gated = x.split([ns, ng, x.shape[-1] - ns - ng], dim=-1)
        scalars = torch.nn.functional.silu(scalars) * self._scalar_cst
        gates = torch.sigmoid(gates) * self._gate_cst
        gated = gated * (gates @ self._spread)
        return torch.cat([scalars, gated], dim=-1)
