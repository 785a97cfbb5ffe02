"""The wire protocol: pinned bytes, round trips, and what decoding refuses."""

from __future__ import annotations

import dataclasses
import pickle
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loracache.shared.errors import BadRequest, ErrorCode, LoraCacheError
from loracache.shared.protocol import (
    PROTOCOL_VERSION,
    REQUEST_LIMITS,
    REQUEST_TYPES,
    Acquire,
    AcquireResult,
    Bye,
    Clear,
    EntryInfo,
    Evict,
    Heartbeat,
    Hello,
    HelloResult,
    ListEntries,
    Preload,
    Probe,
    Release,
    RequestFrame,
    Stats,
    TensorSpec,
    decode_reply,
    decode_request,
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
    return {"v": 1, "id": 42, "op": op, "session": "tok", **fields}


def refused(data: bytes, code: ErrorCode = ErrorCode.BAD_REQUEST) -> LoraCacheError:
    with pytest.raises(LoraCacheError) as info:
        decode_request(data)
    assert info.value.code is code, info.value
    return info.value


# ------------------------------------------------------------------------------ golden bytes


def test_acquire_request_bytes_are_pinned() -> None:
    expected = (
        b"\x88"  # fixmap of 8 pairs, in this order:
        + fixstr("v") + b"\x01"
        + fixstr("id") + b"\x07"
        + fixstr("op") + fixstr("acquire")
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
        + fixstr("v") + b"\x01"
        + fixstr("id") + b"\xcd\x01\x00"  # uint16 256
        + fixstr("op") + fixstr("hello")
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
        + fixstr("v") + b"\x01"
        + fixstr("id") + b"\x00"
        + fixstr("op") + fixstr("preload")
        + fixstr("session") + fixstr("s")
        + fixstr("path") + fixstr("p")
        + fixstr("device") + fixstr("cpu")
        + fixstr("layout") + fixstr("raw")
        + fixstr("pin") + b"\xc3"  # true
    )
    assert encode_request(0, "s", Preload(path="p", pin=True)) == expected


def test_reply_bytes_are_pinned() -> None:
    expected = (
        b"\x83"
        + fixstr("id") + b"\x03"
        + fixstr("ok") + b"\xc3"
        + fixstr("result") + b"\x81" + fixstr("lease") + fixstr("L1")
    )
    assert encode_reply(3, {"lease": "L1"}) == expected


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


def test_op_names_on_the_wire_are_pinned() -> None:
    assert set(REQUEST_TYPES) == {"hello", "acquire", "release", "heartbeat", "bye", "stats",
                                  "list", "preload", "evict", "clear", "probe"}
    assert all(cls.op == op for op, cls in REQUEST_TYPES.items())


def test_error_codes_are_a_closed_set_whose_wire_value_is_the_name() -> None:
    assert {code.name for code in ErrorCode} == {
        "BAD_REQUEST", "VERSION_MISMATCH", "FORBIDDEN_PATH", "NOT_FOUND", "INVALID_LORA",
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
    "list": ListEntries(),
    "preload": Preload(path="p.safetensors", device="cuda:GPU-1", layout="diffusers", pin=True),
    "evict": Evict(path="p.safetensors", device="cpu"),
    "clear": Clear(device="cuda:GPU-1"),
    "probe": Probe(device="cuda:GPU-1"),
}


def test_samples_cover_every_request_type() -> None:
    assert set(SAMPLES) == set(REQUEST_TYPES)
    assert all(type(SAMPLES[op]) is cls for op, cls in REQUEST_TYPES.items())


@pytest.mark.parametrize("op", sorted(SAMPLES))
def test_every_request_type_round_trips(op: str) -> None:
    request = SAMPLES[op]
    frame = decode_request(encode_request(2**40, "session-token", request))
    assert frame == RequestFrame(id=2**40, session="session-token", request=request)


def test_absent_optional_fields_take_their_defaults() -> None:
    frame = decode_request(pack({"v": 1, "id": 5, "op": "acquire", "path": "a.safetensors"}))
    assert frame == RequestFrame(id=5, session="", request=Acquire(path="a.safetensors"))


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    frame = decode_request(pack(envelope("release", lease="L", added_later={"x": [1, 2]})))
    assert frame.request == Release(lease="L")


def test_reply_round_trips() -> None:
    assert decode_reply(encode_reply(12, {"a": [1, b"\x00"]})) == (12, {"a": [1, b"\x00"]})


def test_dataclass_result_is_sent_as_its_map() -> None:
    result = HelloResult(instance="i", session="s", session_ttl=30.0, devices=["cpu"],
                         torch="2.13.0")
    request_id, body = decode_reply(encode_reply(1, result))
    assert request_id == 1
    assert body == {"instance": "i", "session": "s", "session_ttl": 30.0, "devices": ["cpu"],
                    "version": PROTOCOL_VERSION, "torch": "2.13.0"}


def _acquire_result(tensors: list[TensorSpec] | None) -> AcquireResult:
    entry = EntryInfo(id="e1", path="/loras/a.safetensors", device="cpu", layout="raw",
                      nbytes=4096, leases=2, pinned=True, idle_s=1.5)
    handle = {"kind": "shm", "path": "/dev/shm/x/e1.bin", "nbytes": 4096, "blob": b"\x00\xff"}
    return AcquireResult(lease="L1", entry=entry, handle=handle, tensors=tensors)


@pytest.mark.parametrize("tensors", [
    [TensorSpec("a.lora_down.weight", "F16", [4, 320], 0),
     TensorSpec("a.alpha", "F32", [], 2560),
     TensorSpec("empty", "BF16", [0, 3], 2816)],
    None,
], ids=["with-table", "known-entry"])
def test_acquire_result_round_trips_through_a_reply(tensors: list[TensorSpec] | None) -> None:
    result = _acquire_result(tensors)
    request_id, body = decode_reply(encode_reply(4, result))
    assert request_id == 4
    assert AcquireResult.from_wire(body) == result


def test_tensor_spec_wire_form_is_a_four_item_list() -> None:
    spec = TensorSpec("w", "BF16", [3, 5], 512)
    assert spec.to_wire() == ["w", "BF16", [3, 5], 512]
    assert TensorSpec.from_wire(msgpack.unpackb(pack(spec.to_wire()))) == spec


@pytest.mark.parametrize("item", [
    {"name": "w"}, ["w", "F16", [1]], ["w", "F16", [1], 0, "extra"], "w",
    ["w", "F16", 5, 0],  # shape that is not a list
], ids=["map", "three-items", "five-items", "string", "int-shape"])
def test_malformed_tensor_spec_is_bad_request(item: Any) -> None:
    with pytest.raises(LoraCacheError) as info:
        TensorSpec.from_wire(item)
    assert info.value.code is ErrorCode.BAD_REQUEST


def test_acquire_result_checks_the_entry_types() -> None:
    body = _acquire_result(None).to_wire()
    body["entry"]["nbytes"] = "4096"
    with pytest.raises(LoraCacheError) as info:
        AcquireResult.from_wire(body)
    assert info.value.code is ErrorCode.BAD_REQUEST
    assert "nbytes" in info.value.message


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
    assert error.code is code


@pytest.mark.parametrize("error", [
    {"code": "NO_SUCH_CODE", "message": "m"},
    {"code": 17, "message": "m"},
    {"code": "bad_request", "message": "m"},  # codes are case-sensitive names
    {"message": "m"},
], ids=["unknown-name", "int", "lowercase", "missing"])
def test_unknown_error_codes_become_internal(error: dict[str, Any]) -> None:
    _, value = decode_reply(pack({"id": 1, "ok": False, "error": error}))
    assert isinstance(value, LoraCacheError)
    assert value.code is ErrorCode.INTERNAL
    assert value.message == "m"


@pytest.mark.parametrize("body", [
    [1, 2], {"ok": True, "result": 1}, {"id": "1", "ok": True}, {"id": None, "ok": False},
], ids=["list", "no-id", "str-id", "null-id"])
def test_malformed_reply_is_refused(body: Any) -> None:
    with pytest.raises(LoraCacheError) as info:
        decode_reply(pack(body))
    assert info.value.code is ErrorCode.BAD_REQUEST


@pytest.mark.parametrize("error", ["boom", [1, 2], {"code": ["CACHE_FULL"], "message": "m"}],
                         ids=["error-is-str", "error-is-list", "code-is-list"])
def test_malformed_error_reply_gives_a_loracache_error(error: Any) -> None:
    """Whatever the daemon sent, the client gets a LoraCacheError (returned or raised)."""
    data = pack({"id": 1, "ok": False, "error": error})
    try:
        _, value = decode_reply(data)
    except LoraCacheError:
        return
    assert isinstance(value, LoraCacheError)


def test_error_pickles_with_code_and_message() -> None:
    error = pickle.loads(pickle.dumps(LoraCacheError(ErrorCode.NOT_FOUND, "no x")))
    assert (error.code, error.message, str(error)) == (ErrorCode.NOT_FOUND, "no x",
                                                       "[NOT_FOUND] no x")


# ------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("body", [[1, 2], "hello", 7, None, b"\x01"],
                         ids=["list", "str", "int", "nil", "bin"])
def test_non_map_is_bad_request(body: Any) -> None:
    assert "map" in refused(pack(body)).message


@pytest.mark.parametrize("request_id", [-1, True, False, 1.0, "1", None],
                         ids=["negative", "true", "false", "float", "str", "nil"])
def test_bad_id_is_bad_request(request_id: Any) -> None:
    error = refused(pack({**envelope(), "id": request_id}))
    assert "'id'" in error.message
    assert isinstance(error, BadRequest) and error.request_id == 0  # not read: no id


def test_missing_id_is_bad_request_without_request_id() -> None:
    body = envelope()
    del body["id"]
    error = refused(pack(body))
    assert "'id'" in error.message
    assert isinstance(error, BadRequest) and error.request_id == 0  # not read: no id


@pytest.mark.parametrize("version", [2, 0, "1", None], ids=["2", "0", "str", "nil"])
def test_wrong_version_is_version_mismatch(version: Any) -> None:
    error = refused(pack({**envelope(), "v": version}), ErrorCode.VERSION_MISMATCH)
    assert isinstance(error, BadRequest) and error.request_id == 42


@pytest.mark.parametrize("version", [True, 1.0], ids=["true", "float"])
def test_version_must_be_the_integer_1(version: Any) -> None:
    # Python compares True == 1 == 1.0; the wire types differ, and `id` already refuses bools.
    refused(pack({**envelope(), "v": version}), ErrorCode.VERSION_MISMATCH)


def test_missing_version_is_version_mismatch() -> None:
    body = envelope()
    del body["v"]
    refused(pack(body), ErrorCode.VERSION_MISMATCH)


@pytest.mark.parametrize("op", ["fly", "", "Hello", 5, None, ["hello"]],
                         ids=["unknown", "empty", "wrong-case", "int", "nil", "list"])
def test_unknown_op_is_bad_request(op: Any) -> None:
    error = refused(pack({**envelope(), "op": op}))
    assert "unknown op" in error.message
    assert isinstance(error, BadRequest) and error.request_id == 42


@pytest.mark.parametrize("op, field", [("acquire", "path"), ("release", "lease"),
                                       ("preload", "path"), ("evict", "path")])
def test_missing_required_field_is_bad_request(op: str, field: str) -> None:
    error = refused(pack(envelope(op)))
    assert f"{field!r}" in error.message and "required" in error.message
    assert isinstance(error, BadRequest) and error.request_id == 42


@pytest.mark.parametrize("op, fields, bad_field", [
    ("hello", {"pid": True}, "pid"),  # bool where int
    ("hello", {"pid": "12"}, "pid"),
    ("hello", {"pid": 1.5}, "pid"),
    ("hello", {"client": 3}, "client"),
    ("acquire", {"path": 5}, "path"),  # int where str
    ("acquire", {"path": b"a.safetensors"}, "path"),  # bin where str
    ("acquire", {"path": None}, "path"),
    ("acquire", {"path": ["a"]}, "path"),
    ("acquire", {"path": "a", "device": 0}, "device"),
    ("acquire", {"path": "a", "known_entry": False}, "known_entry"),
    ("release", {"lease": {"id": "L"}}, "lease"),
    ("preload", {"path": "a", "pin": 1}, "pin"),  # int where bool
    ("preload", {"path": "a", "pin": "yes"}, "pin"),
    ("evict", {"path": "a", "device": None}, "device"),
    ("clear", {"device": 1.0}, "device"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_mistyped_field_is_bad_request(op: str, fields: dict[str, Any], bad_field: str) -> None:
    error = refused(pack(envelope(op, **fields)))
    assert repr(bad_field) in error.message
    assert isinstance(error, BadRequest) and error.request_id == 42


@pytest.mark.parametrize("session", [5, None, b"tok", ["tok"]], ids=["int", "nil", "bin", "list"])
def test_mistyped_session_is_bad_request(session: Any) -> None:
    error = refused(pack({**envelope(), "session": session}))
    assert "'session'" in error.message
    assert isinstance(error, BadRequest) and error.request_id == 42


def test_oversized_message_is_bad_request() -> None:
    data = pack(envelope(padding="x" * REQUEST_LIMITS.max_bytes))
    assert len(data) > REQUEST_LIMITS.max_bytes
    assert "exceeds the limit" in refused(data).message


def test_overlong_string_is_bad_request() -> None:
    refused(pack(envelope("acquire", path="a" * (REQUEST_LIMITS.max_str_len + 1))))


def nested(levels: int) -> Any:
    value: Any = 0
    for _ in range(levels):
        value = [value]
    return value


def test_nesting_up_to_the_limit_is_accepted() -> None:
    # The request map is level 1, so max_depth - 1 nested lists reach the limit exactly.
    decode_request(pack(envelope(extra=nested(REQUEST_LIMITS.max_depth - 1))))


def test_over_deep_nesting_is_bad_request() -> None:
    error = refused(pack(envelope(extra=nested(REQUEST_LIMITS.max_depth))))
    assert "nested deeper" in error.message


def test_very_deep_nesting_is_bad_request() -> None:
    refused(b"\x91" * 100_000 + b"\x00")  # beyond msgpack's own stack limit


@pytest.mark.parametrize("data", [
    pack(envelope("acquire", path=msgpack.ExtType(1, b"a"))),
    pack(envelope(extra=msgpack.ExtType(5, b"data"))),
    pack(msgpack.ExtType(5, b"x")),
    pack(envelope(extra=msgpack.Timestamp(0))),
    pack(envelope("acquire", path=msgpack.ExtType(5, b""))),
    pack(envelope(extra=msgpack.ExtType(5, b""))),  # zero-length ext in an ignored field
], ids=["in-known-field", "in-unknown-field", "top-level", "timestamp", "empty-in-known-field",
        "empty-in-unknown-field"])
def test_ext_types_are_bad_request(data: bytes) -> None:
    refused(data)


@pytest.mark.parametrize("data", [
    b"",
    b"\xc1",  # the one byte msgpack never uses
    pack(envelope())[:-2],  # truncated
    b"\x81\xa1v\xa2\xff\xfe",  # a str that is not UTF-8
    pack({1: "x", "v": 1, "id": 1, "op": "stats"}),  # non-string map key
    pack({(1, 2): 1}),
], ids=["empty", "reserved-byte", "truncated", "invalid-utf8", "int-key", "array-key"])
def test_invalid_msgpack_is_bad_request(data: bytes) -> None:
    assert "msgpack" in refused(data).message


def test_trailing_garbage_is_bad_request() -> None:
    refused(pack(envelope()) + b"\x00")


def test_two_messages_in_one_frame_are_bad_request() -> None:
    refused(pack(envelope()) * 2)


# ----------------------------------------------------------------------------- properties

_KEYS = ["v", "id", "op", "session", *{f.name for cls in REQUEST_TYPES.values()
                                        for f in dataclasses.fields(cls)}]
_leaves = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
           | st.text(max_size=8) | st.binary(max_size=8) | st.sampled_from([1, *REQUEST_TYPES]))
_objects = st.recursive(
    _leaves,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=4), children, max_size=8),
    max_leaves=30)
# Maps that get past the envelope checks often, so the field checks see arbitrary values too.
_requests = st.builds(
    lambda op, fields, request_id: {"v": 1, "id": request_id, "op": op, "session": "",
                                    **fields},
    st.sampled_from(sorted(REQUEST_TYPES)),
    st.dictionaries(st.sampled_from(_KEYS), _objects, max_size=6),
    st.integers(0, 2**64 - 1))


def _decode_or_refuse(data: bytes) -> None:
    try:
        frame = decode_request(data)
    except LoraCacheError as exc:
        assert exc.code in (ErrorCode.BAD_REQUEST, ErrorCode.VERSION_MISMATCH)
    else:
        assert isinstance(frame, RequestFrame)


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
