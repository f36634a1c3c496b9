"""Timing helpers of the bench scripts: how long a call takes on the GPU and what it allocates.

- :func:`cuda_time`: median ms of a call (CUDA events after warm-up; wall clock on ``--device cpu``),
  with the counts reduced to fit :data:`TIME_BUDGET_S` when set (:func:`budgeted_counts`);
- :func:`gpu_busy_ms`: the GPU's kernel time per call (torch.profiler), without host gaps;
- :func:`replay_kernels`: kernels per CUDA-graph replay and their GPU time;
- :func:`peak_mib`: peak GPU memory of a call; :func:`error_text`: a failed cell's one-line error.

Module settings, set once by the script's ``main``: :data:`DEVICE` and :data:`TIME_BUDGET_S`.
Used by ``bench_model.py`` (and its ``model_*.py`` parts) and ``bench_train.py``.
"""

from __future__ import annotations

import math
import statistics
import time

import torch

#: where the benchmark runs (``--device cpu`` only smoke-tests a script: CPU times mean nothing here)
DEVICE = "cuda"
#: seconds one timing (warm-up + timed calls) may take; None: the fixed counts (``--budget-s``)
TIME_BUDGET_S = None


def synchronize():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def budgeted_counts(first_call_s: float, warmup: int, repeats: int, budget_s, min_repeats: int = 3) -> tuple:
    """(warm-up calls, timed calls) that fit ``budget_s`` seconds given the first call's wall time
    (which includes compilation, so it over-estimates): at most the given counts, at least one
    warm-up call and ``min_repeats`` timed calls."""
    if budget_s is None or first_call_s <= 0:
        return warmup, repeats
    calls = int(budget_s / first_call_s)
    repeats_fit = max(min_repeats, min(repeats, calls - 1))
    warmup_fit = max(1, min(warmup, calls - repeats_fit))
    return warmup_fit, repeats_fit


def cuda_time(fn, warmup: int, repeats: int) -> float:
    """Median ms of ``fn()`` over ``repeats`` calls timed with CUDA events, after ``warmup`` calls
    (both reduced to fit :data:`TIME_BUDGET_S` when set, from the first call's wall time)."""
    if TIME_BUDGET_S is not None:
        t0 = time.perf_counter()
        fn()
        synchronize()
        t1 = time.perf_counter()
        fn()  # the first call compiles; the second one is the estimate
        synchronize()
        warmup, repeats = budgeted_counts(min(t1 - t0, time.perf_counter() - t1), warmup, repeats, TIME_BUDGET_S)
        warmup = max(warmup - 2, 0)  # two calls already made
    for _ in range(warmup):
        fn()
    if DEVICE == "cpu":
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(times)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def gpu_busy_ms(fn, calls: int = 3):
    """(ms of GPU kernel time per ``fn()`` call, {kernel: ms per call}) from torch.profiler: the
    GPU's share of a call, without the host time between launches that CUDA events also see."""
    if DEVICE == "cpu":
        return math.nan, {}
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    per_kernel = {ev.key[:60]: ev.device_time_total / (1e3 * calls) for ev in prof.key_averages() if ev.device_time_total > 0}
    return sum(per_kernel.values()), per_kernel


def replay_kernels(replay, calls: int = 3, top: int = 5) -> dict:
    """Kernels per graph replay and their summed GPU time (torch.profiler; CUPTI reports the
    kernels inside a graph), with the ``top`` largest (name, µs per call, launches per call)."""
    from torch.profiler import ProfilerActivity, profile

    synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            replay()
        synchronize()
    rows = [(ev.device_time_total, ev.count, ev.key) for ev in prof.key_averages() if ev.device_time_total > 0]
    rows.sort(reverse=True)
    return {"launches": sum(r[1] for r in rows) // calls, "gpu_ms": round(sum(r[0] for r in rows) / 1e3 / calls, 3),
            "top": [(key[:70], round(us / calls, 1), count / calls) for us, count, key in rows[:top]]}


def peak_mib(fn) -> float:
    """Peak GPU memory (MiB) allocated while ``fn()`` runs (NaN on the CPU)."""
    if DEVICE == "cpu":
        return math.nan
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def error_text(exc: BaseException) -> str:
    """A failed measurement's one-line error for its table cell."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "out of GPU memory"
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
