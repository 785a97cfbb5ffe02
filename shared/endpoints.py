"""Where the daemon listens: one rule for the daemon, the client library and the CLI."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

SOCKET_ENV = "LORACACHE_SOCKET"
SYSTEM_SOCKET = Path("/run/loracache/daemon.sock")
SOCKET_NAME = "daemon.sock"
MAX_IPC_PATH = 107  # sun_path is 108 bytes with the terminating NUL


def default_socket_path() -> Path:
    """``$LORACACHE_SOCKET``, else the system service's socket when it exists, else a per-user
    socket under ``$XDG_RUNTIME_DIR`` (or the temp dir)."""
    if os.environ.get(SOCKET_ENV):
        return Path(os.environ[SOCKET_ENV])
    if SYSTEM_SOCKET.exists():
        return SYSTEM_SOCKET
    return user_runtime_dir() / SOCKET_NAME


def user_runtime_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(base) / f"loracache-{os.getuid()}"


def endpoint(socket_path: Path | str) -> str:
    """The ZeroMQ endpoint of a socket path; refuses paths the kernel cannot bind."""
    path = os.path.abspath(socket_path)
    if len(path.encode()) > MAX_IPC_PATH:
        raise ValueError(f"socket path {path} is longer than {MAX_IPC_PATH} bytes, the limit of a "
                         "Unix socket address; choose a shorter path")
    return f"ipc://{path}"
