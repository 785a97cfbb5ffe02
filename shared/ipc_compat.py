"""Which torch releases can open which CUDA IPC handles (without importing torch).

torch 2.5 changed the bytes of a shared CUDA allocation's handle: a version byte and a type
byte now precede the 64-byte ``cudaIpcMemHandle_t`` (pytorch PR #130890, which also added
expandable segments' handles). A newer importer still reads the bare 64 bytes of older
releases; an older importer would read the new prefix as part of the handle. So a worker can
open the daemon's handles when its handle format is the daemon's or newer.
"""

from __future__ import annotations

import functools
import importlib.metadata
import re
import sys

from .errors import ErrorCode, LoraCacheError

PREFIXED_HANDLES_SINCE = (2, 5)
SUPPORTED = "workers on torch 2.5 or newer with a daemon on any torch >= 2.3; on torch 2.3 " \
            "or 2.4, both on 2.3 or 2.4"


def torch_release() -> str:
    """This process's torch release (``2.11.0+cu130``): the imported one's, else what its
    metadata says (the CLI does not import torch)."""
    imported = sys.modules.get("torch")
    if imported is not None:
        return str(imported.__version__)
    return _installed_torch()


@functools.cache
def _installed_torch() -> str:
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return ""


@functools.cache
def handle_format(release: str) -> int | None:
    """1: bare 64-byte handles (torch < 2.5); 2: prefixed handles; None: unknown release."""
    match = re.match(r"(\d{1,6})\.(\d{1,6})\b", release)  # a peer's string: bounded
    if match is None:
        return None
    return 2 if (int(match.group(1)), int(match.group(2))) >= PREFIXED_HANDLES_SINCE else 1


def check_importer(daemon_release: str, worker_release: str) -> None:
    """Refuse, with VERSION_MISMATCH, a worker whose torch cannot open the daemon's handles.
    An unknown release on either side is let through (an older client does not say)."""
    daemon_format, worker_format = handle_format(daemon_release), handle_format(worker_release)
    if daemon_format is None or worker_format is None or worker_format >= daemon_format:
        return
    raise LoraCacheError(
        ErrorCode.VERSION_MISMATCH,
        f"this worker's torch {worker_release} cannot open the CUDA IPC handles of the daemon's "
        f"torch {daemon_release} (their format changed in torch 2.5); supported: {SUPPORTED}. "
        "Upgrade torch in the worker, or run a daemon on the worker's torch")
