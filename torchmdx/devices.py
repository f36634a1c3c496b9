"""Device names a user gives (``--device``, ``device=``, ``trainer.accelerator``), checked before
any work starts: one line naming what was asked and what exists here."""

from __future__ import annotations

from torchmdx.errors import ConfigError


def check_device(device, what: str = "device"):
    """A ``torch.device`` that exists on this machine; one-line ConfigError otherwise (``what``:
    how the user gave it, e.g. ``--device``)."""
    import torch

    given = device  # the lines quote what the user wrote ('gpu' was quoted as 'cuda')
    if isinstance(device, str) and device.strip().lower() == "gpu":
        device = "cuda"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{what} {device!r} is not a device name (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{what} {given!r}: no CUDA GPU is available here (use cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"{what} {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type == "meta":  # tensors of shapes only: "Tensor.item() cannot be called on meta tensors"
        raise ConfigError(f"{what} {device!r}: the meta device holds no numbers (shapes only); use cpu or cuda")
    elif dev.type != "cpu":
        raise ConfigError(f"{what} {device!r}: torchmdx runs on cpu or cuda devices")
    elif dev.index not in (None, 0):  # 'cpu:1' was taken as the CPU: torch has one CPU device, cpu:0
        raise ConfigError(f"{what} {device!r}: there is one CPU device, cpu (cpu:0), which uses all its "
                          "cores; GPUs are cuda, cuda:1, ...")
    return dev


#: environment variables a multi-node launch sets (SLURM, torchrun, Lightning's own NODE_RANK/MASTER_ADDR,
#: LSF, MPI): Lightning reads the ranks from one of them
MULTI_NODE_VARIABLES = ("SLURM_NTASKS", "GROUP_RANK", "NODE_RANK", "MASTER_ADDR", "WORLD_SIZE", "LSB_JOBID",
                        "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def check_launcher(num_nodes: int, what: str = "config key 'trainer.num_nodes'") -> None:
    """``trainer.num_nodes`` > 1 in a process that no multi-node launcher started (a plain ``torchmdx train``
    on one machine): the run folder was written, then the process waited forever for the other nodes to
    join (round 20). One line, before anything is read or written."""
    import os

    if num_nodes is None or num_nodes <= 1 or any(name in os.environ for name in MULTI_NODE_VARIABLES):
        return
    raise ConfigError(f"{what} is {num_nodes}, but this process was not started by a multi-node launcher (no SLURM "
                      "job, torchrun, or NODE_RANK/MASTER_ADDR in the environment): it would wait forever for the "
                      "other nodes; set it to 1 on one machine, or launch one process per node (docs/distributed.md)")


def check_accelerator(accelerator, devices=None, what: str = "trainer.accelerator") -> None:
    """Lightning's ``accelerator`` names: ``gpu``/``cuda`` need a CUDA GPU here (and as many as
    ``devices`` asks for, when it is a count); ``cpu`` and ``auto`` always work."""
    import torch

    name = str(accelerator).lower()
    if name in ("auto", "cpu"):
        return
    if name in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"config key '{what}' is {accelerator!r} but no CUDA GPU is available here "
                              "(use cpu or auto)")
        count = devices if isinstance(devices, int) else int(devices) if isinstance(devices, str) and devices.isdigit() \
            else None
        if count is not None and count > torch.cuda.device_count():
            raise ConfigError(f"config key 'trainer.devices' asks for {count} GPUs; {torch.cuda.device_count()} here")
        return
    raise ConfigError(f"config key '{what}' is {accelerator!r}; torchmdx trains on cpu, gpu (cuda) or auto")


def memory_bytes() -> tuple[int, int]:
    """(total, available) memory in bytes: /proc/meminfo's MemTotal and MemAvailable, capped by a
    cgroup (container) limit; zeros where unknown."""
    import os

    total = available = 0
    try:
        with open("/proc/meminfo") as handle:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in handle if line.split()[1:2]}
        total, available = info.get("MemTotal", 0), info.get("MemAvailable", 0)
    except (OSError, ValueError, IndexError):
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            pass
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(limit_file) as handle:
                limit = int(handle.read().strip())
        except (OSError, ValueError):
            continue
        if 0 < limit < (total or limit + 1):
            total, available = limit, min(available, limit) if available else limit
    return total, available


def thread_limit() -> int:
    """The most torch CPU threads a config may ask for: 4 x this machine's CPUs, at least 1024.
    torch passes the count to OpenMP as a C int (10**12 was ``ValueError: Overflow when unpacking
    long``) and a million threads never finish starting."""
    import os

    return max(1024, 4 * (os.cpu_count() or 1))


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, else the machine's count)."""
    import os

    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


#: data-loader workers a config may always ask for, whatever this machine's CPU count
WORKER_FLOOR = 64


def worker_limit() -> int:
    """The most data-loader worker processes a config may ask for: 4 x the usable CPUs, at least 64
    (so a config written for a large node, 8-32 workers, still runs on a laptop: PyTorch then warns).
    Each worker is a process (PyTorch warns above the CPU count); ``data.num_workers: 100000`` forked
    processes until the machine ran out (round 20)."""
    return max(WORKER_FLOOR, 4 * usable_cpus())


def check_threads(threads, what: str) -> None:
    """A thread count of ``what`` (``--threads``, ``config key 'md.threads'``) within 1..
    :func:`thread_limit`, or a one-line ConfigError; None (torch's choice) passes."""
    import os

    if threads is None:
        return
    if threads < 1:
        raise ConfigError(f"{what} must be >= 1, got {threads}")
    if threads > thread_limit():
        raise ConfigError(f"{what} must be at most {thread_limit()}, got {threads}: this machine has "
                          f"{os.cpu_count() or 1} CPUs, and threads beyond them only slow torch down")
