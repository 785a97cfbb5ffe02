"""Worker-side library: lease LoRA tensors from the loracache daemon without copying them.

Names are imported on first use, so the ``loracache`` admin commands start without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from loracache.shared.errors import ErrorCode, LoraCacheError

from .client import LoraCacheClient

if TYPE_CHECKING:
    from .adapters import load_lora_weights
    from .fusing import (delete_adapters, get_active_adapters, load_and_fuse_lora,
                         set_and_fuse_adapters, unfuse_lora)
    from .lease import Lease
    from .sourcing import clear_lora_cache

_LAZY = {"Lease": ".lease", "clear_lora_cache": ".sourcing", "delete_adapters": ".fusing",
         "get_active_adapters": ".fusing", "load_and_fuse_lora": ".fusing",
         "load_lora_weights": ".adapters",
         "set_and_fuse_adapters": ".fusing", "unfuse_lora": ".fusing"}

__all__ = ["ErrorCode", "Lease", "LoraCacheClient", "LoraCacheError", "clear_lora_cache",
           "delete_adapters", "get_active_adapters", "load_and_fuse_lora",
           "load_lora_weights", "set_and_fuse_adapters", "unfuse_lora"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value
