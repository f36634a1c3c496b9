"""The inductor source of a profile's largest generated kernels (``bench_model.py --profile``).

Inductor names a fused kernel after its operators only up to ``kernel_name_max_ops`` of them;
past that it is ``triton_per_fused_5`` and the profile cannot say what it computes. The output
code that inductor writes to its cache directory defines each kernel as::

    # kernel path: /tmp/torchinductor_user/ab/cab....py
    # Topologically Sorted Source Nodes: [add, mul, sum_1], Original ATen: [aten.add, aten.mul, aten.sum]
    # Source node to ATen node mapping:
    #   add => add
    triton_per_fused_5 = async_compile.triton('triton_per_fused_5', '''
    ...
    ''', device_str='cuda')

:func:`find_kernel_sources` reads those definitions back (comment block and code), and
:func:`write_kernel_sources` writes the ones of the named kernels to a Markdown file, so a
profile's unexplained kernels can be traced to the model's operations. A name can occur in
several compiled graphs (each numbers its kernels from 0): every definition is kept, with its file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Dict, Iterable, List, Optional

_DEFINITION = re.compile(
    r"((?:^#[^\n]*\n)*)^(\w+) = async_compile\.triton\('(\w+)', '''\n(.*?)^''', device_str='\w+'\)",
    re.MULTILINE | re.DOTALL)


def cache_dir() -> Path:
    """Inductor's cache directory of this process (``TORCHINDUCTOR_CACHE_DIR`` or its default)."""
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir as inductor_cache_dir
        return Path(inductor_cache_dir())
    except ImportError:  # older torch
        return Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR", f"/tmp/torchinductor_{os.environ.get('USER', 'user')}"))


def find_kernel_sources(names: Iterable[str], folder: Optional[Path] = None) -> Dict[str, List[dict]]:
    """{kernel name: [{"file", "comments", "code"}, ...]} of the generated kernels called ``names``
    defined in the output code under ``folder`` (default :func:`cache_dir`); names not found map to []."""
    wanted = {name: [] for name in names}
    folder = Path(folder) if folder is not None else cache_dir()
    if not wanted or not folder.is_dir():
        return wanted
    for path in sorted(folder.rglob("*.py")):
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        if "async_compile.triton(" not in text:
            continue
        for match in _DEFINITION.finditer(text):
            comments, variable, name, code = match.groups()
            if name in wanted:
                wanted[name].append({"file": str(path), "comments": comments.rstrip("\n"), "code": code.rstrip("\n")})
    return wanted


def write_kernel_sources(names: Iterable[str], path: Path, folder: Optional[Path] = None, max_lines: int = 120) -> Path:
    """Markdown of :func:`find_kernel_sources` for ``names`` (in that order) at ``path``: per kernel
    its source-node comments and up to ``max_lines`` lines of its code."""
    names = list(dict.fromkeys(names))
    found = find_kernel_sources(names, folder)
    parts = [f"# Inductor sources of {len(names)} kernels (cache {folder or cache_dir()})"]
    for name in names:
        parts.append(f"\n## {name}")
        if not found[name]:
            parts.append("not found in the cache (compiled in another process or cache directory)")
        for k, definition in enumerate(found[name]):
            lines = definition["code"].splitlines()
            more = f"\n# ... {len(lines) - max_lines} more lines" if len(lines) > max_lines else ""
            parts.append(f"definition {k + 1} of {len(found[name])}: {definition['file']}\n"
                         f"```\n{definition['comments']}\n```\n```python\n" + "\n".join(lines[:max_lines]) + more + "\n```")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(parts) + "\n")
    tmp.replace(path)
    return path
