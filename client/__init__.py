"""Worker-side library: lease LoRA tensors from the loracache daemon without copying them."""

from loracache.shared.errors import ErrorCode, LoraCacheError

from .connection import LoraCacheClient
from .lease import Lease

__all__ = ["ErrorCode", "Lease", "LoraCacheClient", "LoraCacheError"]
