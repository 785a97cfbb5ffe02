"""The daemon's configuration: validated once, frozen, then only read.

Building a config raises :class:`ConfigError`; only the CLI turns that into an exit.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from loracache.shared.endpoints import default_socket_path, endpoint

CACHE_SIZE_ENV = "LORACACHE_CACHE_SIZE"
DEFAULT_CACHE_SIZE = 10  # unleased entries kept per device (onediffx's cache-size default)
DEFAULT_MAX_BYTES = "25%"
DEFAULT_SESSION_TTL = 30.0
DEFAULT_ACQUIRE_TIMEOUT = 30.0
DEFAULT_SHM_ROOT = Path("/dev/shm")

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


class ConfigError(ValueError):
    """A setting has a value the daemon cannot run with; the message names it."""


@dataclasses.dataclass(frozen=True)
class SizeSpec:
    """A budget: an absolute byte count, or a percentage of the device's memory."""

    nbytes: int | None = None
    percent: float | None = None

    def resolve(self, total: int) -> int:
        return self.nbytes if self.nbytes is not None else int(total * self.percent / 100)

    def __str__(self) -> str:
        return f"{self.percent:g}%" if self.percent is not None else str(self.nbytes)


def parse_size(text: str | int, setting: str = "max_bytes") -> SizeSpec:
    """Parse ``1073741824``, ``8GiB``, ``512 MB`` or ``25%``."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise ConfigError(f"{setting} must be positive, got {text}")
        return SizeSpec(nbytes=text)
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z%]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or (unit != "%" and unit not in _UNITS):
        raise ConfigError(f"{setting}={text!r} is not a size: use bytes (1073741824), a unit "
                          "(512MiB, 8GiB, 2GB) or a percentage of device memory (25%)")
    value = float(match.group(1))
    if unit == "%":
        if not 0 < value <= 100:
            raise ConfigError(f"{setting}={text!r}: a percentage must be in (0, 100]")
        return SizeSpec(percent=value)
    nbytes = int(value * _UNITS[unit])
    if nbytes <= 0:
        raise ConfigError(f"{setting}={text!r} must be positive")
    return SizeSpec(nbytes=nbytes)


@dataclasses.dataclass(frozen=True)
class DaemonConfig:
    socket_path: Path
    lora_dirs: tuple[Path, ...]
    devices: tuple[str, ...] = ("all",)  # "cpu", "cuda" (every GPU), "cuda:<index|uuid>", "all"
    max_bytes: SizeSpec = parse_size(DEFAULT_MAX_BYTES)
    cache_size: int = DEFAULT_CACHE_SIZE
    session_ttl: float = DEFAULT_SESSION_TTL
    acquire_timeout: float = DEFAULT_ACQUIRE_TIMEOUT
    shm_root: Path = DEFAULT_SHM_ROOT

    def __post_init__(self) -> None:
        try:
            endpoint(self.socket_path)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if not self.lora_dirs:
            raise ConfigError("lora_dirs is empty: give at least one --lora-dir, the only "
                              "directories the daemon reads LoRA files from")
        for directory in self.lora_dirs:
            if not directory.is_dir():
                raise ConfigError(f"lora_dirs: {directory} is not a directory")
        if self.cache_size < 0:
            raise ConfigError(f"cache_size must be >= 0, got {self.cache_size}")
        if not self.session_ttl > 0:
            raise ConfigError(f"session_ttl must be > 0 seconds, got {self.session_ttl}")
        if not self.acquire_timeout >= 0:
            raise ConfigError(f"acquire_timeout must be >= 0 seconds, got {self.acquire_timeout}")
        if not self.shm_root.is_dir():
            raise ConfigError(f"shm_dir: {self.shm_root} is not a directory")
        for device in self.devices:
            if not re.fullmatch(r"all|cpu|cuda(:[\w-]+)?", device):
                raise ConfigError(f"devices: {device!r} is not one of cpu, cuda, cuda:<index>, "
                                  "cuda:<GPU-uuid>, all")

    @classmethod
    def build(cls, *, socket_path: str | Path | None = None, lora_dirs: list[str] | None = None,
              devices: list[str] | None = None, max_bytes: str | None = None,
              cache_size: int | None = None, session_ttl: float | None = None,
              acquire_timeout: float | None = None, shm_dir: str | None = None) -> "DaemonConfig":
        """Build from flags, falling back to the environment, then to the defaults."""
        if cache_size is None:
            env = os.environ.get(CACHE_SIZE_ENV)
            try:
                cache_size = int(env) if env else DEFAULT_CACHE_SIZE
            except ValueError:
                raise ConfigError(f"{CACHE_SIZE_ENV}={env!r} is not an integer") from None
        return cls(
            socket_path=Path(socket_path) if socket_path else default_socket_path(),
            lora_dirs=tuple(Path(d).resolve() for d in lora_dirs or ()),
            devices=tuple(devices or ("all",)),
            max_bytes=parse_size(max_bytes or DEFAULT_MAX_BYTES),
            cache_size=cache_size,
            session_ttl=DEFAULT_SESSION_TTL if session_ttl is None else session_ttl,
            acquire_timeout=DEFAULT_ACQUIRE_TIMEOUT if acquire_timeout is None else acquire_timeout,
            shm_root=Path(shm_dir) if shm_dir else DEFAULT_SHM_ROOT,
        )
