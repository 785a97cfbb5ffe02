"""The daemon's configuration: defaults < TOML file < ``LORACACHE_*`` environment < flags.

:func:`load_config` validates every value once and returns a frozen :class:`DaemonConfig`
that remembers where each value came from (``serve --print-config`` shows it). A bad value
raises :class:`ConfigError` naming the key, the value, its source and what is allowed; only the
CLI turns that into an exit.
"""

from __future__ import annotations

import dataclasses
import grp
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping

from loracache.shared import device_names
from loracache.shared.device_names import same_device
from loracache.shared.families import RAW, parse_layout
from loracache.shared.endpoints import (config_file_path, endpoint, fallback_socket_path,
                                        read_config_file)

from .sources import RemoteSource, SourceSettings, parse_prefix, parse_source_settings

ENV_PREFIX = "LORACACHE_"
LOG_LEVELS = ("debug", "info", "warning", "error")

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
        if self.nbytes is not None:
            return self.nbytes
        assert self.percent is not None, "a size is bytes or a percentage"
        return int(total * self.percent / 100)

    def __str__(self) -> str:
        return f"{self.percent:g}%" if self.percent is not None else str(self.nbytes)


def parse_size(value: str | int) -> SizeSpec:
    """Parse ``1073741824``, ``"8GiB"``, ``"512 MB"`` or ``"25%"``."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ConfigError("must be positive")
        return SizeSpec(nbytes=value)
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z%]*)\s*", str(value))
    unit = match.group(2).lower() if match else None
    if match is None or (unit != "%" and unit not in _UNITS):
        raise ConfigError("not a size: use bytes (1073741824), a unit (512MiB, 8GiB, 2GB) or a "
                          "percentage of the device's memory (25%)")
    number = float(match.group(1))
    if unit == "%":
        if not 0 < number <= 100:
            raise ConfigError("a percentage must be in (0, 100]")
        return SizeSpec(percent=number)
    if int(number * _UNITS[unit]) <= 0:
        raise ConfigError("must be positive")
    return SizeSpec(nbytes=int(number * _UNITS[unit]))


@dataclasses.dataclass(frozen=True)
class DeviceOverride:
    """Settings of one device that differ from the daemon-wide ones."""

    max_bytes: SizeSpec | None = None
    cache_size: int | None = None


@dataclasses.dataclass(frozen=True)
class PreloadSpec:
    """A LoRA loaded at start and after each reload."""

    path: str
    device: str = "cpu"
    layout: str = RAW
    pin: bool = False


@dataclasses.dataclass(frozen=True)
class DaemonConfig:
    socket: Path
    lora_dirs: tuple[Path, ...]
    devices: tuple[str, ...]  # "cpu", "cuda" (every GPU), "cuda:<index|uuid>", "all"
    max_bytes: SizeSpec
    cache_size: int
    session_ttl: float
    acquire_timeout: float
    shm_dir: Path
    log_level: str
    metrics_addr: tuple[str, int] | None
    session_max_leases: int
    session_max_bytes: SizeSpec | None  # per device; None: only the budget limits a session
    admin_socket: Path | None  # when set, evict, clear and pinned preloads are served only there
    admin_group: str | None  # the group owning the admin socket
    device: Mapping[str, DeviceOverride]  # by device name: "cpu" or "cuda:GPU-<uuid>"
    preload: tuple[PreloadSpec, ...]
    allow_sources: tuple[RemoteSource, ...]  # URL prefixes the daemon may fetch LoRAs from
    host_max_bytes: SizeSpec  # of host memory, for copies of entries evicted from devices
    cache_dir: Path | None  # where remote LoRAs are downloaded to (the disk tier)
    cache_max_bytes: SizeSpec  # of cache_dir's file system
    cache_min_free_bytes: SizeSpec  # of cache_dir's file system, left free by downloads
    source_revalidate_s: float  # how long a downloaded file is served before asking its source
    source_timeout_s: float  # how long a source may send nothing before its fetch fails
    source: Mapping[str, SourceSettings]  # by "scheme://authority": how to reach it
    file: Path | None = None  # the configuration file read, if any
    sources: Mapping[str, str] = dataclasses.field(default_factory=dict, compare=False)

    def budget(self, device: str, total_memory: int) -> int:
        override = self.override(device)
        spec = override.max_bytes if override and override.max_bytes else self.max_bytes
        return spec.resolve(total_memory)

    def cache_size_for(self, device: str) -> int:
        override = self.override(device)
        if override is not None and override.cache_size is not None:
            return override.cache_size
        return self.cache_size

    def override(self, device: str) -> DeviceOverride | None:
        """The ``[device."..."]`` table of ``device``, however its UUID's prefix is spelled."""
        return self.device.get(device) or next(
            (o for name, o in self.device.items() if same_device(name, device)), None)


# ------------------------------------------------------------------------------- value parsers
# Each takes a value as TOML gives it or as a string (environment, flags) and returns the typed
# value, or raises ConfigError saying what is allowed; load_config adds key, value and source.

def _path(value: Any) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError("must be a non-empty path string")
    return Path(value)


def _socket(value: Any) -> Path:
    path = _path(value)
    try:
        endpoint(path)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return path


def _size_or_off(value: Any) -> SizeSpec:
    """A size, or 0 for "off"."""
    if value in (0, "0"):
        return SizeSpec(nbytes=0)
    return parse_size(value)


def _optional(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``parse``, with an empty string meaning "not set"."""
    return lambda value: None if value == "" else parse(value)


def _group(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError("must be a group name")
    try:
        grp.getgrnam(value)
    except KeyError:
        raise ConfigError(f"there is no group {value!r} on this host (see getent group)") from None
    return value


def _directory(value: Any) -> Path:
    path = _path(value)
    if not path.is_dir():
        raise ConfigError(f"{path} is not a directory")
    return path.resolve()


def _strings(value: Any, separator: str) -> list[str]:
    if isinstance(value, str):
        value = [part for part in value.split(separator) if part]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConfigError("must be a list of strings")
    return list(value)


def _lora_dirs(value: Any) -> tuple[Path, ...]:
    dirs = _strings(value, os.pathsep)
    if not dirs:
        raise ConfigError("give at least one directory: the only places LoRA files are read from")
    return tuple(_directory(d) for d in dirs)


def _allow_sources(value: Any) -> tuple[RemoteSource, ...]:
    prefixes = []
    for text in _strings(value, ","):
        try:
            prefixes.append(parse_prefix(text))
        except ValueError as exc:
            raise ConfigError(f"{text!r}: {exc}") from None
    return tuple(prefixes)


def _devices(value: Any) -> tuple[str, ...]:
    devices = _strings(value, ",")
    bad = [d for d in devices if not device_names.is_selector(d)]
    if bad or not devices:
        raise ConfigError(f"{bad[0] if bad else 'nothing'!r} is not a device: use cpu, cuda, "
                          "cuda:<index>, cuda:<GPU-uuid> or all")
    return tuple(devices)


def _count(value: Any) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError("must be a whole number >= 0")
    return value


def _positive_count(value: Any) -> int:
    count = _count(value)
    if count == 0:
        raise ConfigError("must be a whole number >= 1")
    return count


def _number(value: Any) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigError("must be a number of seconds") from None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
        raise ConfigError("must be a number of seconds")
    return float(value)


def _positive_seconds(value: Any) -> float:
    seconds = _number(value)
    if seconds <= 0:
        raise ConfigError("must be > 0 seconds")
    return seconds


def _seconds(value: Any) -> float:
    seconds = _number(value)
    if seconds < 0:
        raise ConfigError("must be >= 0 seconds")
    return seconds


def _log_level(value: Any) -> str:
    if not isinstance(value, str) or value.lower() not in LOG_LEVELS:
        raise ConfigError(f"must be one of {', '.join(LOG_LEVELS)}")
    return value.lower()


def _metrics_addr(value: Any) -> tuple[str, int] | None:
    if not isinstance(value, str):
        raise ConfigError('must be "HOST:PORT" (or "" for off)')
    if not value:
        return None
    match = re.fullmatch(r"\[?([^\[\]]*?)\]?:(\d{1,5})", value)
    if match is None or int(match.group(2)) > 65535:
        raise ConfigError('must be "HOST:PORT" with a port of 0-65535, e.g. "127.0.0.1:9464"')
    return match.group(1) or "0.0.0.0", int(match.group(2))


def _device_name(name: str) -> str:
    """A ``[device."..."]`` key as a device name: ``cpu``, or a UUID with or without cuda:."""
    canonical = name if name == "cpu" else f"cuda:{name.removeprefix('cuda:')}"
    if not device_names.is_name(canonical):
        raise ConfigError(f"[device.{json.dumps(name)}]: a device is named \"cpu\" or by its GPU "
                          "UUID as nvidia-smi -L prints it (GPU-..., or MIG-...)")
    return canonical


def _device_overrides(value: Any) -> dict[str, DeviceOverride]:
    if not isinstance(value, dict):
        raise ConfigError('must be tables like [device."GPU-<uuid>"] with max_bytes, cache_size')
    overrides = {}
    for name, table in value.items():
        _only_keys(table, ("max_bytes", "cache_size"), f"[device.{json.dumps(name)}]")
        overrides[_device_name(name)] = DeviceOverride(
            max_bytes=_field(table, "max_bytes", parse_size, name),
            cache_size=_field(table, "cache_size", _count, name))
    return overrides


def _preloads(value: Any) -> tuple[PreloadSpec, ...]:
    if not isinstance(value, list):
        raise ConfigError("must be [[preload]] tables with path, device, layout, pin")
    specs = []
    for number, table in enumerate(value, 1):
        where = f"[[preload]] #{number}"
        _only_keys(table, ("path", "device", "layout", "pin"), where)
        if not isinstance(table.get("path"), str) or not table["path"]:
            raise ConfigError(f"{where}: path must be a file under a lora_dir, or a URL under "
                              "allow_sources")
        device = table.get("device", "cpu")
        if not isinstance(device, str) or device == "all" or not device_names.is_selector(device):
            raise ConfigError(f"{where}: device {device!r} is not cpu, cuda or cuda:<index|uuid>")
        try:
            parse_layout(str(table.get("layout", RAW)))
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if not isinstance(table.get("pin", False), bool):
            raise ConfigError(f"{where}: pin must be true or false")
        specs.append(PreloadSpec(**table))
    return tuple(specs)


def _source_settings(value: Any) -> dict[str, SourceSettings]:
    if not isinstance(value, dict):
        raise ConfigError('must be tables like [source."s3://bucket"] or [source."https://host"]')
    settings = {}
    for origin, table in value.items():
        try:
            canonical, parsed = parse_source_settings(origin, table)
        except ValueError as exc:
            raise ConfigError(f"[source.{json.dumps(origin)}]: {exc}") from None
        settings[canonical] = parsed
    return settings


def _only_keys(table: Any, allowed: tuple[str, ...], where: str) -> None:
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table")
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(allowed)}")


def _field(table: dict[str, Any], key: str, parse: Callable[[Any], Any], device: str) -> Any:
    if key not in table:
        return None
    try:
        return parse(table[key])
    except ConfigError as exc:
        raise ConfigError(f"[device.{json.dumps(device)}] {key} = {table[key]!r}: {exc}") from None


# ------------------------------------------------------------------------------------ settings

@dataclasses.dataclass(frozen=True)
class Setting:
    """One key: how to parse it, its default, and whether a reload can change it."""

    name: str
    parse: Callable[[Any], Any]
    default: Callable[[], Any]
    help: str
    reloadable: bool = True
    from_file_only: bool = False  # tables (device, preload) have no environment variable or flag
    show: Callable[[Any], Any] = lambda value: value  # the value as the file would write it

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def flag(self) -> str:
        return FLAGS.get(self.name) or "--" + self.name.replace("_", "-")


# Repeatable flags, named for one of their values.
FLAGS = {"lora_dirs": "--lora-dir", "allow_sources": "--allow-source"}

SETTINGS = (
    Setting("socket", _socket, fallback_socket_path, "Unix socket path", reloadable=False),
    Setting("lora_dirs", _lora_dirs, tuple, "the only directories LoRA files are read from"),
    Setting("devices", _devices, lambda: ("all",), "cpu, cuda, cuda:<index|uuid>, all",
            reloadable=False),
    Setting("max_bytes", parse_size, lambda: SizeSpec(percent=25.0),
            "budget per device: bytes, 8GiB, or 25% of the device's memory"),
    Setting("cache_size", _count, lambda: 10, "idle entries kept per device (0: none)"),
    Setting("session_ttl", _positive_seconds, lambda: 30.0,
            "seconds before a silent client's leases are released"),
    Setting("acquire_timeout", _seconds, lambda: 30.0,
            "seconds an acquire waits for room before CACHE_FULL"),
    Setting("shm_dir", _directory, lambda: Path("/dev/shm"), "tmpfs directory for CPU entries",
            reloadable=False),
    Setting("log_level", _log_level, lambda: "info", "debug, info, warning or error"),
    Setting("metrics_addr", _metrics_addr, lambda: None,
            "HOST:PORT for Prometheus metrics (off when empty)", reloadable=False,
            show=lambda address: address and f"{address[0]}:{address[1]}"),
    Setting("session_max_leases", _positive_count, lambda: 1024,
            "leases one client session may hold at once"),
    Setting("session_max_bytes", _optional(parse_size), lambda: None,
            "bytes one session may hold leased per device: bytes, 4GiB or 10% (empty: no limit)"),
    Setting("admin_socket", _optional(_socket), lambda: None,
            "a second socket for evict, clear and pinned preloads; when set, the main socket "
            "refuses them", reloadable=False),
    Setting("admin_group", _optional(_group), lambda: None,
            "group owning the admin socket (the daemon's user must be a member)",
            reloadable=False),
    Setting("device", _device_overrides, dict, "per-device max_bytes and cache_size",
            from_file_only=True),
    Setting("preload", _preloads, tuple, "LoRAs loaded at start and after each reload",
            from_file_only=True),
    Setting("host_max_bytes", _size_or_off, lambda: SizeSpec(percent=10.0),
            "host memory for copies of entries evicted from devices (the host tier): bytes, "
            "16GiB, 10% of the host's memory, or 0 for none"),
    Setting("allow_sources", _allow_sources, tuple,
            "URL prefixes LoRAs may be fetched from (https://host/path/, s3://bucket/prefix/); "
            "none by default", show=lambda prefixes: [p.url for p in prefixes]),
    Setting("cache_dir", _optional(_directory), lambda: None,
            "directory remote LoRAs are downloaded to (needed with allow_sources)",
            reloadable=False),
    Setting("cache_max_bytes", parse_size, lambda: SizeSpec(percent=25.0),
            "bytes of downloads kept in cache_dir: bytes, 50GiB or 25% of its file system"),
    Setting("cache_min_free_bytes", _size_or_off, lambda: SizeSpec(percent=5.0),
            "free space downloads leave on cache_dir's file system: bytes, 10GiB or 5%"),
    Setting("source_revalidate_s", _seconds, lambda: 300.0,
            "seconds a downloaded LoRA is served before its source is asked whether it changed"),
    Setting("source_timeout_s", _positive_seconds, lambda: 60.0,
            "seconds a source may send nothing (connecting, or mid-file) before the fetch "
            "fails with SOURCE_FAILED"),
    Setting("source", _source_settings, dict,
            "per host or bucket: headers_from_env (https), endpoint, region, profile, "
            "skip_signature (s3)", from_file_only=True),
)
SETTINGS_BY_NAME = {s.name: s for s in SETTINGS}


def load_config(flags: Mapping[str, Any] | None = None, *, config_file: str | None = None,
                environ: Mapping[str, str] | None = None) -> DaemonConfig:
    """Build the configuration from the file, then the environment, then ``flags``.

    ``flags`` maps setting names to the command line's values (None or absent: not given).
    The file is ``config_file``, else ``$LORACACHE_CONFIG``, else /etc/loracache/config.toml
    when it exists.
    """
    flags = flags or {}
    environ = os.environ if environ is None else environ
    path = config_file_path(config_file, environ)
    table: dict[str, Any] = {}
    if path is not None:
        try:
            table = read_config_file(path)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        unknown = sorted(set(table) - set(SETTINGS_BY_NAME))
        if unknown:
            raise ConfigError(f"{path}: unknown key {unknown[0]!r}; the keys are "
                              f"{', '.join(SETTINGS_BY_NAME)}")
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for setting in SETTINGS:
        raw, source = None, "default"
        if setting.name in table:
            raw, source = table[setting.name], f"file {path}"
        if not setting.from_file_only and environ.get(setting.env):
            raw, source = environ[setting.env], f"environment {setting.env}"
        if flags.get(setting.name) not in (None, []):
            raw, source = flags[setting.name], f"flag {setting.flag}"
        if source == "default":
            values[setting.name] = setting.default()
        else:
            try:
                values[setting.name] = setting.parse(raw)
            except ConfigError as exc:
                raise ConfigError(f"{setting.name} = {_show(raw)} (from {source}): {exc}") from None
        sources[setting.name] = source
    if values["admin_socket"] is not None and values["admin_group"] is None:
        raise ConfigError("admin_socket is set but admin_group is not: the admin socket would "
                          "belong to the daemon's group, so every client could evict and clear; "
                          "set admin_group to the operators' group")
    if values["allow_sources"] and values["cache_dir"] is None:
        raise ConfigError("allow_sources is set but cache_dir is not: remote LoRAs are "
                          "downloaded there first; set cache_dir (--cache-dir DIR, or "
                          "CacheDirectory= under systemd)")
    cache_dir = values["cache_dir"]
    for lora_dir in values["lora_dirs"] if cache_dir else ():
        if cache_dir.is_relative_to(lora_dir) or lora_dir.is_relative_to(cache_dir):
            raise ConfigError(f"cache_dir {cache_dir} overlaps lora_dir {lora_dir}: give the "
                              "downloads a directory of their own")
    if not values["lora_dirs"]:
        raise ConfigError("lora_dirs is not set: give --lora-dir DIR, LORACACHE_LORA_DIRS or "
                          "lora_dirs in the configuration file; the daemon reads LoRA files "
                          "only from these directories")
    return DaemonConfig(**values, file=path, sources=sources)


def reloaded(old: DaemonConfig, new: DaemonConfig) -> tuple[DaemonConfig, list[str]]:
    """``new`` with the settings a reload cannot change kept from ``old``, and their names."""
    kept = {s.name: getattr(old, s.name) for s in SETTINGS if not s.reloadable
            and getattr(old, s.name) != getattr(new, s.name)}
    sources = {**new.sources, **{name: old.sources[name] for name in kept}}
    return dataclasses.replace(new, **kept, sources=sources), sorted(kept)


def render_config(config: DaemonConfig) -> str:
    """The effective configuration as TOML, with each value's source as a comment."""
    lines = [f"# configuration file: {config.file or 'none'}"]
    tables: list[str] = []
    for setting in SETTINGS:
        value = getattr(config, setting.name)
        source = config.sources.get(setting.name, "default")
        if setting.name == "device":
            for name, override in value.items():
                tables += ["", f"[device.{json.dumps(name)}]  # {source}"]
                tables += [f"{key} = {_toml(v)}" for key, v in
                           vars(override).items() if v is not None]
        elif setting.name == "source":
            for origin, settings in value.items():
                tables += ["", f"[source.{json.dumps(origin)}]  # {source}"]
                tables += [f"{key} = {_toml(v)}" for key, v in vars(settings).items()
                           if v not in (None, False, {})]
        elif setting.name == "preload":
            for spec in value:
                tables += ["", f"[[preload]]  # {source}"]
                tables += [f"{key} = {_toml(v)}" for key, v in vars(spec).items()]
        else:
            lines.append(f"{setting.name} = {_toml(setting.show(value))}  # {source}")
    return "\n".join(lines + tables) + "\n"


def _toml(value: Any) -> str:
    """A TOML literal for the values a DaemonConfig holds."""
    if value is None:
        return '""'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_toml(k)} = {_toml(v)}" for k, v in value.items()) + " }"
    # Paths, sizes, names. A JSON string is a TOML basic string once DEL is escaped too.
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")


def _show(raw: Any) -> str:
    text = repr(raw)
    return text if len(text) <= 80 else text[:77] + "..."
