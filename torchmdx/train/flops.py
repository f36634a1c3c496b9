"""Counting a model's floating-point operations on one training step (the compute axis of
``torchmdx sweep``).

:func:`training_step_flops` runs one training step of the objective (forward, forces by
autograd with ``create_graph`` when training on forces, loss, backward) under
``torch.utils.flop_counter.FlopCounterMode`` and returns the operations counted:

- matrix products (mm, bmm, addmm, einsum, linear, convolutions, attention kernels): PyTorch's own
  formulas (2 FLOPs per multiply-add);
- element-wise arithmetic and reductions, which PyTorch's counter leaves out and which carry a
  large part of message passing (gathers multiplied by filters, segment sums): one FLOP per
  output element (reductions and index_add: one per input element; layer norm: 5 per element
  forward, 10 backward; exp, log, sqrt, transcendental activations: 1, like a multiply).

Indexing, copies, views and comparisons are free. The count is the same on every device; it
does not include the optimiser (~10 FLOPs per parameter per step, negligible) or validation.
"""

from __future__ import annotations

import math

import torch

aten = torch.ops.aten

#: element-wise ops: FLOPs per output element
_POINTWISE = {
    1: ["add", "sub", "mul", "div", "neg", "abs", "exp", "log", "sqrt", "rsqrt", "pow", "sin", "cos", "tanh",
        "sigmoid", "silu", "gelu", "relu", "softplus", "where", "clamp", "clamp_min", "clamp_max", "maximum", "minimum",
        "reciprocal", "sign", "expm1", "log1p", "erf", "leaky_relu", "elu", "mish", "addcmul", "addcdiv", "lerp",
        "sigmoid_backward", "tanh_backward", "threshold_backward", "silu_backward", "gelu_backward",
        "softplus_backward", "elu_backward", "leaky_relu_backward", "mish_backward", "rsub", "square", "xlogy",
        "_softmax", "_log_softmax", "_softmax_backward_data", "_log_softmax_backward_data"],
}
#: reductions: FLOPs per *input* element (argument 0, or the source argument given here)
_REDUCTIONS = {"sum": 0, "mean": 0, "amax": 0, "amin": 0, "norm": 0, "linalg_vector_norm": 0, "prod": 0,
               "index_add": 2, "scatter_add": 2, "scatter_reduce": 2, "index_reduce": 2, "segment_reduce": 0}
_LAYER_NORM = {"native_layer_norm": 5, "native_layer_norm_backward": 10}


def _numel(shape) -> int:
    return int(math.prod(shape)) if shape is not None else 0


def _shape_of(value):
    return tuple(value.shape) if torch.is_tensor(value) else None


def _pointwise(per_element):
    def count(*args, out_val=None, **kwargs):
        out = out_val[0] if isinstance(out_val, (tuple, list)) else out_val
        return per_element * (out.numel() if torch.is_tensor(out) else 0)

    count._get_raw = True
    return count


def _reduction(argument):
    def count(*args, out_val=None, **kwargs):
        source = args[argument] if len(args) > argument else kwargs.get("source", kwargs.get("src"))
        return source.numel() if torch.is_tensor(source) else 0

    count._get_raw = True
    return count


def _layer_norm(per_element):
    def count(*args, out_val=None, **kwargs):
        first = args[0] if args and torch.is_tensor(args[0]) else None
        return per_element * (first.numel() if first is not None else 0)

    count._get_raw = True
    return count


def _packets(name):
    packet = getattr(aten, name, None)
    return [packet] if packet is not None else []


def extra_flop_formulas() -> dict:
    """The element-wise, reduction and layer-norm counts (module docstring), for FlopCounterMode."""
    mapping = {}
    for per_element, names in _POINTWISE.items():
        for name in names:
            for packet in _packets(name):
                mapping[packet] = _pointwise(per_element)
    for name, argument in _REDUCTIONS.items():
        for packet in _packets(name):
            mapping[packet] = _reduction(argument)
    for name, per_element in _LAYER_NORM.items():
        for packet in _packets(name):
            mapping[packet] = _layer_norm(per_element)
    return mapping


class _Counter:
    """A TorchDispatchMode that sums FLOPs with PyTorch's formulas for matrix products and ours
    for the rest (PyTorch's FlopCounterMode tracks modules with autograd hooks, which
    ``torch.autograd.grad`` inside the forward, as for forces, does not allow)."""

    def __new__(cls):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils.flop_counter import flop_registry

        extra = extra_flop_formulas()

        class Mode(TorchDispatchMode):
            def __init__(self):
                super().__init__()
                self.matmul = 0
                self.other = 0

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                packet = func._overloadpacket
                if packet in extra:
                    self.other += int(extra[packet](*args, **kwargs, out_val=out))
                elif packet in flop_registry:
                    self.matmul += int(flop_registry[packet](*args, **kwargs, out_val=out))
                return out

        return Mode()


def counted(function, *args, **kwargs) -> tuple:
    """(result of ``function(*args, **kwargs)``, {'total', 'matmul', 'other'} FLOPs)."""
    counter = _Counter()
    with counter:
        result = function(*args, **kwargs)
    return result, {"total": counter.matmul + counter.other, "matmul": counter.matmul, "other": counter.other}


def training_step_flops(model, train_config, batch) -> dict:
    """FLOPs of one training step of ``model`` on ``batch`` (a PyG batch) with the objective of
    ``train_config`` (a TrainConfig): {'total', 'matmul', 'other', 'structures', 'atoms'}.
    Gradients are cleared afterwards."""
    from torchmdx.train.objective import batch_counts, training_objective

    want_forces = train_config.train_forces and getattr(batch, "forces", None) is not None
    want_stress = train_config.train_stress and getattr(batch, "stress", None) is not None
    dtype = next(model.parameters()).dtype

    def step():
        out = model(batch.z, batch.pos.to(dtype), batch.batch, getattr(batch, "cell", None),
                    getattr(batch, "pbc", None), forces=want_forces, stress=want_stress,
                    create_graph=want_forces or want_stress, num_structures=int(batch.num_graphs))
        loss, _, _ = training_objective(
            train_config, out["energy"], out["forces"] if want_forces else None, batch.energy.to(out["energy"].dtype),
            batch.forces.to(dtype) if want_forces else None, batch_counts(batch),
            out["stress"] if want_stress else None, batch.stress if want_stress else None)
        loss.backward()
        return loss

    was_training = model.training
    model.train()
    try:
        _, flops = counted(step)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    flops.update(structures=int(batch.num_graphs), atoms=int(batch.z.shape[0]))
    return flops


def parameter_count(model) -> int:
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad))


def flops_of(function, *args, **kwargs) -> int:
    """Total FLOPs of one call (for tests and benchmarks)."""
    return counted(function, *args, **kwargs)[1]["total"]


__all__ = ["counted", "extra_flop_formulas", "flops_of", "parameter_count", "training_step_flops"]
