"""Where the daemon listens: one rule for the daemon, the client library and the CLI.

The socket comes from ``--socket``, else ``$LORACACHE_SOCKET``, else the ``socket`` key of the
configuration file, else the system service's socket when it exists, else a per-user socket.
"""

from __future__ import annotations

import os
import tempfile
import tomllib
from pathlib import Path
from typing import Any, Mapping

CONFIG_ENV = "LORACACHE_CONFIG"
SYSTEM_SOCKET = Path("/run/loracache/daemon.sock")
SYSTEM_CONFIG = Path("/etc/loracache/config.toml")
SOCKET_NAME = "daemon.sock"
MAX_IPC_PATH = 107  # sun_path is 108 bytes with the terminating NUL


def config_file_path(explicit: str | os.PathLike[str] | None = None,
                     environ: Mapping[str, str] | None = None) -> Path | None:
    """``--config``, else ``$LORACACHE_CONFIG``, else ``/etc/loracache/config.toml`` if present."""
    environ = os.environ if environ is None else environ
    if explicit:
        return Path(explicit)
    if environ.get(CONFIG_ENV):
        return Path(environ[CONFIG_ENV])
    return SYSTEM_CONFIG if SYSTEM_CONFIG.is_file() else None


def read_config_file(path: Path) -> dict[str, Any]:
    """The TOML table in ``path``; ValueError with a message naming the file otherwise."""
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except FileNotFoundError:
        raise ValueError(f"configuration file {path} does not exist") from None
    except OSError as exc:
        raise ValueError(f"cannot read configuration file {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"configuration file {path} is not valid TOML: {exc}") from None


def default_socket_path(config_file: str | os.PathLike[str] | None = None) -> Path:
    """The socket to use when none is given (see the module docstring for the order).

    Raises ValueError when the configuration file cannot be read or its ``socket`` is not a
    string.
    """
    return _configured_socket("socket", config_file) or fallback_socket_path()


def admin_socket_path(config_file: str | os.PathLike[str] | None = None) -> Path | None:
    """The admin socket, if one is configured: ``$LORACACHE_ADMIN_SOCKET``, else the
    ``admin_socket`` of the configuration file."""
    return _configured_socket("admin_socket", config_file)


def _configured_socket(key: str, config_file: str | os.PathLike[str] | None) -> Path | None:
    """``$LORACACHE_<KEY>``, else ``key`` in the configuration file, else None."""
    env = f"LORACACHE_{key.upper()}"
    if os.environ.get(env):
        return Path(os.environ[env])
    path = config_file_path(config_file)
    if path is None:
        return None
    value = read_config_file(path).get(key)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"configuration file {path}: {key} = {value!r} is not a path")
    return Path(value) if value else None


def fallback_socket_path() -> Path:
    """The system service's socket when it exists, else a per-user one."""
    try:
        if SYSTEM_SOCKET.exists():
            return SYSTEM_SOCKET
    except PermissionError:  # its directory is closed to users outside the service's group:
        return SYSTEM_SOCKET  # the client then says so, and names the group
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
