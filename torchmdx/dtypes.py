"""Floating-point dtype names, one table for every layer (model files, datasets, MD)."""

from __future__ import annotations

from typing import Iterable, Type

import torch

from torchmdx.errors import ConfigError, TorchmdxError

#: accepted names (``torch.float32`` and ``"torch.float32"`` are accepted too)
FLOAT_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
                "bfloat16": torch.bfloat16, "float": torch.float32, "double": torch.float64}


def torch_dtype(value, allowed: Iterable[torch.dtype] = (torch.float32, torch.float64),
                error: Type[TorchmdxError] = ConfigError, what: str = "dtype") -> torch.dtype:
    """The torch dtype of ``value`` (a torch dtype or one of :data:`FLOAT_DTYPES`' names),
    one of ``allowed``; otherwise one ``error`` line naming ``what`` and the allowed names."""
    allowed = tuple(allowed)
    name = str(value).replace("torch.", "")
    if isinstance(value, type) and value.__module__ == "numpy":  # np.float64: "<class 'numpy.float64'>"
        name = value.__name__
    dtype = value if isinstance(value, torch.dtype) else FLOAT_DTYPES.get(name)
    if dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise error(f"{what} must be one of {names}, got {value!r}")
    return dtype
