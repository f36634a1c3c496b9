"""Launching Triton kernels without Triton's per-call dispatch.

Triton's generic dispatch (argument binding, specialization keys) costs tens of microseconds per
launch, which is most of a small system's neighbor-list time outside a CUDA graph. Once a kernel
is compiled for a given argument signature, :func:`launch` calls the compiled kernel's launcher
directly. Any failure (a Triton version with another launcher) switches this off for good, and
kernels are launched the plain way from then on.
"""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


_COMPILED: dict = {}
_FAST_OK = [True]
_STREAM = []  # (get_current_device, get_current_stream, knobs) of the active Triton driver


def _signature_key(args):
    """What Triton specializes a compiled kernel on: dtype and 16-byte alignment of tensors,
    the width of ints (every int argument is in ``do_not_specialize``)."""
    return tuple([(a.dtype, not a.data_ptr() & 15) if isinstance(a, torch.Tensor)
                  else (-2147483648 <= a < 2147483648) if type(a) is int else type(a) for a in args])


def launch(kernel, grid, args, num_warps, fast: bool = True, **constexprs):
    """kernel[grid](*args, **constexprs), then direct calls of the compiled kernel's launcher
    for the same argument signature (Triton's generic dispatch costs tens of microseconds).
    ``fast`` False (or under the interpreter): always Triton's own dispatch."""
    fast = fast and _FAST_OK[0] and not interpreting()
    if fast:
        key = (kernel, len(grid), num_warps, tuple(constexprs.items()), _signature_key(args))
        hit = _COMPILED.get(key)
        if hit is not None:
            compiled, values = hit
            try:
                g = tuple(grid) + (1,) * (3 - len(grid))
                device, stream, knobs = _STREAM[0]
                enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
                if enter is None and leave is None:
                    compiled.run(g[0], g[1], g[2], stream(device()), compiled.function, compiled.packed_metadata,
                                 None, None, None, *args, *values)
                else:
                    compiled[g](*args, *values)
                return
            except Exception:  # noqa: BLE001 - a Triton version with another launcher: dispatch normally
                _FAST_OK[0] = False
    compiled = kernel[grid](*args, num_warps=num_warps, **constexprs)
    if fast and compiled is not None and hasattr(compiled, "packed_metadata"):
        try:
            if not _STREAM:
                from triton import knobs
                from triton.runtime.driver import driver

                _STREAM.append((driver.active.get_current_device, driver.active.get_current_stream, knobs))
            names = [p.name for p in kernel.params if p.is_constexpr]
            compiled.run  # noqa: B018 - loads the binary now (raises here, not at the next call)
            if len(_COMPILED) > 512:
                _COMPILED.clear()
            _COMPILED[key] = (compiled, tuple(constexprs[n] for n in names))
        except Exception:  # noqa: BLE001
            _FAST_OK[0] = False
