"""The wire protocol (v1): every message is a typed class in this module.

A request is one msgpack map ``{"v": 1, "id": n, "op": "...", "session": token, **fields}``.
A reply is ``{"id": n, "ok": true, "result": {...}}`` or
``{"id": n, "ok": false, "error": {"code": "...", "message": "..."}}``.

Adding a field means appending it with a default: old peers ignore fields they do not know.
Decoding is strict about what it accepts (sizes, nesting, types) because the daemon must answer
any malformed message with BAD_REQUEST and carry on.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, ClassVar, Union

import msgpack

from .errors import BadRequest, ErrorCode, LoraCacheError

PROTOCOL_VERSION = 1



@dataclasses.dataclass(frozen=True)
class UnpackLimits:
    """Bounds applied while unpacking, before any field is looked at."""

    max_bytes: int
    max_str_len: int
    max_container_len: int
    max_depth: int


# A request is a path and a few small fields: 8 KiB strings cover PATH_MAX (4096).
REQUEST_LIMITS = UnpackLimits(max_bytes=1 << 20, max_str_len=8192, max_container_len=1 << 16,
                              max_depth=8)
# The largest reply is a tensor table of a big LoRA, or `list` on a cache of 10,000s of entries.
REPLY_LIMITS = UnpackLimits(max_bytes=64 << 20, max_str_len=1 << 20, max_container_len=1 << 22,
                            max_depth=16)


# ---------------------------------------------------------------------------------- requests


@dataclasses.dataclass(frozen=True)
class Request:
    """Base of all requests; ``op`` names the message on the wire."""

    op: ClassVar[str] = ""


@dataclasses.dataclass(frozen=True)
class Hello(Request):
    """Opens a session. ``pid`` lets the daemon tell a dead client from a slow one.
    ``open_session=False``: a tool that only looks or administers (the CLI) gets no session,
    so it does not count in the daemon's sessions."""

    op: ClassVar[str] = "hello"
    pid: int = 0
    client: str = ""
    open_session: bool = True
    torch: str = ""  # the client's torch release: CUDA IPC handles differ between some


@dataclasses.dataclass(frozen=True)
class Acquire(Request):
    """Lease the entry for ``path`` on ``device`` in ``layout``, loading it on a miss.

    ``known_entry`` is the entry id the client already holds a tensor table for; when the
    daemon resolves the same entry it leaves the table out of the reply.
    """

    op: ClassVar[str] = "acquire"
    path: str
    device: str = "cpu"
    layout: str = "raw"
    known_entry: str = ""


@dataclasses.dataclass(frozen=True)
class Release(Request):
    """Give a lease back. ``opened=False``: the client could not map the handle, so the daemon
    undoes the export for it (a CUDA IPC counter slot nobody else will release)."""

    op: ClassVar[str] = "release"
    lease: str
    opened: bool = True


@dataclasses.dataclass(frozen=True)
class Heartbeat(Request):
    op: ClassVar[str] = "heartbeat"


@dataclasses.dataclass(frozen=True)
class Bye(Request):
    """Ends the session at once, releasing its leases (instead of waiting for the TTL)."""

    op: ClassVar[str] = "bye"


@dataclasses.dataclass(frozen=True)
class Stats(Request):
    op: ClassVar[str] = "stats"


@dataclasses.dataclass(frozen=True)
class ListEntries(Request):
    op: ClassVar[str] = "list"


@dataclasses.dataclass(frozen=True)
class Preload(Request):
    """Load an entry without leasing it; ``pin`` keeps it out of eviction until evicted."""

    op: ClassVar[str] = "preload"
    path: str
    device: str = "cpu"
    layout: str = "raw"
    pin: bool = False


@dataclasses.dataclass(frozen=True)
class Evict(Request):
    """Evict the unleased entries of ``path`` (every layout and device unless narrowed)."""

    op: ClassVar[str] = "evict"
    path: str
    device: str = ""


@dataclasses.dataclass(frozen=True)
class Clear(Request):
    """Evict every unleased entry, pinned ones included (of one device, or all)."""

    op: ClassVar[str] = "clear"
    device: str = ""


@dataclasses.dataclass(frozen=True)
class Probe(Request):
    """Lease a small test buffer on ``device`` that holds :func:`probe_pattern` (``loracache
    doctor``): proves this client can map the daemon's memory there, with no LoRA file."""

    op: ClassVar[str] = "probe"
    device: str = "cpu"


REQUEST_TYPES: dict[str, type[Request]] = {
    cls.op: cls
    for cls in (Hello, Acquire, Release, Heartbeat, Bye, Stats, ListEntries, Preload, Evict,
                Clear, Probe)
}


@dataclasses.dataclass(frozen=True)
class RequestFrame:
    """A decoded request with its envelope."""

    id: int
    session: str
    request: Request


# ----------------------------------------------------------------------------------- results


@dataclasses.dataclass(frozen=True)
class HelloResult:
    instance: str  # changes whenever the daemon restarts
    session: str
    session_ttl: float
    devices: list[str]
    version: int = PROTOCOL_VERSION
    torch: str = ""  # the daemon's torch release


@dataclasses.dataclass(frozen=True)
class EntryInfo:
    id: str
    path: str
    device: str
    layout: str
    nbytes: int
    leases: int = 0
    pinned: bool = False
    idle_s: float = 0.0
    file: str = ""  # the file's identity (device:inode:size:mtime_ns): same file, same tensors


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """Where one tensor lives in an entry's packed buffer."""

    name: str
    dtype: str  # a safetensors dtype name, e.g. "F16"
    shape: list[int]
    offset: int

    def to_wire(self) -> list[Any]:
        return [self.name, self.dtype, self.shape, self.offset]

    @classmethod
    def from_wire(cls, item: Any) -> "TensorSpec":
        # Checked by hand: a big LoRA's table has thousands of these, and this is on the path
        # of the first acquire of every entry in every process.
        try:
            name, dtype, shape, offset = item
            valid = (isinstance(name, str) and isinstance(dtype, str) and type(offset) is int
                     and isinstance(shape, list) and all(type(d) is int for d in shape))
        except (TypeError, ValueError):
            valid = False
        if not valid:
            raise _bad(f"malformed tensor spec {item!r:.80}")
        return cls(name=name, dtype=dtype, shape=shape, offset=offset)


@dataclasses.dataclass(frozen=True)
class AcquireResult:
    lease: str
    entry: EntryInfo
    handle: dict[str, Any]  # transport-specific; see loracache.shared.transport
    tensors: list[TensorSpec] | None  # None when the client said it knows this entry

    def to_wire(self) -> dict[str, Any]:
        return {
            "lease": self.lease,
            "entry": dict(vars(self.entry)),  # flat: cheaper than dataclasses.asdict on a hit
            "handle": self.handle,
            "tensors": None if self.tensors is None else [t.to_wire() for t in self.tensors],
        }

    @classmethod
    def from_wire(cls, m: dict[str, Any]) -> "AcquireResult":
        tensors = m.get("tensors")
        return cls(
            lease=m["lease"],
            entry=from_map(EntryInfo, m["entry"]),
            handle=m["handle"],
            tensors=None if tensors is None else [TensorSpec.from_wire(t) for t in tensors],
        )


@dataclasses.dataclass(frozen=True)
class LoadTimesInfo:
    """How long a device's loads took: the cumulative histogram (``[le, count]`` pairs,
    ``"+Inf"`` last) and percentiles of the recent ones (None before any load)."""

    count: int
    sum: float
    buckets: list[list[Any]]
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None


@dataclasses.dataclass(frozen=True)
class DeviceStats:
    """One device's counters in ``stats``: bytes of its budget, entries, leases, traffic."""

    device: str
    budget: int
    used: int  # bytes of cached entries
    reserved: int  # bytes of loads (and probes) in flight
    leased_bytes: int
    pinned_bytes: int
    entries: int
    leases: int
    cache_size: int  # idle entries kept
    hits: int
    misses: int
    loads: int
    evictions: int
    hit_rate: float | None
    load_seconds: LoadTimesInfo
    sessions: int = 0  # sessions holding leases here
    # GPUs only: what torch's allocator in the daemon holds; waiting = of evicted entries
    # that workers still map.
    allocated_bytes: int | None = None
    reserved_bytes: int | None = None
    waiting_bytes: int | None = None

    @classmethod
    def from_wire(cls, m: Any) -> "DeviceStats":
        if not isinstance(m, dict):
            raise _bad("device stats must be a map")
        return from_map(cls, {**m, "load_seconds": from_map(LoadTimesInfo,
                                                             m.get("load_seconds"))})


@dataclasses.dataclass(frozen=True)
class StatsResult:
    """The daemon's counters (``stats``), per device in ``devices``."""

    instance: str
    pid: int
    uptime_s: float
    sessions: int
    leases: int
    errors: dict[str, int]  # error replies by code
    metrics: str | None  # where /metrics is served, if it is
    devices: list[DeviceStats]

    def device(self, name: str) -> DeviceStats:
        """The counters of the device named ``name`` (``cpu``, ``cuda:GPU-...``)."""
        return next(d for d in self.devices if d.device == name)

    @classmethod
    def from_wire(cls, m: Any) -> "StatsResult":
        if not isinstance(m, dict) or not isinstance(m.get("devices"), list):
            raise _bad("stats must be a map with a list of devices")
        return from_map(cls, {**m, "devices": [DeviceStats.from_wire(d) for d in m["devices"]]})


@dataclasses.dataclass(frozen=True)
class EntriesResult:
    """What ``list`` answers: every cached entry."""

    entries: list[EntryInfo]

    @classmethod
    def from_wire(cls, m: Any) -> "EntriesResult":
        if not isinstance(m, dict) or not isinstance(m.get("entries"), list):
            raise _bad("list must answer a map with a list of entries")
        return cls(entries=[from_map(EntryInfo, e) for e in m["entries"]])


@dataclasses.dataclass(frozen=True)
class DropResult:
    """What ``evict`` and ``clear`` answer: entries evicted, and matching ones still leased."""

    evicted: int
    busy: int


# --------------------------------------------------------------------------------- encoding


def encode_request(request_id: int, session: str, request: Request) -> bytes:
    body = {"v": PROTOCOL_VERSION, "id": request_id, "op": request.op, "session": session}
    body.update(vars(request))  # requests are flat: cheaper than dataclasses.asdict
    return msgpack.packb(body, use_bin_type=True)


def decode_request(data: bytes) -> RequestFrame:
    """Decode and validate one request, or raise :class:`BadRequest` (BAD_REQUEST or
    VERSION_MISMATCH), which carries the request's id when the envelope got that far, so the
    reply can still be matched by the client."""
    body = _unpack(data, REQUEST_LIMITS)
    if not isinstance(body, dict):
        raise _bad("a request must be a msgpack map")
    request_id = body.get("id")
    if not isinstance(request_id, int) or isinstance(request_id, bool) or request_id < 0:
        raise _bad("field 'id' must be a non-negative integer")
    try:
        version = body.get("v")
        if type(version) is not int or version != PROTOCOL_VERSION:
            raise BadRequest(
                ErrorCode.VERSION_MISMATCH,
                f"this daemon speaks protocol v{PROTOCOL_VERSION}, the request says v{version!r}; "
                "install matching loracache versions on the daemon and the workers",
            )
        op = body.get("op")
        cls = REQUEST_TYPES.get(op) if isinstance(op, str) else None
        if cls is None:
            raise _bad(f"unknown op {op!r:.40}; known ops: {', '.join(sorted(REQUEST_TYPES))}")
        session = body.get("session", "")
        if not isinstance(session, str):
            raise _bad("field 'session' must be a string")
        return RequestFrame(id=request_id, session=session, request=from_map(cls, body))
    except LoraCacheError as exc:
        raise BadRequest(exc.code, exc.message, request_id) from None


def encode_reply(request_id: int, result: Any) -> bytes:
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        result = result.to_wire() if hasattr(result, "to_wire") else dataclasses.asdict(result)
    return msgpack.packb({"id": request_id, "ok": True, "result": result}, use_bin_type=True)


def encode_error(request_id: int, error: LoraCacheError) -> bytes:
    body = {"id": request_id, "ok": False,
            "error": {"code": error.code.value, "message": error.message}}
    return msgpack.packb(body, use_bin_type=True)


def decode_reply(data: bytes) -> tuple[int, Any]:
    """Return ``(id, result)``; an error reply comes back as a LoraCacheError *value*."""
    body = _unpack(data, REPLY_LIMITS)
    if not isinstance(body, dict) or not isinstance(body.get("id"), int):
        raise _bad("malformed reply from the daemon")
    if body.get("ok"):
        return body["id"], body.get("result")
    error = body.get("error")
    if not isinstance(error, dict):
        error = {"message": f"malformed error reply from the daemon: {error!r:.80}"}
    code = error.get("code")
    if not isinstance(code, str) or code not in ErrorCode.__members__:
        code = ErrorCode.INTERNAL
    return body["id"], LoraCacheError(code, str(error.get("message", "")))


# --------------------------------------------------------------------------------- validation


def _unpack(data: bytes, limits: UnpackLimits) -> Any:
    if len(data) > limits.max_bytes:
        raise _bad(f"message of {len(data)} bytes exceeds the limit of {limits.max_bytes}")
    try:
        body = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_str_len=limits.max_str_len,
            max_bin_len=limits.max_bytes,
            max_array_len=limits.max_container_len,
            max_map_len=limits.max_container_len,
            max_ext_len=0,
            ext_hook=_refuse_ext,
        )
    except msgpack.StackError as exc:  # msgpack's own 1024-level guard, which says nothing
        raise _bad(f"not a valid msgpack message: nested deeper than {limits.max_depth} "
                   "levels") from exc
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError,
            UnicodeDecodeError) as exc:
        raise _bad(f"not a valid msgpack message: {exc}") from exc
    _check_depth(body, limits.max_depth)
    return body


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} is not part of the protocol")


def _check_depth(obj: Any, limit: int) -> None:
    stack = [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                raise _bad(f"message nested deeper than {limit} levels")
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)


_T = typing.TypeVar("_T")


def from_map(cls: type[_T], body: Any) -> _T:
    """Build dataclass ``cls`` from a decoded map, checking every declared field's type."""
    if not isinstance(body, dict):
        raise _bad(f"{cls.__name__} must be a map")
    op = getattr(cls, "op", cls.__name__)
    kwargs = {}
    for field, hint in _field_hints(cls).items():
        if field in body:
            value = body[field]
            if not _matches(value, hint):
                raise _bad(f"field {field!r} of {op!r} must be {_describe(hint)}, "
                           f"not {type(value).__name__}")
            kwargs[field] = value
        elif _is_required(cls, field):
            raise _bad(f"field {field!r} is required for {op!r}")
    return cls(**kwargs)


_HINTS: dict[type, dict[str, Any]] = {}


def _field_hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        hints = typing.get_type_hints(cls)
        _HINTS[cls] = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    return _HINTS[cls]


def _is_required(cls: type, name: str) -> bool:
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    return (field.default is dataclasses.MISSING
            and field.default_factory is dataclasses.MISSING)


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_matches(value, arm) for arm in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if hint is Any:
        return True
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint))


def _bad(message: str) -> BadRequest:
    return BadRequest(ErrorCode.BAD_REQUEST, message)
