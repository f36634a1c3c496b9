"""Which process of a data-parallel launch this is, before ``torch.distributed`` starts.

A DDP run starts one process per device. With Lightning's own launcher (``trainer.devices: N``
on one machine) the first process sets up the data before it starts the others; with
``torchrun`` or SLURM (``srun``) all processes start at once. The data layer then lets

- the first process *on each host* (local rank 0) build the cache, the others wait for it
  (Lightning's ``prepare_data`` rule: a cache folder may be local to a host);
- the first process of the whole run (global rank 0) make the split and fit the atomic
  references and normalisation; the others wait for its file in the run folder and read it
  (:class:`~torchmdx.data.TorchmdxDataModule`), so every rank has the same numbers, computed once.

Ranks come from ``torch.distributed`` when it is running, else from the launchers' environment
variables: ``RANK`` / ``LOCAL_RANK`` / ``WORLD_SIZE`` (torchrun, Lightning), ``SLURM_PROCID`` /
``SLURM_LOCALID`` / ``SLURM_NTASKS`` (srun), ``NODE_RANK`` (Lightning's launcher on several hosts).
"""

from __future__ import annotations

import os
import time
from typing import Callable, Optional

from torchmdx.errors import DataError

#: how long a waiting rank waits for rank 0's cache or fit, seconds (TORCHMDX_RANK_WAIT_S overrides)
RANK_WAIT_S = 6 * 3600.0
POLL_S = 0.5


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name)
    try:
        return int(value) if value not in (None, "") else None
    except ValueError:
        return None


def launch_world() -> int:
    """Number of processes of this launch (1 when not launched for DDP)."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    for key in ("WORLD_SIZE", "SLURM_NTASKS"):
        value = _env_int(key)
        if value is not None:
            return max(1, value)
    return 1


def global_rank() -> int:
    """This process's rank in the launch (0 when not launched for DDP)."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    if launch_world() == 1:
        return 0
    rank = _env_int("RANK")
    if rank is not None:
        return rank
    local, node = _env_int("LOCAL_RANK"), _env_int("NODE_RANK") or _env_int("GROUP_RANK") or 0
    if local is not None:
        # Lightning's launcher: rank 0 is the first process of node 0; others only need "not 0"
        return 0 if (local == 0 and node == 0) else max(1, local + node)
    return _env_int("SLURM_PROCID") or 0


def local_rank() -> int:
    """This process's rank on its host (0 when not launched for DDP)."""
    if launch_world() == 1:
        return 0
    for key in ("LOCAL_RANK", "SLURM_LOCALID"):
        value = _env_int(key)
        if value is not None:
            return value
    return global_rank()


def rank_wait_seconds() -> float:
    """``TORCHMDX_RANK_WAIT_S`` (seconds > 0), else :data:`RANK_WAIT_S`. A value that is no such
    number is a one-line DataError: 'abc' was float()'s ValueError traceback, 'nan' or '-5' gave
    up at once ("gave up waiting ... after nan s") while rank 0 was still building the cache."""
    import math

    text = os.environ.get("TORCHMDX_RANK_WAIT_S", "").strip()
    if not text:
        return RANK_WAIT_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise DataError(f"environment variable TORCHMDX_RANK_WAIT_S is {text!r}; expected a number of seconds > 0 "
                        f"(unset it for the default, {RANK_WAIT_S:.0f} s)")
    return value


def wait_for(ready: Callable[[], object], what: str, say: Callable[[str], None] = print,
             timeout: Optional[float] = None):
    """Poll ``ready()`` until it returns something truthy (returned); one line when the wait
    starts; a DataError after ``timeout`` seconds (:data:`RANK_WAIT_S`, TORCHMDX_RANK_WAIT_S)."""
    if timeout is None:
        timeout = rank_wait_seconds()
    value = ready()
    if value:
        return value
    say(f"rank {global_rank()}: waiting for {what}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(POLL_S)
        value = ready()
        if value:
            return value
    raise DataError(f"rank {global_rank()}: gave up waiting for {what} after {timeout:.0f} s; is rank 0 "
                    "still running? (TORCHMDX_RANK_WAIT_S sets how long to wait)")
