"""Compiled graphs kept across runs: inductor's own caches in one torchmdx folder.

Compiling the traced training step or an MD graph costs tens of seconds to minutes per shape.
torch's inductor already caches what it compiles, keyed by content: the FX graph cache (the
compiled kernels and wrapper of one graph, keyed by the graph's code, the shapes, dtypes and
devices of its inputs, the inductor options and the torch version) and the AOTAutograd cache
(the forward/backward split of a training graph, keyed likewise). A traced torchmdx graph
holds the whole model: its hyper-parameters (layers, widths, cutoff, activation) are part of
the graph's code and its parameters are graph inputs, so a changed model config, dtype, device
or batch shape is a different key and never reuses a stale graph, while a second run of the same
config (or MD after training) finds every graph compiled. What stays per run is dynamo's and
``make_fx``'s tracing, which are quick next to the compile.

:func:`ensure` points those caches at one folder, ``$TORCHMDX_COMPILE_CACHE`` or
``~/.cache/torchmdx/compile`` (inductor's default is a folder under /tmp, gone at reboot),
unless ``TORCHINDUCTOR_CACHE_DIR`` is set already (the user's choice wins), and keeps a manifest
with the torch and Triton versions beside it. A folder made by other versions, or whose
manifest cannot be read, is emptied and rebuilt, with one line saying so; a compile that fails
reading the cache (:func:`is_cache_error`) empties it and compiles once more
(:func:`rebuild_after`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

CACHE_ENV = "TORCHMDX_COMPILE_CACHE"
INDUCTOR_ENV = "TORCHINDUCTOR_CACHE_DIR"
MANIFEST = "torchmdx-compile-cache.json"
FORMAT = 1

_state: dict = {"dir": None}


def default_dir() -> Path:
    """``$TORCHMDX_COMPILE_CACHE``, else ``~/.cache/torchmdx/compile``."""
    given = os.environ.get(CACHE_ENV)
    if given:
        return Path(given).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "torchmdx" / "compile"


def _versions() -> dict:
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # pragma: no cover - CPU-only installs without triton
        triton_version = None
    return {"format": FORMAT, "torch": torch.__version__, "triton": triton_version}


def _say(line: str) -> None:
    print(line, flush=True)


def ensure(folder: Optional[Path] = None) -> Optional[Path]:
    """Point inductor's caches at the torchmdx folder (once per process; returns it, or None
    when the user's ``TORCHINDUCTOR_CACHE_DIR`` is in charge) and check its manifest."""
    if _state["dir"] is not None and folder is None:
        return _state["dir"]
    if folder is None and _user_inductor_dir():
        _enable_caches()
        return None
    root = Path(folder) if folder is not None else default_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
        _check_manifest(root)
    except OSError as exc:
        _say(f"compile cache {root}: not writable ({exc.strerror or exc}); compiling without a lasting cache")
        return None
    os.environ[INDUCTOR_ENV] = str(root / "inductor")
    _enable_caches()
    _state["dir"] = root
    return root


def _user_inductor_dir() -> bool:
    """Is ``TORCHINDUCTOR_CACHE_DIR`` the user's choice? (Inductor writes its /tmp default into the
    variable the first time it looks, so that value does not count.)"""
    value = os.environ.get(INDUCTOR_ENV)
    if not value:
        return False
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    return os.path.abspath(value) != os.path.abspath(default_cache_dir())


def _enable_caches() -> None:
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    if hasattr(functorch_config, "enable_autograd_cache"):
        functorch_config.enable_autograd_cache = True


def _check_manifest(root: Path) -> None:
    path = root / MANIFEST
    now = _versions()
    reason = None
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
            if not isinstance(saved, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            reason = f"unreadable manifest ({type(exc).__name__})"
        else:
            changed = [f"{key} {saved.get(key)} -> {now[key]}" for key in now if saved.get(key) != now[key]]
            if changed:
                reason = "made by other versions (" + ", ".join(changed) + ")"
    elif any(p.name != MANIFEST for p in root.iterdir()):
        reason = "no manifest"
    if reason is not None:
        clear(root)
        _say(f"compile cache {root}: {reason}; rebuilt")
    if reason is not None or not path.is_file():
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(now))
        os.replace(tmp, path)


def clear(root: Optional[Path] = None) -> None:
    """Empty the cache folder (the manifest is rewritten by :func:`ensure`)."""
    root = Path(root) if root is not None else (_state["dir"] or default_dir())
    if not root.is_dir():
        return
    for child in root.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def is_cache_error(exc: BaseException) -> bool:
    """Does ``exc`` come from reading a cached entry (a truncated or foreign file)?"""
    import pickle

    if isinstance(exc, (EOFError, pickle.UnpicklingError)):
        return True
    root = _state["dir"]
    text = str(exc)
    return root is not None and str(root) in text and isinstance(exc, (OSError, ValueError, RuntimeError))


def rebuild_after(exc: BaseException) -> bool:
    """If ``exc`` is a cache error, empty the folder (one line) and return True: compile again."""
    if not is_cache_error(exc):
        return False
    root = _state["dir"]
    if root is not None:
        clear(root)
        _check_manifest(root)
    _say(f"compile cache {root or os.environ.get(INDUCTOR_ENV)}: an entry could not be read "
         f"({type(exc).__name__}); rebuilt")
    return True
