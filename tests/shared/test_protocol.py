"""The wire protocol: pinned bytes, round trips, and what decoding refuses."""

from __future__ import annotations

import pickle
from typing import Any

import msgpack
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loracache.shared.errors import BadRequest, ErrorCode, LoraCacheError
from loracache.shared.protocol import (
    MAX_REQUEST_BYTES,
    MAX_TEXT_LEN,
    PROTOCOL_VERSION,
    REQUEST_TYPES,
    Acquire,
    AcquireResult,
    Bye,
    Clear,
    DeviceStats,
    Done,
    DropResult,
    EntriesResult,
    EntryInfo,
    Evict,
    Heartbeat,
    Hello,
    HelloResult,
    ListEntries,
    LoadTimesInfo,
    Prefetch,
    Preload,
    Probe,
    Release,
    Request,
    Stats,
    StatsResult,
    TensorSpec,
    decode_reply,
    decode_request,
    decode_result,
    encode_error,
    encode_reply,
    encode_request,
)


def fixstr(text: str) -> bytes:
    """msgpack fixstr: 0xa0 | length, then the UTF-8 bytes (strings under 32 bytes)."""
    raw = text.encode()
    assert len(raw) < 32
    return bytes([0xA0 | len(raw)]) + raw


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def envelope(op: str = "heartbeat", **fields: Any) -> dict[str, Any]:
    return {"op": op, "v": 1, "id": 42, "session": "tok", **fields}


def names(message: str, field: str) -> bool:
    """Whether an error message points at ``field`` (msgspec says `$.field` or `field`)."""
    return any(form in message for form in (f"$.{field}", f"`{field}`", f"'{field}'"))


def refused(data: bytes, code: ErrorCode = ErrorCode.BAD_REQUEST) -> BadRequest:
    with pytest.raises(LoraCacheError) as info:
        decode_request(data)
    assert isinstance(info.value, BadRequest), info.value
    assert info.value.code is code, info.value
    assert info.value.message
    return info.value


def result_of(reply: bytes, result_type: type) -> Any:
    """A reply's typed result, as the client reads it."""
    _, raw = decode_reply(reply)
    assert isinstance(raw, msgspec.Raw)
    return decode_result(raw, result_type)


def result_refused(body: Any, result_type: type) -> BadRequest:
    with pytest.raises(BadRequest) as info:
        decode_result(msgspec.Raw(pack(body)), result_type)
    assert info.value.code is ErrorCode.BAD_REQUEST
    assert f"malformed {result_type.__name__}" in info.value.message, info.value.message
    return info.value


# ------------------------------------------------------------------------------ golden bytes


def test_acquire_request_bytes_are_pinned() -> None:
    expected = (
        b"\x88"  # fixmap of 8 pairs, in this order: the tag, the envelope, the fields
        + fixstr("op") + fixstr("acquire")
        + fixstr("v") + b"\x01"
        + fixstr("id") + b"\x07"
        + fixstr("session") + fixstr("tok")
        + fixstr("path") + fixstr("a.safetensors")
        + fixstr("device") + fixstr("cpu")
        + fixstr("layout") + fixstr("raw")
        + fixstr("known_entry") + fixstr("")
    )
    assert encode_request(7, "tok", Acquire(path="a.safetensors")) == expected


def test_hello_request_bytes_are_pinned() -> None:
    expected = (
        b"\x88"
        + fixstr("op") + fixstr("hello")
        + fixstr("v") + b"\x01"
        + fixstr("id") + b"\xcd\x01\x00"  # uint16 256
        + fixstr("session") + fixstr("")
        + fixstr("pid") + b"\xcd\x10\x92"  # uint16 4242
        + fixstr("client") + fixstr("w0")
        + fixstr("open_session") + b"\xc3"  # true
        + fixstr("torch") + fixstr("")
    )
    assert encode_request(256, "", Hello(pid=4242, client="w0")) == expected


def test_preload_request_bytes_are_pinned() -> None:
    expected = (
        b"\x88"
        + fixstr("op") + fixstr("preload")
        + fixstr("v") + b"\x01"
        + fixstr("id") + b"\x00"
        + fixstr("session") + fixstr("s")
        + fixstr("path") + fixstr("p")
        + fixstr("device") + fixstr("cpu")
        + fixstr("layout") + fixstr("raw")
        + fixstr("pin") + b"\xc3"  # true
    )
    assert encode_request(0, "s", Preload(path="p", pin=True)) == expected


def test_request_without_fields_is_just_its_envelope() -> None:
    expected = (
        b"\x84"
        + fixstr("op") + fixstr("heartbeat")
        + fixstr("v") + b"\x01"
        + fixstr("id") + b"\xcf" + (2**64 - 1).to_bytes(8, "big")  # uint64
        + fixstr("session") + fixstr("t")
    )
    assert encode_request(2**64 - 1, "t", Heartbeat()) == expected


def test_reply_bytes_are_pinned() -> None:
    expected = (
        b"\x83"
        + fixstr("id") + b"\x03"
        + fixstr("ok") + b"\xc3"
        + fixstr("result") + b"\x81" + fixstr("lease") + fixstr("L1")
    )
    assert encode_reply(3, {"lease": "L1"}) == expected


def test_struct_result_is_sent_as_the_map_of_its_fields() -> None:
    expected = (
        b"\x83"
        + fixstr("id") + b"\x05"
        + fixstr("ok") + b"\xc3"
        + fixstr("result") + b"\x82" + fixstr("evicted") + b"\x02" + fixstr("busy") + b"\x01"
    )
    assert encode_reply(5, DropResult(evicted=2, busy=1)) == expected
    assert encode_reply(5, DropResult(evicted=2, busy=1)) == encode_reply(5, {"evicted": 2,
                                                                               "busy": 1})


def test_done_is_an_empty_map() -> None:
    assert encode_reply(1, Done()) == b"\x83" + fixstr("id") + b"\x01" + fixstr("ok") + b"\xc3" \
        + fixstr("result") + b"\x80"


def test_error_reply_bytes_are_pinned() -> None:
    expected = (
        b"\x83"
        + fixstr("id") + b"\x09"
        + fixstr("ok") + b"\xc2"
        + fixstr("error") + b"\x82"
        + fixstr("code") + fixstr("CACHE_FULL")
        + fixstr("message") + fixstr("full")
    )
    assert encode_error(9, LoraCacheError(ErrorCode.CACHE_FULL, "full")) == expected


def test_tensor_spec_is_a_four_item_array_on_the_wire() -> None:
    """A big LoRA's table has thousands of these: no keys repeated per tensor."""
    spec = TensorSpec("w", "BF16", [3, 5], 512)
    body = msgpack.unpackb(encode_reply(1, _acquire_result([spec])))
    assert body["result"]["tensors"] == [["w", "BF16", [3, 5], 512]]
    assert list(body["result"]) == ["lease", "entry", "handle", "tensors"]


def test_op_names_on_the_wire_are_pinned() -> None:
    assert set(REQUEST_TYPES) == {"hello", "acquire", "release", "heartbeat", "bye", "stats",
                                  "list", "preload", "prefetch", "evict", "clear", "probe"}
    assert all(cls.op == op for op, cls in REQUEST_TYPES.items())
    assert all(issubclass(cls, Request) for cls in REQUEST_TYPES.values())


def test_result_type_of_every_op_is_pinned() -> None:
    """The client decodes each reply with its request's ``result_type``."""
    assert {op: cls.result_type for op, cls in REQUEST_TYPES.items()} == {
        "hello": HelloResult, "acquire": AcquireResult, "release": Done, "heartbeat": Done,
        "bye": Done, "stats": StatsResult, "list": EntriesResult, "preload": EntryInfo,
        "prefetch": Done, "evict": DropResult, "clear": DropResult, "probe": AcquireResult}


def test_error_codes_are_a_closed_set_whose_wire_value_is_the_name() -> None:
    assert {code.name for code in ErrorCode} == {
        "BAD_REQUEST", "VERSION_MISMATCH", "FORBIDDEN_PATH", "FORBIDDEN_SOURCE", "SOURCE_FAILED",
        "SOURCE_DENIED",
        "NOT_FOUND", "INVALID_LORA",
        "UNSUPPORTED_FORMAT", "TOO_LARGE", "CACHE_FULL", "UNKNOWN_DEVICE", "UNKNOWN_LEASE",
        "UNKNOWN_SESSION", "NOT_ALLOWED", "DAEMON_UNAVAILABLE", "TIMEOUT",
        "MAPPING_FAILED", "CLIENT_CLOSED", "BAD_SOCKET_PATH", "INTERNAL"}
    assert all(code.value == code.name for code in ErrorCode)


# -------------------------------------------------------------------------------- round trips

# One instance per request type, with every field away from its default.
SAMPLES = {
    "hello": Hello(pid=1234, client="worker-3", open_session=False, torch="2.11.0+cu130"),
    "acquire": Acquire(path="styles/ink.safetensors", device="cuda:GPU-1234", layout="diffusers",
                       known_entry="e17"),
    "release": Release(lease="L-9", opened=False),
    "heartbeat": Heartbeat(),
    "bye": Bye(),
    "stats": Stats(),
    "list": ListEntries(tiers=True),
    "preload": Preload(path="p.safetensors", device="cuda:GPU-1", layout="diffusers", pin=True),
    "prefetch": Prefetch(paths=["a.safetensors", "hf://org/repo/b.safetensors"],
                         device="cuda:GPU-1", layout="sdxl"),
    "evict": Evict(path="p.safetensors", device="cpu"),
    "clear": Clear(device="cuda:GPU-1"),
    "probe": Probe(device="cuda:GPU-1"),
}


def test_samples_cover_every_request_type() -> None:
    assert set(SAMPLES) == set(REQUEST_TYPES)
    assert all(type(SAMPLES[op]) is cls for op, cls in REQUEST_TYPES.items())
    for op, request in SAMPLES.items():  # every field of its own away from its default
        for field in msgspec.structs.fields(request)[3:]:
            assert getattr(request, field.name) != field.default, (op, field.name)


@pytest.mark.parametrize("op", sorted(SAMPLES))
def test_every_request_type_round_trips(op: str) -> None:
    request = SAMPLES[op]
    decoded = decode_request(encode_request(2**40, "session-token", request))
    assert type(decoded) is type(request)
    assert decoded == msgspec.structs.replace(request, id=2**40, session="session-token")
    assert (decoded.v, decoded.id, decoded.session) == (PROTOCOL_VERSION, 2**40, "session-token")


def test_encode_request_sets_the_envelope_whatever_the_struct_holds() -> None:
    """The connection numbers requests: an id or session left on the struct must not leak."""
    decoded = decode_request(encode_request(3, "mine", Heartbeat(id=99, session="theirs")))
    assert (decoded.id, decoded.session) == (3, "mine")


def test_absent_optional_fields_take_their_defaults() -> None:
    """An older client omits the fields added since: the daemon fills in their defaults."""
    decoded = decode_request(pack({"op": "acquire", "v": 1, "id": 5, "path": "a.safetensors"}))
    assert decoded == Acquire(id=5, session="", path="a.safetensors")
    assert (decoded.device, decoded.layout, decoded.known_entry) == ("cpu", "raw", "")


def test_key_order_does_not_matter() -> None:
    """Peers built with other encoders may put the tag anywhere."""
    body = {"path": "p", "session": "s", "id": 5, "v": 1, "op": "evict"}
    assert decode_request(pack(body)) == Evict(id=5, session="s", path="p")


@pytest.mark.parametrize("extra", [
    {"added_later": {"x": [1, 2]}},
    {"deep": [[[[[[[[[[[[[[[[{"k": [0]}]]]]]]]]]]]]]]]]},
    {"ext": msgpack.ExtType(5, b"data"), "empty_ext": msgpack.ExtType(5, b"")},
    {"timestamp": msgpack.Timestamp(0)},
    {"odd_keys": {1: "int", b"b": "bin", 2.5: "float", None: "nil", (1, 2): [1]}},
    {"blob": b"\x00" * 100, "big": "x" * (4 * MAX_TEXT_LEN)},  # limits are for known fields
], ids=["map", "deeply-nested", "ext", "timestamp", "non-str-keys", "long-str-and-bin"])
def test_unknown_fields_are_ignored_whatever_they_hold(extra: dict[str, Any]) -> None:
    """Forward compatibility: a newer client's fields must not make an older daemon refuse."""
    decoded = decode_request(pack(envelope("release", lease="L", **extra)))
    assert decoded == Release(id=42, session="tok", lease="L")


def test_unknown_field_with_invalid_utf8_is_ignored() -> None:
    """Skipped means unread: an old-style raw string from another packer costs nothing."""
    data = pack(envelope("stats"))
    data = bytes([data[0] + 1]) + data[1:] + fixstr("x") + b"\xa2\xff\xfe"  # "x": not UTF-8
    assert decode_request(data) == Stats(id=42, session="tok")


# Every result type, with every field away from its default.
ENTRY = EntryInfo(id="e1", path="/loras/a.safetensors", device="cuda:GPU-1", layout="diffusers",
                  nbytes=4096, leases=2, pinned=True, idle_s=1.5, file="2049:77:4096:123")
TABLE = [TensorSpec("a.lora_down.weight", "F16", [4, 320], 0),
         TensorSpec("a.alpha", "F32", [], 2560),
         TensorSpec("empty", "BF16", [0, 3], 2816)]
LOAD_TIMES = LoadTimesInfo(count=6, sum=2.25, buckets=[(0.1, 3), (1.0, 5), ("+Inf", 6)],
                           p50=0.05, p90=0.8, p99=1.2)
DEVICE = DeviceStats(device="cuda:GPU-1", budget=1 << 30, used=4096, reserved=512,
                     leased_bytes=4096, pinned_bytes=0, entries=1, leases=2, cache_size=3,
                     hits=10, misses=1, loads=1, evictions=4, hit_rate=0.9,
                     load_seconds=LOAD_TIMES, sessions=2, allocated_bytes=8192,
                     reserved_bytes=16384, waiting_bytes=0)

STATS = StatsResult(instance="i-1", pid=4242, uptime_s=12.5, sessions=3, leases=2,
                    errors={"CACHE_FULL": 2, "NOT_FOUND": 1}, metrics="127.0.0.1:9400",
                    devices=[DEVICE, DeviceStats(
                        device="cpu", budget=1, used=0, reserved=0, leased_bytes=0,
                        pinned_bytes=0, entries=0, leases=0, cache_size=0, hits=0, misses=0,
                        loads=0, evictions=0, hit_rate=None,
                        load_seconds=LoadTimesInfo(count=0, sum=0.0, buckets=[]), sessions=0)])


def test_a_cpu_device_stats_leave_the_allocator_fields_out() -> None:
    """Readers older than the allocator fields tell a GPU by their presence."""
    cpu = msgpack.unpackb(encode_reply(1, STATS))["result"]["devices"][1]
    assert cpu["device"] == "cpu" and cpu["sessions"] == 0 and cpu["hit_rate"] is None
    assert not {"allocated_bytes", "reserved_bytes", "waiting_bytes"} & set(cpu)
    gpu = msgpack.unpackb(encode_reply(1, STATS))["result"]["devices"][0]
    assert gpu["allocated_bytes"] == 8192 and gpu["waiting_bytes"] == 0



def _acquire_result(tensors: list[TensorSpec] | None) -> AcquireResult:
    handle = {"kind": "shm", "path": "/dev/shm/x/e1.bin", "nbytes": 4096, "blob": b"\x00\xff",
              "nested": {"list": [1, 2.5, None, True]}}
    return AcquireResult(lease="L1", entry=ENTRY, handle=handle, tensors=tensors)


RESULT_SAMPLES: list[Any] = [
    Done(),
    HelloResult(instance="i-1", session="s-1", session_ttl=30.5, devices=["cpu", "cuda:GPU-1"],
                version=7, torch="2.13.0"),
    ENTRY,
    _acquire_result(TABLE),
    _acquire_result(None),
    LOAD_TIMES,
    LoadTimesInfo(count=0, sum=0.0, buckets=[("+Inf", 0)]),  # before any load
    DEVICE,
    STATS,
    EntriesResult(entries=[ENTRY, EntryInfo(id="e2", path="b", device="cpu", layout="raw",
                                            nbytes=1)]),
    EntriesResult(entries=[]),
    DropResult(evicted=3, busy=1),
    DropResult(evicted=0, busy=0, copies=2),
]


def test_result_samples_cover_every_result_type() -> None:
    assert {cls.result_type for cls in REQUEST_TYPES.values()} <= {type(r) for r in
                                                                    RESULT_SAMPLES}


@pytest.mark.parametrize("result", RESULT_SAMPLES,
                         ids=lambda r: type(r).__name__)
def test_every_result_type_round_trips_through_a_reply(result: Any) -> None:
    reply = encode_reply(2**33, result)
    request_id, raw = decode_reply(reply)
    assert request_id == 2**33
    decoded = decode_result(raw, type(result))
    assert decoded == result
    assert type(decoded) is type(result)


def test_acquire_result_without_table_keeps_none() -> None:
    """None means "you know this entry": it must not become an empty table."""
    assert result_of(encode_reply(1, _acquire_result(None)), AcquireResult).tensors is None
    assert result_of(encode_reply(1, _acquire_result([])), AcquireResult).tensors == []


def test_handle_keeps_bytes_and_nested_values() -> None:
    handle = result_of(encode_reply(1, _acquire_result(TABLE)), AcquireResult).handle
    assert handle["blob"] == b"\x00\xff" and type(handle["blob"]) is bytes
    assert handle["nested"] == {"list": [1, 2.5, None, True]}


def test_dict_results_decode_like_their_struct() -> None:
    """The daemon may answer with a plain map: the wire is the same."""
    assert result_of(encode_reply(1, {"evicted": 2, "busy": 0}), DropResult) == DropResult(2, 0)
    assert result_of(encode_reply(1, {}), Done) == Done()


def test_result_absent_optional_fields_take_defaults_and_unknown_ones_are_ignored() -> None:
    """An older daemon omits newer fields, a newer daemon adds some: both still decode."""
    body = {"id": "e", "path": "p", "device": "cpu", "layout": "raw", "nbytes": 1,
            "added_later": [{"x": msgpack.ExtType(3, b"")}]}
    assert decode_result(msgspec.Raw(pack(body)), EntryInfo) == EntryInfo(
        id="e", path="p", device="cpu", layout="raw", nbytes=1, leases=0, pinned=False,
        idle_s=0.0, file="")


def test_tensor_spec_ignores_trailing_items() -> None:
    """Like unknown map fields: a later version may append an item to the array."""
    body = msgspec.to_builtins(_acquire_result(None))
    body["tensors"] = [["w", "F16", [2], 0, "added-later"]]
    decoded = decode_result(msgspec.Raw(pack(body)), AcquireResult)
    assert decoded.tensors == [TensorSpec("w", "F16", [2], 0)]


def test_integer_is_accepted_for_a_float_field() -> None:
    body = {"instance": "i", "session": "s", "session_ttl": 30, "devices": ["cpu"]}
    hello = decode_result(msgspec.Raw(pack(body)), HelloResult)
    assert hello.session_ttl == 30.0 and type(hello.session_ttl) is float
    assert (hello.version, hello.torch) == (PROTOCOL_VERSION, "")


def test_stats_result_finds_a_device_by_name() -> None:
    assert STATS.device("cpu").budget == 1
    assert STATS.device("cuda:GPU-1") is DEVICE
    with pytest.raises(KeyError, match="cuda:GPU-1, cpu"):
        STATS.device("cuda:GPU-9")


def test_messages_are_immutable() -> None:
    with pytest.raises(AttributeError):
        SAMPLES["acquire"].path = "other"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        ENTRY.nbytes = 0  # type: ignore[misc]


# ------------------------------------------------------------------ results that are refused


@pytest.mark.parametrize("item", [
    {"name": "w"}, ["w", "F16", [1]], "w",
    ["w", "F16", 5, 0],  # shape that is not a list
    ["w", "F16", [1.0], 0],  # float dimension
    ["w", "F16", [1], True],  # bool offset
    [1, "F16", [1], 0],  # name that is not a str
], ids=["map", "three-items", "string", "int-shape", "float-dim", "bool-offset", "int-name"])
def test_malformed_tensor_spec_is_bad_request(item: Any) -> None:
    body = msgspec.to_builtins(_acquire_result(None))
    body["tensors"] = [["ok", "F16", [1], 0], item]
    error = result_refused(body, AcquireResult)
    assert "$.tensors[1]" in error.message, error.message


def test_acquire_result_checks_the_entry_types() -> None:
    body = msgspec.to_builtins(_acquire_result(None))
    body["entry"]["nbytes"] = "4096"
    assert "$.entry.nbytes" in result_refused(body, AcquireResult).message


@pytest.mark.parametrize("result_type, body, field", [
    (HelloResult, {"instance": "i", "session": "s", "session_ttl": "30", "devices": []},
     "session_ttl"),
    (HelloResult, {"instance": "i", "session": "s", "session_ttl": 1.0}, "devices"),  # missing
    (DropResult, {"evicted": True, "busy": 0}, "evicted"),
    (EntriesResult, {"entries": {"e1": {}}}, "entries"),
    (StatsResult, {**msgspec.to_builtins(STATS), "errors": {"X": "1"}}, "errors"),
    (DeviceStats, {**msgspec.to_builtins(DEVICE), "load_seconds": None}, "load_seconds"),
    (LoadTimesInfo, {"count": 1, "sum": 1.0, "buckets": [[0.1]]}, "buckets"),
], ids=["str-for-float", "missing", "bool-for-int", "map-for-list", "str-count",
        "null-struct", "short-bucket"])
def test_mistyped_result_is_bad_request_naming_the_field(result_type: type, body: Any,
                                                         field: str) -> None:
    assert names(result_refused(body, result_type).message, field)


@pytest.mark.parametrize("body", [None, [1, 2], "ok", 7, b"\x01"],
                         ids=["nil", "list", "str", "int", "bin"])
def test_result_that_is_not_a_map_is_bad_request(body: Any) -> None:
    result_refused(body, Done)
    result_refused(body, DropResult)


def test_ok_reply_without_result_is_bad_request_when_read() -> None:
    """decode_reply does not look at the result; decode_result refuses a missing one."""
    request_id, raw = decode_reply(pack({"id": 4, "ok": True}))
    assert request_id == 4
    with pytest.raises(BadRequest) as info:
        decode_result(raw, Done)
    assert info.value.code is ErrorCode.BAD_REQUEST
    assert "malformed Done" in info.value.message


def test_result_is_only_decoded_once_asked() -> None:
    """A reply for another request is matched by id without its result being checked."""
    request_id, raw = decode_reply(pack({"id": 8, "ok": True,
                                         "result": [msgpack.ExtType(1, b"?")]}))
    assert request_id == 8 and isinstance(raw, msgspec.Raw)
    result_refused([msgpack.ExtType(1, b"?")], HelloResult)


def test_result_of_another_type_is_bad_request() -> None:
    """A reply decoded with the wrong request's type fails loudly, not half-filled."""
    _, raw = decode_reply(encode_reply(1, DropResult(evicted=1, busy=0)))
    with pytest.raises(BadRequest) as info:
        decode_result(raw, HelloResult)
    assert "malformed HelloResult" in info.value.message
    assert names(info.value.message, "instance")


# ---------------------------------------------------------------------------- error replies


def test_error_reply_comes_back_as_an_exception_value() -> None:
    request_id, error = decode_reply(encode_error(8, LoraCacheError(ErrorCode.CACHE_FULL,
                                                                    "budget 1, used 1")))
    assert request_id == 8
    assert isinstance(error, LoraCacheError)
    assert error.code is ErrorCode.CACHE_FULL
    assert error.message == "budget 1, used 1"


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_error_code_survives_the_wire(code: ErrorCode) -> None:
    _, error = decode_reply(encode_error(1, LoraCacheError(code, "m")))
    assert isinstance(error, LoraCacheError)
    assert error.code is code


@pytest.mark.parametrize("error", [
    {"code": "NO_SUCH_CODE", "message": "m"},
    {"code": 17, "message": "m"},
    {"code": "bad_request", "message": "m"},  # codes are case-sensitive names
    {"code": ["CACHE_FULL"], "message": "m"},
    {"message": "m"},
], ids=["unknown-name", "int", "lowercase", "list", "missing"])
def test_unknown_error_codes_become_internal(error: dict[str, Any]) -> None:
    _, value = decode_reply(pack({"id": 1, "ok": False, "error": error}))
    assert isinstance(value, LoraCacheError)
    assert value.code is ErrorCode.INTERNAL
    assert value.message == "m"


@pytest.mark.parametrize("body", [
    [1, 2], {"ok": True, "result": 1}, {"id": "1", "ok": True}, {"id": None, "ok": False},
    {"id": True, "ok": True}, {"id": 1.0, "ok": True}, {"id": 1, "ok": 1}, {"id": 1, "ok": None},
    {1: 1, "id": 1, "ok": True},
], ids=["list", "no-id", "str-id", "null-id", "bool-id", "float-id", "int-ok", "null-ok",
        "int-key"])
def test_malformed_reply_is_refused(body: Any) -> None:
    with pytest.raises(BadRequest) as info:
        decode_reply(pack(body))
    assert info.value.code is ErrorCode.BAD_REQUEST
    assert "malformed reply" in info.value.message


@pytest.mark.parametrize("data", [b"", b"\xc1", encode_reply(1, {})[:-1],
                                  encode_reply(1, {}) + b"\x00"],
                         ids=["empty", "reserved-byte", "truncated", "trailing"])
def test_invalid_msgpack_reply_is_refused(data: bytes) -> None:
    with pytest.raises(BadRequest) as info:
        decode_reply(data)
    assert info.value.code is ErrorCode.BAD_REQUEST


@pytest.mark.parametrize("error", ["boom", [1, 2], None, 3, {"code": "CACHE_FULL"}],
                         ids=["str", "list", "nil", "int", "no-message"])
def test_malformed_error_reply_gives_a_loracache_error_value(error: Any) -> None:
    """Whatever error body the daemon sent, the client gets an error it can raise."""
    _, value = decode_reply(pack({"id": 1, "ok": False, "error": error}))
    assert isinstance(value, LoraCacheError)
    if isinstance(error, dict):
        assert (value.code, value.message) == (ErrorCode.CACHE_FULL, "")
    else:
        assert value.code is ErrorCode.INTERNAL
        assert "malformed error reply" in value.message


def test_reply_with_neither_ok_nor_error_is_an_internal_error() -> None:
    _, value = decode_reply(pack({"id": 3}))
    assert isinstance(value, LoraCacheError) and value.code is ErrorCode.INTERNAL


def test_unknown_reply_fields_are_ignored() -> None:
    data = pack({"id": 6, "ok": True, "result": {}, "later": [msgpack.ExtType(2, b"")]})
    request_id, raw = decode_reply(data)
    assert request_id == 6 and decode_result(raw, Done) == Done()


def test_errors_pickle_with_code_message_and_request_id() -> None:
    error = pickle.loads(pickle.dumps(LoraCacheError(ErrorCode.NOT_FOUND, "no x")))
    assert (error.code, error.message, str(error)) == (ErrorCode.NOT_FOUND, "no x",
                                                       "[NOT_FOUND] no x")
    bad = pickle.loads(pickle.dumps(BadRequest(ErrorCode.BAD_REQUEST, "m", 17)))
    assert (type(bad), bad.code, bad.message, bad.request_id) == (
        BadRequest, ErrorCode.BAD_REQUEST, "m", 17)


# ------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("body", [[1, 2], "hello", 7, None, b"\x01"],
                         ids=["list", "str", "int", "nil", "bin"])
def test_non_map_is_bad_request(body: Any) -> None:
    error = refused(pack(body))
    assert "object" in error.message or "map" in error.message, error.message
    assert error.request_id == 0


@pytest.mark.parametrize("request_id", [-1, True, False, 1.0, "1", None, [1], -(2**63)],
                         ids=["negative", "true", "false", "float", "str", "nil", "list",
                              "int64-min"])
def test_bad_id_is_bad_request_without_request_id(request_id: Any) -> None:
    error = refused(pack({**envelope(), "id": request_id}))
    assert names(error.message, "id"), error.message
    assert error.request_id == 0  # not readable: the reply goes to id 0


def test_missing_id_is_bad_request_without_request_id() -> None:
    body = envelope()
    del body["id"]
    error = refused(pack(body))
    assert names(error.message, "id"), error.message
    assert error.request_id == 0


@pytest.mark.parametrize("request_id", [0, 1, 2**32, 2**63, 2**64 - 1])
def test_every_unsigned_64_bit_id_is_accepted(request_id: int) -> None:
    assert decode_request(pack({**envelope(), "id": request_id})).id == request_id


@pytest.mark.parametrize("version", [2, 0, -1, 2**64 - 1, "1", None, True, 1.0, [1], {"v": 1}],
                         ids=["2", "0", "negative", "huge", "str", "nil", "true", "float",
                              "list", "map"])
def test_wrong_version_is_version_mismatch(version: Any) -> None:
    """Python compares True == 1 == 1.0; the wire types differ, so those are another version."""
    error = refused(pack({**envelope(), "v": version}), ErrorCode.VERSION_MISMATCH)
    assert error.request_id == 42
    assert f"v{PROTOCOL_VERSION}" in error.message
    assert "install matching loracache versions" in error.message


def test_missing_version_is_version_mismatch() -> None:
    body = envelope()
    del body["v"]
    assert refused(pack(body), ErrorCode.VERSION_MISMATCH).request_id == 42


@pytest.mark.parametrize("body", [
    envelope("fly", v=2),
    envelope("acquire", v=2),  # its required path is missing
    envelope("acquire", v=2, path=5),
    envelope("hello", v=2, pid="one", future_field={"x": 1}),
], ids=["unknown-op", "missing-field", "mistyped-field", "mistyped-and-unknown"])
def test_version_is_checked_before_the_fields(body: dict[str, Any]) -> None:
    """Another version's fields may well differ: the client must learn of the version, not of
    a field that only looks wrong."""
    assert refused(pack(body), ErrorCode.VERSION_MISMATCH).request_id == 42


@pytest.mark.parametrize("op", ["fly", "", "Hello", "HELLO", 5, None, ["hello"], True],
                         ids=["unknown", "empty", "wrong-case", "upper", "int", "nil", "list",
                              "bool"])
def test_unknown_op_is_bad_request_listing_the_known_ops(op: Any) -> None:
    error = refused(pack({**envelope(), "op": op}))
    assert "unknown op" in error.message
    assert all(known in error.message for known in REQUEST_TYPES), error.message
    assert error.request_id == 42


def test_missing_op_is_bad_request() -> None:
    body = envelope()
    del body["op"]
    error = refused(pack(body))
    assert "unknown op" in error.message
    assert error.request_id == 42


@pytest.mark.parametrize("op, field", [("acquire", "path"), ("release", "lease"),
                                       ("preload", "path"), ("evict", "path")])
def test_missing_required_field_is_bad_request(op: str, field: str) -> None:
    error = refused(pack(envelope(op)))
    assert names(error.message, field) and "missing" in error.message, error.message
    assert repr(op) in error.message
    assert error.request_id == 42


@pytest.mark.parametrize("op, fields, bad_field", [
    ("hello", {"pid": True}, "pid"),  # bool where int
    ("hello", {"pid": "12"}, "pid"),
    ("hello", {"pid": 1.5}, "pid"),
    ("hello", {"client": 3}, "client"),
    ("hello", {"open_session": 0}, "open_session"),
    ("hello", {"torch": ["2"]}, "torch"),
    ("acquire", {"path": 5}, "path"),  # int where str
    ("acquire", {"path": b"a.safetensors"}, "path"),  # bin where str
    ("acquire", {"path": None}, "path"),
    ("acquire", {"path": ["a"]}, "path"),
    ("acquire", {"path": msgpack.ExtType(1, b"a")}, "path"),
    ("acquire", {"path": msgpack.ExtType(5, b"")}, "path"),
    ("acquire", {"path": msgpack.Timestamp(0)}, "path"),
    ("acquire", {"path": "a", "device": 0}, "device"),
    ("acquire", {"path": "a", "layout": {}}, "layout"),
    ("acquire", {"path": "a", "known_entry": False}, "known_entry"),
    ("release", {"lease": {"id": "L"}}, "lease"),
    ("release", {"lease": "L", "opened": "no"}, "opened"),
    ("preload", {"path": "a", "pin": 1}, "pin"),  # int where bool
    ("preload", {"path": "a", "pin": "yes"}, "pin"),
    ("evict", {"path": "a", "device": None}, "device"),
    ("clear", {"device": 1.0}, "device"),
    ("probe", {"device": b"cpu"}, "device"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_mistyped_field_is_bad_request_naming_it(op: str, fields: dict[str, Any],
                                                 bad_field: str) -> None:
    error = refused(pack(envelope(op, **fields)))
    assert names(error.message, bad_field), error.message
    assert repr(op) in error.message
    assert error.request_id == 42


@pytest.mark.parametrize("session", [5, None, b"tok", ["tok"], True],
                         ids=["int", "nil", "bin", "list", "bool"])
def test_mistyped_session_is_bad_request(session: Any) -> None:
    error = refused(pack({**envelope(), "session": session}))
    assert names(error.message, "session"), error.message
    assert error.request_id == 42


def test_oversized_message_is_bad_request() -> None:
    data = pack(envelope(padding=b"x" * MAX_REQUEST_BYTES))
    assert len(data) > MAX_REQUEST_BYTES
    error = refused(data)
    assert "exceeds the limit" in error.message and str(MAX_REQUEST_BYTES) in error.message


TEXT_FIELDS = sorted(
    (op, field.name) for op, cls in REQUEST_TYPES.items()
    for field in msgspec.inspect.type_info(cls).fields
    if isinstance(field.type, msgspec.inspect.StrType))


def test_text_fields_include_every_string_field() -> None:
    """The list below is derived from the types: make sure it is not empty or partial."""
    assert ("acquire", "path") in TEXT_FIELDS and ("hello", "session") in TEXT_FIELDS
    assert {field for _, field in TEXT_FIELDS} == {"session", "client", "torch", "path",
                                                   "device", "layout", "known_entry", "lease"}


def _with_text(op: str, field: str, text: str) -> bytes:
    body = envelope(op, path="p", lease="L", paths=["p"])
    body[field] = text
    return pack(body)


@pytest.mark.parametrize("op, field", TEXT_FIELDS)
def test_every_string_field_is_capped_at_max_text_len(op: str, field: str) -> None:
    decoded = decode_request(_with_text(op, field, "a" * MAX_TEXT_LEN))
    assert getattr(decoded, field) == "a" * MAX_TEXT_LEN
    error = refused(_with_text(op, field, "a" * (MAX_TEXT_LEN + 1)))
    assert names(error.message, field) and str(MAX_TEXT_LEN) in error.message, error.message
    assert error.request_id == 42


def test_max_text_len_counts_characters_not_bytes() -> None:
    """msgspec's max_length is in code points: 8192 four-byte characters (32 KiB) still pass."""
    text = "\U0001f600" * MAX_TEXT_LEN
    assert decode_request(_with_text("acquire", "path", text)).path == text
    refused(_with_text("acquire", "path", text + "a"))


# As deep as a request may be: far past any stack.
DEPTH = MAX_REQUEST_BYTES - 100


def test_very_deep_nesting_is_bad_request() -> None:
    refused(b"\x91" * DEPTH + b"\x00")
    refused(b"\x81\xa1k" * (DEPTH // 3) + b"\x00")


def test_pathological_nesting_in_an_unknown_field_is_bad_request() -> None:
    """Skipped fields are still parsed: past msgspec's recursion guard that is a refusal, not a
    crash of the daemon's receive loop."""
    head = pack(envelope())
    data = bytes([head[0] + 1]) + head[1:] + fixstr("deep") + b"\x91" * DEPTH + b"\x00"
    refused(data)


@pytest.mark.parametrize("data", [
    pack(msgpack.ExtType(5, b"x")),
    pack(msgpack.Timestamp(0)),
], ids=["ext", "timestamp"])
def test_top_level_ext_is_bad_request(data: bytes) -> None:
    assert refused(data).request_id == 0


@pytest.mark.parametrize("data", [
    b"",
    b"\xc1",  # the one byte msgpack never uses
    pack(envelope())[:-2],  # truncated
    b"\x81\xa2op\xa2\xff\xfe",  # a str that is not UTF-8, in a known field
    pack({1: "x", "v": 1, "id": 1, "op": "stats"}),  # non-string map key
    pack({b"op": "stats", "v": 1, "id": 1}),  # bin map key
    pack({(1, 2): 1}),
    b"\xdf\xff\xff\xff\xff",  # a map header of 4 G pairs, and no pairs
    b"\xdb\xff\xff\xff\xff",  # a str header of 4 GiB, and no bytes
], ids=["empty", "reserved-byte", "truncated", "invalid-utf8", "int-key", "bin-key",
        "array-key", "huge-map-header", "huge-str-header"])
def test_invalid_msgpack_is_bad_request(data: bytes) -> None:
    assert refused(data).request_id == 0


def test_trailing_garbage_is_bad_request() -> None:
    refused(pack(envelope()) + b"\x00")


def test_two_messages_in_one_frame_are_bad_request() -> None:
    refused(pack(envelope()) * 2)


# ----------------------------------------------------------------------------- properties

_KEYS = sorted({"op", *(f for cls in REQUEST_TYPES.values() for f in cls.__struct_fields__)})
_leaves = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
           | st.text(max_size=8) | st.binary(max_size=8) | st.sampled_from([1, *REQUEST_TYPES]))
_objects = st.recursive(
    _leaves,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=4), children, max_size=8),
    max_leaves=30)
# Maps that get past the envelope checks often, so the field checks see arbitrary values too.
_requests = st.builds(
    lambda op, fields, request_id: {"op": op, "v": 1, "id": request_id, "session": "",
                                    **fields},
    st.sampled_from(sorted(REQUEST_TYPES)),
    st.dictionaries(st.sampled_from(_KEYS), _objects, max_size=6),
    st.integers(0, 2**64 - 1))


def _decode_or_refuse(data: bytes) -> None:
    try:
        request = decode_request(data)
    except LoraCacheError as exc:
        assert isinstance(exc, BadRequest)
        assert exc.code in (ErrorCode.BAD_REQUEST, ErrorCode.VERSION_MISMATCH)
    else:
        assert type(request) is REQUEST_TYPES[request.op]
        assert request.v == PROTOCOL_VERSION


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256))
def test_arbitrary_bytes_decode_or_raise_loracache_error(data: bytes) -> None:
    _decode_or_refuse(data)


@settings(max_examples=300, deadline=None)
@given(_objects | _requests)
def test_arbitrary_msgpack_objects_decode_or_raise_loracache_error(obj: Any) -> None:
    _decode_or_refuse(pack(obj))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(SAMPLES)), st.data())
def test_damaged_requests_decode_or_raise_loracache_error(op: str, data: st.DataObject) -> None:
    raw = bytearray(encode_request(3, "tok", SAMPLES[op]))
    position = data.draw(st.integers(0, len(raw) - 1))
    raw[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(raw)))
    _decode_or_refuse(bytes(raw[:cut]))


def test_a_refusal_quotes_a_huge_value_only_in_part() -> None:
    """Each error reply (and log line) stays small whatever a peer sent: msgspec's message can
    quote the value, here a ~1 MB op before the real one."""
    data = (b"\x83" + pack("op") + pack("x" * 1_000_000) + pack("id") + pack(7)
            + pack("v") + pack(1))
    data = b"\x84" + data[1:] + pack("op") + pack("stats")
    error = refused(data)
    assert len(error.message) < 500 and error.request_id == 7
