"""Makes the Triton CPU interpreter skip redundant work (test helper of the interpreter
subprocesses: tests/neighbors_triton_worker.py, the ``__main__`` of test_message_triton.py,
test_filter_table.py and test_launch_table.py, the table-label script of
test_bench_model_smoke.py). Same operations on the same numbers: the neighbor-list worker's 94
cases gave bit-identical outputs with and without it, in 56 % of the time (2026-12-07).

1. Under ``TRITON_INTERPRET=1`` every launch patches ``triton.language`` with interpreter versions
   of its builtins (``triton.runtime.interpreter._patch_lang``) for the launch's duration.
   Triton 3.9 also re-runs that whole patch (``inspect.getmembers`` over the language modules)
   at every call of a ``@triton.jit`` function inside the kernel (our helpers, and ``tl.sum``,
   ``tl.max``, ``tl.cumsum``, ``tl.zeros``, which are ``@jit`` functions of triton.language),
   although after the first such call the modules are patched already: the builtins it looks
   for are replaced (so it replaces none), and what it sets unconditionally it sets to the same
   stateless closures again. Here such a call skips the re-patch when the modules it sees were
   patched already in this launch (by the launch itself or by an earlier call); the first patch
   of each module in a launch, and the launch's restore at its end, are Triton's own.
2. ``_get_np_dtype`` (one or more calls per interpreted operation) rebuilds a 20-entry table at
   each call: here a table built once gives the same answers.

Any Triton without these internals is left untouched (``install`` returns False).
"""

from __future__ import annotations

import inspect

_INSTALLED = []


def install() -> bool:
    """Patch ``triton.runtime.interpreter`` (once per process); True when active."""
    if _INSTALLED:
        return True
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    original = getattr(interpreter, "_patch_lang", None)
    executor = getattr(interpreter, "GridExecutor", None)
    if original is None or executor is None or not hasattr(interpreter, "InterpretedFunction"):
        return False
    launch_call = executor.__call__
    active = []  # per launch in progress: the language modules patched so far
    starting = [False]  # a launch is about to make its own patch
    seen = {}

    class _Launch:
        """The launch's own patch scope: its restore also ends the launch."""

        def __init__(self, scope):
            self.scope = scope

        def restore(self):
            active.pop()
            self.scope.restore()

    class _AlreadyPatched:
        def restore(self):
            pass

    def languages(fn):
        found = seen.get(fn)
        if found is None:
            found = seen[fn] = frozenset(id(v) for v in fn.__globals__.values()
                                         if inspect.ismodule(v) and (v is tl or v is tl.core))
        return found

    def patch_lang(fn):
        if starting[0]:  # the launch's own patch (GridExecutor.__call__), restored at its end
            starting[0] = False
            scope = original(fn)
            active.append(set(languages(fn)))
            return _Launch(scope)
        if active:  # a @triton.jit helper inside that launch
            langs = languages(fn)
            if langs <= active[-1]:
                return _AlreadyPatched()
            # the first helper that sees another language module (tl.sum & co. see
            # triton.language.core): Triton's patch, kept like Triton keeps it (never restored)
            active[-1].update(langs)
        return original(fn)

    def run_launch(self, *args, **kwargs):
        starting[0] = True
        try:
            return launch_call(self, *args, **kwargs)
        finally:
            starting[0] = False

    interpreter._patch_lang = patch_lang
    executor.__call__ = run_launch
    _memoize_np_dtype(interpreter, tl)
    _INSTALLED.append(original)
    return True


def _memoize_np_dtype(interpreter, tl) -> None:
    """``_get_np_dtype`` (Triton dtype -> numpy dtype, called for every interpreted operation)
    builds its 20-entry table at each call; the same answers from a table built once (anything
    not in it still goes to Triton's function)."""
    original = getattr(interpreter, "_get_np_dtype", None)
    if original is None:
        return
    table = {}
    for name in ("int1", "float16", "float32", "float64", "int8", "uint8", "int16", "uint16", "int32", "uint32",
                 "int64", "uint64", "bfloat16", "float8e5", "float8e5b16", "float8e4nv", "float8e4b8", "float8e4b15"):
        dtype = getattr(tl, name, None)
        if dtype is not None:
            table[dtype] = original(dtype)
    pointer, block = tl.pointer_type, tl.block_type

    def get_np_dtype(tt_dtype):
        if isinstance(tt_dtype, block) and not isinstance(tt_dtype.element_ty, pointer):
            found = table.get(tt_dtype.element_ty)
        elif isinstance(tt_dtype, (pointer, block)):
            found = None
        else:
            found = table.get(tt_dtype)
        return found if found is not None else original(tt_dtype)

    interpreter._get_np_dtype = get_np_dtype
