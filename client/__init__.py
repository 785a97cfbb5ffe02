"""Worker-side library: lease LoRA tensors from the loracache daemon without copying them."""

from loracache.shared.errors import ErrorCode, LoraCacheError

from .connection import LoraCacheClient
from .fusing import (clear_lora_cache, delete_adapters, get_active_adapters, load_and_fuse_lora,
                     set_and_fuse_adapters, unfuse_lora)
from .lease import Lease

__all__ = ["ErrorCode", "Lease", "LoraCacheClient", "LoraCacheError", "clear_lora_cache",
           "delete_adapters", "get_active_adapters", "load_and_fuse_lora",
           "set_and_fuse_adapters", "unfuse_lora"]
