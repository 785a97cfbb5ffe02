"""Property-based fuzzing of the protocol decoders.

tests/shared/test_protocol.py already checks, with hypothesis, that short random bytes, random
msgpack trees (str keys, 64-bit ints, depth well under the limit) and one-byte damage of the
sample requests decode or raise BAD_REQUEST / VERSION_MISMATCH. This file extends that:

* inputs that get deeper into the unpacker: streams of msgpack type bytes and length headers
  around the limits, valid requests damaged by several insertions, deletions, bit flips and
  splices, trees with non-str keys, old-style raw strings, float32, nesting past the limit;
* what the daemon does with a refusal: the error reply it would send decodes on the client into
  the same code and message, matched to the request id;
* everything accepted is a well-typed frame that encodes and decodes back to itself;
* every request type round-trips for arbitrary field values, also next to unknown fields;
* a field of the wrong type is refused naming that field;
* each limit (depth, str bytes, array and map length, message size) holds exactly at its
  boundary, for requests and for replies, and the refusal names the limit;
* ``decode_reply`` on arbitrary input returns ``(id, result)``, where an error is a
  LoraCacheError value with a known code, or raises LoraCacheError; never anything else.

No HealthCheck is suppressed: the strategies draw small values, and the few large inputs
(limits at 64 KiB - 64 MiB) are built from drawn sizes, not drawn byte by byte.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import typing
from typing import Any

import msgpack
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from loracache.shared.errors import ErrorCode, LoraCacheError
from loracache.shared.protocol import (
    PROTOCOL_VERSION,
    REPLY_LIMITS,
    REQUEST_LIMITS,
    REQUEST_TYPES,
    Request,
    RequestFrame,
    UnpackLimits,
    decode_reply,
    decode_request,
    encode_error,
    encode_reply,
    encode_request,
)

FAST = settings(max_examples=100, deadline=None)
SLOW = settings(max_examples=25, deadline=None)  # each example builds a message of 64 KiB+

REQUEST_CODES = (ErrorCode.BAD_REQUEST, ErrorCode.VERSION_MISMATCH)
MSGPACK_STACK = 1024  # msgpack-python's own nesting limit (its C unpacker's stack)
INT_MIN, UINT_MAX = -(2**63), 2**64 - 1  # what msgpack can carry
PID_MIN, PID_MAX = -(2**31), 2**31 - 1  # pid_t


def pack(obj: Any, **options: Any) -> bytes:
    return msgpack.packb(obj, **{"use_bin_type": True, **options})


def pack_with(obj: Any, options: dict[str, Any]) -> bytes:
    """``pack`` with drawn options; a float beyond float32 goes out as float64 instead."""
    try:
        return pack(obj, **options)
    except OverflowError:
        return pack(obj, **{**options, "use_single_float": False})


def envelope(op: str = "stats", **fields: Any) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "id": 7, "op": op, "session": "tok", **fields}


@functools.cache
def hints(cls: type) -> dict[str, Any]:
    resolved = typing.get_type_hints(cls)
    return {f.name: resolved[f.name] for f in dataclasses.fields(cls)}


def matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` has the wire type of a request field (no bool for int, no int for
    bool or str)."""
    if hint is bool:
        return type(value) is bool
    if hint is int:
        return type(value) is int
    if hint is str:
        return type(value) is str
    raise NotImplementedError(f"no strategy for request fields of type {hint}; extend this test")


def check_frame(frame: Any) -> RequestFrame:
    """A decoded frame is well typed, and encodes back into itself."""
    assert isinstance(frame, RequestFrame)
    assert type(frame.id) is int and 0 <= frame.id <= UINT_MAX
    assert type(frame.session) is str
    request = frame.request
    assert type(request) is REQUEST_TYPES[request.op]
    for name, hint in hints(type(request)).items():
        assert matches(getattr(request, name), hint), (name, getattr(request, name))
    assert decode_request(encode_request(frame.id, frame.session, request)) == frame
    return frame


def check_refusal(exc: LoraCacheError) -> LoraCacheError:
    """A refusal is BAD_REQUEST / VERSION_MISMATCH, and the daemon's error reply for it (server.py
    ``_error_reply``: the id the error carries, else 0) decodes on the client to the same."""
    assert exc.code in REQUEST_CODES, exc
    assert isinstance(exc.message, str) and exc.message
    request_id = getattr(exc, "request_id", 0)
    assert type(request_id) is int and 0 <= request_id <= UINT_MAX
    reply_id, value = decode_reply(encode_error(request_id, exc))
    assert reply_id == request_id
    assert isinstance(value, LoraCacheError)
    assert (value.code, value.message) == (exc.code, exc.message)
    return exc


def decode_or_refuse(data: bytes) -> RequestFrame | LoraCacheError:
    try:
        frame = decode_request(data)
    except LoraCacheError as exc:
        return check_refusal(exc)
    return check_frame(frame)


def refused(data: bytes, decoder=decode_request) -> LoraCacheError:
    with pytest.raises(LoraCacheError) as info:
        decoder(data)
    assert info.value.code is ErrorCode.BAD_REQUEST, info.value
    return info.value


def reply_or_refuse(data: bytes) -> tuple[int, Any] | LoraCacheError:
    """``decode_reply`` returns ``(id, result)`` (an error reply as a LoraCacheError value) or
    raises LoraCacheError(BAD_REQUEST); nothing else."""
    try:
        reply_id, result = decode_reply(data)
    except LoraCacheError as exc:
        assert exc.code is ErrorCode.BAD_REQUEST, exc
        assert exc.message
        return exc
    assert isinstance(reply_id, int)
    if isinstance(result, LoraCacheError):
        assert isinstance(result.code, ErrorCode) and isinstance(result.message, str)
    return reply_id, result


# ------------------------------------------------------------------------------ strategies

KEYS = sorted({"v", "id", "op", "session", "result", "error", "ok", "code", "message",
               *(f.name for cls in REQUEST_TYPES.values() for f in dataclasses.fields(cls))})
OPS = sorted(REQUEST_TYPES)

ints = st.integers(INT_MIN, UINT_MAX) | st.sampled_from(
    [0, 1, -1, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, INT_MIN, UINT_MAX])
leaves = (st.none() | st.booleans() | ints | st.floats() | st.text(max_size=12)
          | st.binary(max_size=12) | st.sampled_from([*OPS, *KEYS, PROTOCOL_VERSION]))
# Keys msgpack can pack but the decoders refuse (strict_map_key), besides str and bytes.
keys = (st.sampled_from(KEYS) | st.text(max_size=6) | st.binary(max_size=4)
        | st.integers(-5, UINT_MAX) | st.booleans() | st.none() | st.floats(allow_nan=False))
str_keys = st.sampled_from(KEYS) | st.text(max_size=6)


def trees(key_strategy: st.SearchStrategy[Any] = keys, max_leaves: int = 40):
    return st.recursive(
        leaves,
        lambda children: st.lists(children, max_size=5)
        | st.dictionaries(key_strategy, children, max_size=6),
        max_leaves=max_leaves)


def wrap(value: Any, kinds: list[str]) -> Any:
    """``value`` inside one list or single-entry map per item of ``kinds``."""
    for kind in kinds:
        value = [value] if kind == "list" else {"k": value}
    return value


# A tree, sometimes pushed below the nesting limit of requests and of replies.
nested_trees = st.builds(wrap, trees(), st.lists(st.sampled_from(["list", "map"]), max_size=20))

# Maps shaped like requests, so the checks after the envelope see arbitrary values.
request_maps = st.builds(
    lambda base, fields, drop: {k: v for k, v in {**base, **fields}.items() if k not in drop},
    st.fixed_dictionaries({
        "v": st.just(PROTOCOL_VERSION) | leaves,
        "id": st.integers(0, UINT_MAX) | leaves,
        "op": st.sampled_from(OPS) | leaves,
        "session": st.text(max_size=8) | leaves,
    }),
    st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), nested_trees, max_size=6),
    st.sets(st.sampled_from(["v", "id", "op", "session"]), max_size=1))

pack_options = st.fixed_dictionaries({
    "use_bin_type": st.booleans(),  # False: bytes go out as (maybe not UTF-8) str
    "use_single_float": st.booleans(),
})


def _length_header(kind: int, width: int, limits: UnpackLimits):
    """msgpack type byte ``kind`` with a ``width``-byte length near or past ``limits``."""
    lengths = st.integers(0, 2 ** (8 * width) - 1) | st.sampled_from(
        [n for n in (0, 1, limits.max_str_len, limits.max_str_len + 1, limits.max_container_len,
                     limits.max_container_len + 1, limits.max_bytes, limits.max_bytes + 1,
                     2 ** (8 * width) - 1) if n < 2 ** (8 * width)])
    return lengths.map(lambda n: bytes([kind]) + n.to_bytes(width, "big"))


def token_streams(limits: UnpackLimits):
    """Concatenated msgpack fragments: type bytes, length headers, ext headers, valid scalars
    and containers, and raw bytes; this reaches more of the unpacker than uniform bytes."""
    token = st.one_of(
        st.integers(0, 255).map(lambda b: bytes([b])),
        st.integers(0x80, 0x9F).map(lambda b: bytes([b])),  # fixmap / fixarray headers
        st.sampled_from([(0xC4, 1), (0xC5, 2), (0xC6, 4), (0xD9, 1), (0xDA, 2), (0xDB, 4),
                         (0xDC, 2), (0xDD, 4), (0xDE, 2), (0xDF, 4), (0xC7, 1), (0xC8, 2),
                         (0xC9, 4)]).flatmap(lambda kw: _length_header(*kw, limits)),
        st.sampled_from([0xD4, 0xD5, 0xD6, 0xD7, 0xD8]).flatmap(  # fixext, with a type
            lambda kind: st.integers(-128, 127).map(lambda t: bytes([kind, t & 0xFF]))),
        leaves.map(pack),
        st.sampled_from([pack(k) for k in ("v", "id", "op", "session", "path", "lease")]),
        st.binary(max_size=8),
    )
    prefix = st.sampled_from([b"", pack(envelope())[:1], pack(envelope())[:-3],
                              encode_request(1, "s", REQUEST_TYPES["acquire"](path="a"))[:9]])
    return st.builds(lambda head, parts: head + b"".join(parts), prefix,
                     st.lists(token, max_size=25))


def _field_values(hint: Any) -> st.SearchStrategy[Any]:
    if hint is str:
        return st.text(max_size=40)
    if hint is int:
        # pid is the only int field; the daemon hands it to os.kill, so a "valid" one is a pid_t
        return st.integers(PID_MIN, PID_MAX)
    if hint is bool:
        return st.booleans()
    raise NotImplementedError(f"no strategy for request fields of type {hint}; extend this test")


valid_requests = st.one_of([
    st.builds(cls, **{name: _field_values(hint) for name, hint in hints(cls).items()})
    for cls in REQUEST_TYPES.values()])
request_ids = st.integers(0, UINT_MAX)
sessions = st.text(max_size=40)


# ---------------------------------------------------------------------- arbitrary input


@FAST
@given(st.binary(min_size=0, max_size=4096))
@example(b"")
@example(b"\x80")  # an empty map
def test_random_bytes_decode_or_are_refused(data: bytes) -> None:
    decode_or_refuse(data)


@FAST
@given(token_streams(REQUEST_LIMITS))
def test_msgpack_token_streams_decode_or_are_refused(data: bytes) -> None:
    decode_or_refuse(data)


@FAST
@given(nested_trees | request_maps, pack_options)
def test_arbitrary_msgpack_values_decode_or_are_refused(obj: Any, options: dict) -> None:
    decode_or_refuse(pack_with(obj, options))


@FAST
@given(st.dictionaries(keys, leaves, min_size=1, max_size=4), st.sampled_from(OPS))
def test_non_string_keys_anywhere_are_refused_or_ignored(extra: dict, op: str) -> None:
    """Keys other than str and bytes are refused as msgpack; bytes keys are unknown fields."""
    body = {**envelope(op, path="a", lease="L"), "extra": extra}
    outcome = decode_or_refuse(pack(body))
    if all(isinstance(k, (str, bytes)) for k in extra):
        assert isinstance(outcome, RequestFrame)
    else:
        assert isinstance(outcome, LoraCacheError) and "map key" in outcome.message


@st.composite
def damaged_requests(draw: st.DrawFn) -> bytes:
    """A valid encoded request, then up to 6 edits: bit flips, byte insertions, deletions of a
    range, duplications of a range, truncation, or a splice with another request."""
    raw = bytearray(encode_request(draw(request_ids), draw(sessions), draw(valid_requests)))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "duplicate", "truncate",
                                     "splice"]))
        at = draw(st.integers(0, len(raw)))
        if kind == "flip" and raw:
            raw[min(at, len(raw) - 1)] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            raw[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif kind == "delete":
            del raw[at:at + draw(st.integers(1, 8))]
        elif kind == "duplicate":
            raw[at:at] = raw[at:at + draw(st.integers(1, 16))]
        elif kind == "truncate":
            del raw[at:]
        elif kind == "splice":
            other = encode_request(draw(request_ids), draw(sessions), draw(valid_requests))
            raw[at:] = other[draw(st.integers(0, len(other))):]
    return bytes(raw)


@FAST
@given(damaged_requests())
def test_damaged_valid_requests_decode_or_are_refused(data: bytes) -> None:
    decode_or_refuse(data)


# -------------------------------------------------------------------------- valid requests


@FAST
@given(request_ids, sessions, valid_requests)
def test_valid_requests_round_trip_exactly(request_id: int, session: str,
                                          request: Request) -> None:
    frame = decode_request(encode_request(request_id, session, request))
    assert frame == RequestFrame(id=request_id, session=session, request=request)
    assert type(frame.request) is type(request)


@FAST
@given(request_ids, sessions, valid_requests,
       st.dictionaries(st.text(min_size=1, max_size=8).filter(lambda k: k not in KEYS),
                       trees(str_keys, max_leaves=10),
                       max_size=4))
def test_unknown_fields_with_any_value_are_ignored(request_id: int, session: str,
                                                  request: Request, extra: dict) -> None:
    body = msgpack.unpackb(encode_request(request_id, session, request))
    frame = decode_or_refuse(pack({**body, **extra}))
    if isinstance(frame, LoraCacheError):  # only for nesting too deep
        assert depth_of({**body, **extra}) > REQUEST_LIMITS.max_depth, frame
        assert "nested deeper" in frame.message
        return
    assert frame == RequestFrame(id=request_id, session=session, request=request)


@st.composite
def mistyped_fields(draw: st.DrawFn) -> tuple[bytes, str, int]:
    cls = draw(st.sampled_from(list(REQUEST_TYPES.values())).filter(lambda c: hints(c)))
    field, hint = draw(st.sampled_from(sorted(hints(cls).items(), key=lambda kv: kv[0])))
    valid = draw(st.builds(cls, **{n: _field_values(h) for n, h in hints(cls).items()}))
    value = draw(trees(str_keys, max_leaves=6).filter(lambda v: not matches(v, hint)))
    request_id = draw(request_ids)
    body = msgpack.unpackb(encode_request(request_id, "tok", valid))
    body[field] = value
    return pack(body), field, request_id


@FAST
@given(mistyped_fields())
def test_a_field_of_the_wrong_type_is_refused_naming_it(case: tuple[bytes, str, int]) -> None:
    data, field, request_id = case
    error = check_refusal(refused(data))
    if depth_of(msgpack.unpackb(data)) > REQUEST_LIMITS.max_depth:
        assert "nested deeper" in error.message
    else:
        assert repr(field) in error.message
        assert error.request_id == request_id  # type: ignore[attr-defined]


@FAST
@given(st.sampled_from(OPS), trees(str_keys, max_leaves=6).filter(lambda v: type(v) is not int)
       | st.sampled_from([0, 2, -1, PROTOCOL_VERSION + 1, UINT_MAX, INT_MIN]))
def test_any_version_but_1_is_a_version_mismatch(op: str, version: Any) -> None:
    body = {**envelope(op, path="a", lease="L"), "v": version}
    error = check_refusal(refused_with(pack(body)))
    if "nested deeper" not in error.message:
        assert error.code is ErrorCode.VERSION_MISMATCH
        assert error.request_id == 7  # type: ignore[attr-defined]


def refused_with(data: bytes) -> LoraCacheError:
    with pytest.raises(LoraCacheError) as info:
        decode_request(data)
    return info.value


# ---------------------------------------------------------------------------------- limits


def decoders() -> list[Any]:
    return [
        pytest.param(decode_request, REQUEST_LIMITS, lambda x: envelope(extra=x), id="request"),
        pytest.param(decode_reply, REPLY_LIMITS, lambda x: {"id": 7, "ok": True, "result": x},
                     id="reply"),
    ]


def depth_of(body: Any) -> int:
    if isinstance(body, dict):
        return 1 + max((depth_of(v) for v in body.values()), default=0)
    if isinstance(body, list):
        return 1 + max((depth_of(v) for v in body), default=0)
    return 0


@pytest.mark.parametrize("decoder, limits, place", decoders())
@FAST
@given(kinds=st.lists(st.sampled_from(["list", "map"]), max_size=24), leaf=leaves)
def test_nesting_is_refused_exactly_past_the_depth_limit(decoder, limits: UnpackLimits, place,
                                                        kinds: list[str], leaf: Any) -> None:
    body = place(wrap(leaf, kinds))
    data = pack(body)
    if depth_of(body) <= limits.max_depth:
        decoder(data)
    else:
        assert f"nested deeper than {limits.max_depth} levels" in refused(data, decoder).message


@pytest.mark.parametrize("decoder, limits, place", decoders())
@pytest.mark.parametrize("levels", [MSGPACK_STACK, MSGPACK_STACK + 1])
@pytest.mark.parametrize("container", [b"\x91", b"\x81\xa1k"], ids=["lists", "maps"])
def test_very_deep_nesting_is_refused_naming_the_depth_limit(decoder, limits, place,
                                                             levels: int,
                                                             container: bytes) -> None:
    """Past msgpack's own stack the refusal must still say what is wrong and what the limit is,
    like the refusal just past ``max_depth`` does."""
    message = refused(container * levels + b"\x00", decoder).message
    assert re.search(r"nest|deep", message), message
    assert str(limits.max_depth) in message, message


def _placed(limits_place, value: Any, where: str) -> Any:
    if where == "value":
        return limits_place(value)
    if where == "list":
        return limits_place([1, value])
    return limits_place({value: 1})  # a map key


@pytest.mark.parametrize("decoder, limits, place", decoders())
@SLOW
@given(delta=st.integers(-3, 3), char=st.sampled_from(["a", "é", "€", "😀"]),
       where=st.sampled_from(["value", "list", "key"]))
def test_strings_are_refused_exactly_past_max_str_len_bytes(decoder, limits: UnpackLimits, place,
                                                           delta: int, char: str,
                                                           where: str) -> None:
    width = len(char.encode())
    text = char * ((limits.max_str_len + delta * width) // width)
    data = pack(_placed(place, text, where))
    if len(text.encode()) <= limits.max_str_len:
        decoder(data)
    else:
        message = refused(data, decoder).message
        assert f"max_str_len({limits.max_str_len})" in message, message


@pytest.mark.parametrize("decoder, limits, place", decoders())
@pytest.mark.parametrize("kind, header, delta", [
    ("array", b"\xdd", 0), ("array", b"\xdd", 1), ("array", b"\xdd", 2**32 - 1),
    ("map", b"\xdf", 0), ("map", b"\xdf", 1), ("map", b"\xdf", 2**32 - 1),
], ids=["array-at", "array-over", "array-max", "map-at", "map-over", "map-max"])
def test_containers_are_refused_exactly_past_max_container_len(decoder, limits, place,
                                                               kind: str, header: bytes,
                                                               delta: int) -> None:
    """A container header past the limit is refused before its items are read; one of exactly
    the limit (items present) is accepted."""
    count = min(limits.max_container_len + delta, 2**32 - 1)
    item = b"\xc0" if kind == "array" else b"\xa0\xc0"  # nil, or "" -> nil
    marker = b"\xa6MARKER"
    template = pack(place("MARKER"))
    assert template.count(marker) == 1
    head, tail = template.split(marker)
    container = header + count.to_bytes(4, "big")
    if delta == 0:
        decoder(head + container + item * count + tail)
    else:
        message = refused(head + container + tail, decoder).message
        assert f"max_{kind}_len({limits.max_container_len})" in message, message


@pytest.mark.parametrize("decoder, limits, place, filler", [
    *(pytest.param(*case.values, "bin", id=f"{case.id}-bin") for case in decoders()),
    # A message made of many small strings: cheap for requests only (1 MiB, not 64).
    pytest.param(*decoders()[0].values, "str", id="request-str"),
])
@pytest.mark.parametrize("delta", [0, 1], ids=["at", "over"])
def test_messages_are_refused_exactly_past_max_bytes(decoder, limits, place, filler: str,
                                                     delta: int) -> None:
    """A message of exactly ``max_bytes`` is accepted, one byte more is refused naming the limit.
    Bins have no length limit of their own below the message's, so this is also theirs."""
    size = limits.max_bytes + delta

    def message(n: int) -> bytes:
        if filler == "bin":
            return pack(place(b"x" * n))
        return pack(place(["y" * min(n - i * 1000, 1000) for i in range(-(-n // 1000))]))

    n = size
    for _ in range(10):  # the headers' sizes depend on n: converge on the exact size
        data = message(n)
        if len(data) == size:
            break
        n += size - len(data)
    assert len(data) == size
    if len(data) <= limits.max_bytes:
        decoder(data)
    else:
        text = refused(data, decoder).message
        assert f"exceeds the limit of {limits.max_bytes}" in text, text


# --------------------------------------------------------------------------------- replies

reply_maps = st.fixed_dictionaries(
    {"id": st.integers(INT_MIN, UINT_MAX) | leaves, "ok": st.booleans() | leaves},
    optional={
        "result": trees(str_keys, max_leaves=20),
        "error": st.fixed_dictionaries(
            {}, optional={"code": st.sampled_from([c.value for c in ErrorCode]) | leaves,
                          "message": st.text(max_size=20) | leaves}) | leaves,
    })


@FAST
@given(st.binary(max_size=4096) | token_streams(REPLY_LIMITS))
def test_arbitrary_bytes_as_a_reply_give_a_result_or_loracache_error(data: bytes) -> None:
    reply_or_refuse(data)


@FAST
@given(nested_trees | reply_maps, pack_options)
def test_arbitrary_msgpack_as_a_reply_gives_a_result_or_loracache_error(obj: Any,
                                                                        options: dict) -> None:
    reply_or_refuse(pack_with(obj, options))


@FAST
@given(reply_maps)
def test_reply_maps_decode_by_their_id_and_ok_flag(body: dict[str, Any]) -> None:
    outcome = reply_or_refuse(pack(body))
    if not isinstance(body["id"], int):
        assert isinstance(outcome, LoraCacheError)
        return
    if isinstance(outcome, LoraCacheError):
        assert depth_of(body) > REPLY_LIMITS.max_depth, outcome
        return
    reply_id, value = outcome
    assert reply_id == body["id"]
    if body["ok"]:
        assert pack(value) == pack(body.get("result"))  # byte-equal: NaN-safe
        return
    assert isinstance(value, LoraCacheError)
    error = body.get("error")
    if isinstance(error, dict) and isinstance(error.get("code"), str) \
            and error["code"] in ErrorCode.__members__:
        assert value.code is ErrorCode[error["code"]]
    else:
        assert value.code is ErrorCode.INTERNAL


@FAST
@given(st.integers(0, UINT_MAX), trees(st.text(max_size=6), max_leaves=30).filter(
    lambda t: depth_of(t) <= REPLY_LIMITS.max_depth - 1))
def test_replies_round_trip(request_id: int, result: Any) -> None:
    reply_id, value = decode_reply(encode_reply(request_id, result))
    assert reply_id == request_id
    assert pack(value) == pack(result)  # byte-equal: NaN-safe, and keeps int vs float


@FAST
@given(st.integers(0, UINT_MAX), st.sampled_from(list(ErrorCode)), st.text(max_size=200))
def test_error_replies_round_trip(request_id: int, code: ErrorCode, message: str) -> None:
    reply_id, value = decode_reply(encode_error(request_id, LoraCacheError(code, message)))
    assert reply_id == request_id
    assert isinstance(value, LoraCacheError)
    assert (value.code, value.message) == (code, message)
