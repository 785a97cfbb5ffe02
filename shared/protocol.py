"""The wire protocol (v1): every message is a typed msgspec Struct in this module.

A request is one msgpack map ``{"op": "...", "v": 1, "id": n, "session": token, **fields}``:
the request's tag, its envelope (:class:`Request`'s fields) and its own fields.
A reply is ``{"id": n, "ok": true, "result": {...}}`` or
``{"id": n, "ok": false, "error": {"code": "...", "message": "..."}}``; each request type names
the type of its result (``result_type``).

Adding a field means appending it with a default: peers ignore fields they do not know.
Decoding is typed and bounded (msgspec checks every field's type while decoding; sizes are
capped before) because the daemon must answer any malformed message with BAD_REQUEST and carry
on.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, TypeVar, Union

import msgspec

from .errors import BadRequest, ErrorCode, LoraCacheError

PROTOCOL_VERSION = 1

# A request is a path and a few small fields: strings of 8192 characters cover PATH_MAX (4096).
MAX_REQUEST_BYTES = 1 << 20
MAX_TEXT_LEN = 8192
# The largest reply is a tensor table of a big LoRA, or `list` on a cache of 10,000s of entries.
MAX_REPLY_BYTES = 64 << 20

Text = Annotated[str, msgspec.Meta(max_length=MAX_TEXT_LEN)]
MAX_PREFETCH = 1024  # LoRAs one prefetch may name


# ----------------------------------------------------------------------------------- results


class Done(msgspec.Struct, frozen=True):
    """The result of a request that answers nothing but success (release, heartbeat, bye)."""


class HelloResult(msgspec.Struct, frozen=True):
    instance: str  # changes whenever the daemon restarts
    session: str
    session_ttl: float
    devices: list[str]
    version: int = PROTOCOL_VERSION
    torch: str = ""  # the daemon's torch release


class EntryInfo(msgspec.Struct, frozen=True):
    id: str
    path: str
    device: str
    layout: str
    nbytes: int
    leases: int = 0
    pinned: bool = False
    idle_s: float = 0.0
    file: str = ""  # the file's identity (device:inode:size:mtime_ns): same file, same tensors
    tier: str = "device"  # "device" (lent from), "host" (a copy to upload), "disk" (a download)
    source: str = ""  # the URL it came from, for a remote LoRA


class TensorSpec(msgspec.Struct, frozen=True, array_like=True):
    """Where one tensor lives in an entry's packed buffer; on the wire a 4-item array (a big
    LoRA's table has thousands of these)."""

    name: str
    dtype: str  # a safetensors dtype name, e.g. "F16"
    shape: list[int]
    offset: int


class AcquireResult(msgspec.Struct, frozen=True):
    lease: str
    entry: EntryInfo
    handle: dict[str, Any]  # transport-specific; see loracache.shared.transport
    tensors: list[TensorSpec] | None = None  # None when the client said it knows this entry


class LoadTimesInfo(msgspec.Struct, frozen=True):
    """How long a device's loads took: the cumulative histogram (``[le, count]`` pairs,
    ``"+Inf"`` last) and percentiles of the recent ones (None before any load)."""

    count: int
    sum: float
    buckets: list[tuple[float | str, int]]
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None


class DeviceStats(msgspec.Struct, frozen=True, omit_defaults=True):
    """One device's counters in ``stats``: bytes of its budget, entries, leases, traffic.
    The allocator fields are left out for a CPU (what readers before them expect)."""

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
    sessions: int  # sessions holding leases here
    # GPUs only: what torch's allocator in the daemon holds; waiting = of evicted entries
    # that workers still map.
    allocated_bytes: int | None = None
    reserved_bytes: int | None = None
    waiting_bytes: int | None = None
    # Where a load's time goes, by stage: read (the file), convert (to a family layout),
    # upload (into the device's buffer, from the file or a host copy).
    stage_seconds: dict[str, LoadTimesInfo] = {}


class TierStats(msgspec.Struct, frozen=True):
    """A tier behind the devices in ``stats``: ``host`` (copies of evicted entries) or ``disk``
    (downloads of remote LoRAs). ``load_seconds``: downloads, for the disk."""

    tier: str
    budget: int
    used: int
    entries: int
    hits: int
    misses: int
    evictions: int
    load_seconds: LoadTimesInfo | None = None


class StatsResult(msgspec.Struct, frozen=True):
    """The daemon's counters (``stats``), per device in ``devices``."""

    instance: str
    pid: int
    uptime_s: float
    sessions: int
    leases: int
    errors: dict[str, int]  # error replies by code
    metrics: str | None  # where /metrics is served, if it is
    devices: list[DeviceStats]
    tiers: list[TierStats] = []  # host and disk, where the daemon has them

    def device(self, name: str) -> DeviceStats:
        """The counters of the device named ``name`` (``cpu``, ``cuda:GPU-...``)."""
        for device in self.devices:
            if device.device == name:
                return device
        raise KeyError(f"no device {name!r} in these stats: "
                       f"{', '.join(d.device for d in self.devices)}")


class EntriesResult(msgspec.Struct, frozen=True):
    """What ``list`` answers: every cached entry, on devices, in host memory and on disk."""

    entries: list[EntryInfo]


class DropResult(msgspec.Struct, frozen=True, omit_defaults=True):
    """What ``evict`` and ``clear`` answer: entries evicted, matching ones still leased, and
    host copies dropped."""

    evicted: int
    busy: int
    copies: int = 0


# ---------------------------------------------------------------------------------- requests


class Request(msgspec.Struct, frozen=True, kw_only=True, tag_field="op"):
    """Base of all requests: the envelope every request carries. ``op`` (the tag) names the
    message on the wire; ``result_type`` is what the daemon answers it with."""

    v: int = PROTOCOL_VERSION
    id: Annotated[int, msgspec.Meta(ge=0)] = 0
    session: Text = ""

    op: ClassVar[str]
    result_type: ClassVar[type[msgspec.Struct]] = Done


class Hello(Request, frozen=True, kw_only=True, tag="hello"):
    """Opens a session. ``pid`` lets the daemon tell a dead client from a slow one.
    ``open_session=False``: a tool that only looks or administers (the CLI) gets no session,
    so it does not count in the daemon's sessions."""

    result_type = HelloResult
    pid: int = 0
    client: Text = ""
    open_session: bool = True
    torch: Text = ""  # the client's torch release: CUDA IPC handles differ between some


class Acquire(Request, frozen=True, kw_only=True, tag="acquire"):
    """Lease the entry for ``path`` on ``device`` in ``layout``, loading it on a miss.

    ``known_entry`` is the entry id the client already holds a tensor table for; when the
    daemon resolves the same entry it leaves the table out of the reply.
    """

    result_type = AcquireResult
    path: Text
    device: Text = "cpu"
    layout: Text = "raw"
    known_entry: Text = ""


class Release(Request, frozen=True, kw_only=True, tag="release"):
    """Give a lease back. ``opened=False``: the client could not map the handle, so the daemon
    undoes the export for it (a CUDA IPC counter slot nobody else will release)."""

    lease: Text
    opened: bool = True


class Heartbeat(Request, frozen=True, kw_only=True, tag="heartbeat"):
    """Keeps the session alive while the client is idle."""


class Bye(Request, frozen=True, kw_only=True, tag="bye"):
    """Ends the session at once, releasing its leases (instead of waiting for the TTL)."""


class Stats(Request, frozen=True, kw_only=True, tag="stats"):
    result_type = StatsResult


class ListEntries(Request, frozen=True, kw_only=True, tag="list"):
    """The entries on the devices; with ``tiers``, host copies and downloads too."""

    result_type = EntriesResult
    tiers: bool = False


class Preload(Request, frozen=True, kw_only=True, tag="preload"):
    """Load an entry without leasing it; ``pin`` keeps it out of eviction until evicted."""

    result_type = EntryInfo
    path: Text
    device: Text = "cpu"
    layout: Text = "raw"
    pin: bool = False


class Prefetch(Request, frozen=True, kw_only=True, tag="prefetch"):
    """Warm the tiers for ``paths`` down to the device, in the background: the reply comes
    once they are checked (allowed, known device), before anything is fetched or loaded."""

    result_type = Done
    paths: Annotated[list[Text], msgspec.Meta(max_length=MAX_PREFETCH)]
    device: Text = "cpu"
    layout: Text = "raw"


class Evict(Request, frozen=True, kw_only=True, tag="evict"):
    """Evict the unleased entries of ``path`` (every layout and device unless narrowed)."""

    result_type = DropResult
    path: Text
    device: Text = ""


class Clear(Request, frozen=True, kw_only=True, tag="clear"):
    """Evict every unleased entry, pinned ones included (of one device, or all)."""

    result_type = DropResult
    device: Text = ""


class Probe(Request, frozen=True, kw_only=True, tag="probe"):
    """Lease a small test buffer on ``device`` that holds :func:`probe_pattern` (``loracache
    doctor``): proves this client can map the daemon's memory there, with no LoRA file."""

    result_type = AcquireResult
    device: Text = "cpu"


def _request_types(*classes: type[Request]) -> dict[str, type[Request]]:
    for cls in classes:
        cls.op = cls.__struct_config__.tag  # type: ignore[assignment]
    return {cls.op: cls for cls in classes}


REQUEST_TYPES = _request_types(Hello, Acquire, Release, Heartbeat, Bye, Stats, ListEntries,
                               Preload, Prefetch, Evict, Clear, Probe)


# --------------------------------------------------------------------------------- encoding

_encoder = msgspec.msgpack.Encoder()
_request_decoder: msgspec.msgpack.Decoder[Request] = msgspec.msgpack.Decoder(
    Union[tuple(REQUEST_TYPES.values())])


class _Envelope(msgspec.Struct):
    """What every request must have, read first: the id (so that even a refusal can be matched
    to its request), the version (another version's fields may well differ) and the op."""

    id: Annotated[int, msgspec.Meta(ge=0)]
    v: Any = None
    op: Any = None


class _Reply(msgspec.Struct):
    """A reply, its result still undecoded: the id decides whether it is the one awaited."""

    id: int
    ok: bool = False
    result: msgspec.Raw = msgspec.Raw()
    error: Any = None


_envelope_decoder = msgspec.msgpack.Decoder(_Envelope)
_reply_decoder = msgspec.msgpack.Decoder(_Reply)
_result_decoders: dict[type, msgspec.msgpack.Decoder[Any]] = {}

_R = TypeVar("_R")
# RecursionError: msgspec's guard against a message nested too deep even to skip.
_DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, RecursionError)


def encode_request(request_id: int, session: str, request: Request) -> bytes:
    return _encoder.encode(msgspec.structs.replace(request, id=request_id, session=session))


def decode_request(data: bytes) -> Request:
    """Decode and validate one request, or raise :class:`BadRequest` (BAD_REQUEST or
    VERSION_MISMATCH), which carries the request's id when it could be read, so the reply can
    still be matched by the client."""
    if len(data) > MAX_REQUEST_BYTES:
        raise _bad(f"message of {len(data)} bytes exceeds the limit of {MAX_REQUEST_BYTES}")
    try:
        envelope = _envelope_decoder.decode(data)
    except _DECODE_ERRORS as exc:
        raise _bad(f"not a valid request: {_cut(exc)}") from None
    if type(envelope.v) is not int or envelope.v != PROTOCOL_VERSION:
        raise BadRequest(
            ErrorCode.VERSION_MISMATCH,
            f"this daemon speaks protocol v{PROTOCOL_VERSION}, the request says "
            f"v{_brief(envelope.v)}; install matching loracache versions on the daemon and the "
            "workers", envelope.id)
    try:
        return _request_decoder.decode(data)
    except _DECODE_ERRORS as exc:
        op = envelope.op
        if not isinstance(op, str) or op not in REQUEST_TYPES:
            raise BadRequest(ErrorCode.BAD_REQUEST, f"unknown op {_brief(op)}; known ops: "
                             f"{', '.join(sorted(REQUEST_TYPES))}", envelope.id) from None
        raise BadRequest(ErrorCode.BAD_REQUEST, f"malformed {op!r} request: {_cut(exc)}",
                         envelope.id) from None


def encode_reply(request_id: int, result: msgspec.Struct | dict[str, Any]) -> bytes:
    return _encoder.encode({"id": request_id, "ok": True, "result": result})


def encode_error(request_id: int, error: LoraCacheError) -> bytes:
    return _encoder.encode({"id": request_id, "ok": False,
                            "error": {"code": error.code.value, "message": error.message}})


def decode_reply(data: bytes) -> tuple[int, msgspec.Raw | LoraCacheError]:
    """Return ``(id, result)``: the result still encoded (:func:`decode_result` reads it once
    the id matches), or an error reply as a LoraCacheError *value*."""
    if len(data) > MAX_REPLY_BYTES:
        raise _bad(f"reply of {len(data)} bytes exceeds the limit of {MAX_REPLY_BYTES}")
    try:
        reply = _reply_decoder.decode(data)
    except _DECODE_ERRORS as exc:
        raise _bad(f"malformed reply from the daemon: {_cut(exc)}") from None
    if reply.ok:
        return reply.id, reply.result
    error = reply.error if isinstance(reply.error, dict) else {
        "message": f"malformed error reply from the daemon: {_brief(reply.error)}"}
    code, message = error.get("code"), error.get("message", "")
    if not isinstance(code, str) or code not in ErrorCode.__members__:
        code = ErrorCode.INTERNAL
    return reply.id, LoraCacheError(code, message if isinstance(message, str)
                                    else _brief(message))


def decode_result(raw: msgspec.Raw, result_type: type[_R]) -> _R:
    """The result of a reply, typed and checked: BAD_REQUEST when it is not a ``result_type``."""
    decoder = _result_decoders.get(result_type)
    if decoder is None:
        decoder = _result_decoders[result_type] = msgspec.msgpack.Decoder(result_type)
    try:
        return decoder.decode(raw)
    except _DECODE_ERRORS as exc:
        raise _bad(f"malformed {result_type.__name__} from the daemon: {_cut(exc)}") from None


def _brief(value: Any) -> str:
    """A scalar's repr, cut short, or a container's type: a repr of whatever nesting a peer
    sent could recurse as deep as decoding did, and overflow the stack."""
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return f"{value!r:.40}"
    return type(value).__name__


def _cut(exc: Exception) -> str:
    """msgspec's message, cut short: it may quote a value the peer sent, of up to 1 MiB."""
    return f"{exc!s:.200}"


def _bad(message: str) -> BadRequest:
    return BadRequest(ErrorCode.BAD_REQUEST, message)
