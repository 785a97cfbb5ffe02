"""Property-based fuzzing of the protocol decoders.

tests/shared/test_protocol.py already checks, with hypothesis, that short random bytes, random
msgpack trees and one-byte damage of the sample requests decode or raise BAD_REQUEST /
VERSION_MISMATCH. This file extends that:

* inputs that get deeper into msgspec's decoder: streams of msgpack type bytes and length
  headers around the limits, valid requests damaged by several insertions, deletions, bit flips
  and splices, trees with non-str keys, ext types, old-style raw strings, float32;
* what the daemon does with a refusal: the error reply it would send decodes on the client into
  the same code and message, matched to the request id;
* everything accepted is a well-typed request that encodes and decodes back to itself;
* every request and every result type round-trips for arbitrary field values, the requests
  also next to unknown fields of any content;
* a field of the wrong type is refused naming that field, a version other than the integer 1
  is VERSION_MISMATCH whatever else is wrong, an unreadable id is refused without an id;
* each limit (message size of requests and replies, MAX_TEXT_LEN of request strings) holds
  exactly at its boundary, and the refusal names the limit;
* nesting up to and past Python's recursion limit, in every field decoded as ``Any`` or
  skipped, is accepted or refused with a LoraCacheError, never a RecursionError;
* ``decode_reply`` on arbitrary input returns ``(id, result)``, where an error is a
  LoraCacheError value with a known code, or raises LoraCacheError; ``decode_result`` returns
  a well-typed result or raises BadRequest naming the result type; never anything else.

No HealthCheck is suppressed: the strategies draw small values, and the few large inputs
(limits at 8 KiB - 64 MiB) are built from drawn sizes, not drawn byte by byte.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import msgpack
import msgspec
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from loracache.shared.errors import BadRequest, ErrorCode, LoraCacheError
from loracache.shared.protocol import (
    MAX_REPLY_BYTES,
    MAX_REQUEST_BYTES,
    MAX_TEXT_LEN,
    PROTOCOL_VERSION,
    REQUEST_TYPES,
    AcquireResult,
    DeviceStats,
    Done,
    EntryInfo,
    LoadTimesInfo,
    Request,
    TensorSpec,
    decode_reply,
    decode_request,
    decode_result,
    encode_error,
    encode_reply,
    encode_request,
)

FAST = settings(max_examples=100, deadline=None)

REQUEST_CODES = (ErrorCode.BAD_REQUEST, ErrorCode.VERSION_MISMATCH)
INT_MIN, UINT_MAX = -(2**63), 2**64 - 1  # what msgpack can carry
ENVELOPE = ("v", "id", "session")  # Request's own fields, before each request's
RESULT_TYPES = sorted({cls.result_type for cls in REQUEST_TYPES.values()}
                      | {TensorSpec, LoadTimesInfo, DeviceStats}, key=lambda t: t.__name__)


def pack(obj: Any, **options: Any) -> bytes:
    return msgpack.packb(obj, **{"use_bin_type": True, **options})


def pack_with(obj: Any, options: dict[str, Any]) -> bytes:
    """``pack`` with drawn options; a float beyond float32 goes out as float64 instead."""
    try:
        return pack(obj, **options)
    except OverflowError:
        return pack(obj, **{**options, "use_single_float": False})


def envelope(op: str = "stats", **fields: Any) -> dict[str, Any]:
    return {"op": op, "v": PROTOCOL_VERSION, "id": 7, "session": "tok", **fields}


def names(message: str, field: str) -> bool:
    """Whether an error message points at ``field`` (msgspec says `$.field` or `field`)."""
    return any(form in message for form in (f"$.{field}", f"`{field}`", f"'{field}'"))


@functools.cache
def fields_of(cls: type) -> dict[str, msgspec.inspect.Field]:
    return {f.name: f for f in msgspec.inspect.type_info(cls).fields}


def matches(value: Any, t: msgspec.inspect.Type) -> bool:
    """Whether ``value`` is valid for a request field of type ``t`` (no bool for int, no int
    for bool or str, lengths and bounds included)."""
    if isinstance(t, msgspec.inspect.BoolType):
        return type(value) is bool
    if isinstance(t, msgspec.inspect.IntType):
        return type(value) is int and (t.ge is None or value >= t.ge) and value <= UINT_MAX
    if isinstance(t, msgspec.inspect.StrType):
        return type(value) is str and (t.max_length is None or len(value) <= t.max_length)
    if isinstance(t, msgspec.inspect.ListType):
        return (type(value) is list and (t.max_length is None or len(value) <= t.max_length)
                and all(matches(item, t.item_type) for item in value))
    raise NotImplementedError(f"no check for request fields of type {t}; extend this test")


def same(a: Any, b: Any) -> bool:
    """Equal as messages: same encoded bytes (NaN-safe, and int vs float vs bool kept)."""
    return msgspec.msgpack.encode(a) == msgspec.msgpack.encode(b)


def check_request(request: Any) -> Request:
    """A decoded request is well typed, and encodes back into itself."""
    assert isinstance(request, Request)
    assert type(request) is REQUEST_TYPES[request.op]
    assert request.v == PROTOCOL_VERSION
    for name, field in fields_of(type(request)).items():
        assert matches(getattr(request, name), field.type), (name, getattr(request, name))
    again = decode_request(encode_request(request.id, request.session, request))
    assert again == request and type(again) is type(request)
    return request


def check_refusal(exc: LoraCacheError) -> BadRequest:
    """A refusal is BAD_REQUEST / VERSION_MISMATCH, and the daemon's error reply for it (server.py
    ``_error_reply``: the id the error carries) decodes on the client to the same."""
    assert isinstance(exc, BadRequest), exc
    assert exc.code in REQUEST_CODES, exc
    assert isinstance(exc.message, str) and exc.message
    assert type(exc.request_id) is int and 0 <= exc.request_id <= UINT_MAX
    reply_id, value = decode_reply(encode_error(exc.request_id, exc))
    assert reply_id == exc.request_id
    assert isinstance(value, LoraCacheError)
    assert (value.code, value.message) == (exc.code, exc.message)
    return exc


def decode_or_refuse(data: bytes) -> Request | BadRequest:
    try:
        request = decode_request(data)
    except LoraCacheError as exc:
        return check_refusal(exc)
    return check_request(request)


def refused(data: bytes, decoder=decode_request,
            code: ErrorCode = ErrorCode.BAD_REQUEST) -> BadRequest:
    with pytest.raises(LoraCacheError) as info:
        decoder(data)
    assert isinstance(info.value, BadRequest), info.value
    assert info.value.code is code, info.value
    return info.value


def result_or_refuse(raw: msgspec.Raw, result_type: type) -> Any:
    """``decode_result`` gives a well-typed ``result_type`` that re-encodes to the same, or
    raises BadRequest(BAD_REQUEST) naming the type; nothing else."""
    try:
        result = decode_result(raw, result_type)
    except LoraCacheError as exc:
        assert isinstance(exc, BadRequest) and exc.code is ErrorCode.BAD_REQUEST, exc
        assert f"malformed {result_type.__name__}" in exc.message, exc.message
        return exc
    assert type(result) is result_type
    assert same(decode_result(msgspec.Raw(msgspec.msgpack.encode(result)), result_type), result)
    return result


def reply_or_refuse(data: bytes) -> tuple[int, Any] | BadRequest:
    """``decode_reply`` returns ``(id, result)`` (an error reply as a LoraCacheError value) or
    raises BadRequest(BAD_REQUEST); nothing else. A result is then read as every result type."""
    try:
        reply_id, result = decode_reply(data)
    except LoraCacheError as exc:
        assert isinstance(exc, BadRequest) and exc.code is ErrorCode.BAD_REQUEST, exc
        assert exc.message
        return exc
    assert type(reply_id) is int and INT_MIN <= reply_id <= UINT_MAX
    if isinstance(result, LoraCacheError):
        assert isinstance(result.code, ErrorCode) and isinstance(result.message, str)
    else:
        assert isinstance(result, msgspec.Raw)
        for result_type in RESULT_TYPES:
            result_or_refuse(result, result_type)
    return reply_id, result


# ------------------------------------------------------------------------------ strategies

KEYS = sorted({"op", "result", "error", "ok", "code", "message",
               *(f for cls in REQUEST_TYPES.values() for f in cls.__struct_fields__),
               *(f for cls in RESULT_TYPES for f in cls.__struct_fields__)})
OPS = sorted(REQUEST_TYPES)

ints = st.integers(INT_MIN, UINT_MAX) | st.sampled_from(
    [0, 1, -1, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, INT_MIN, UINT_MAX])
exts = (st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=9))
        | st.builds(msgpack.Timestamp, st.integers(0, 2**34 - 1), st.integers(0, 999_999_999)))
# What msgspec can encode too (no msgpack-python ext objects): for messages we encode.
plain_leaves = (st.none() | st.booleans() | ints | st.floats() | st.text(max_size=12)
                | st.binary(max_size=12) | st.sampled_from([*OPS, *KEYS, PROTOCOL_VERSION]))
leaves = plain_leaves | exts
# Keys msgpack can pack besides str: the decoders refuse them where a Struct is decoded.
keys = (st.sampled_from(KEYS) | st.text(max_size=6) | st.binary(max_size=4)
        | st.integers(-5, UINT_MAX) | st.booleans() | st.none() | st.floats(allow_nan=False))
str_keys = st.sampled_from(KEYS) | st.text(max_size=6)


def trees(key_strategy: st.SearchStrategy[Any] = keys, max_leaves: int = 40,
          leaf: st.SearchStrategy[Any] = leaves):
    return st.recursive(
        leaf,
        lambda children: st.lists(children, max_size=5)
        | st.dictionaries(key_strategy, children, max_size=6),
        max_leaves=max_leaves)


def wrap(value: Any, kinds: list[str]) -> Any:
    """``value`` inside one list or single-entry map per item of ``kinds``."""
    for kind in kinds:
        value = [value] if kind == "list" else {"k": value}
    return value


# A tree, sometimes pushed a few dozen levels deeper (far below Python's recursion limit).
nested_trees = st.builds(wrap, trees(), st.lists(st.sampled_from(["list", "map"]), max_size=40))

# Maps shaped like requests, so the checks after the envelope see arbitrary values.
request_maps = st.builds(
    lambda base, fields, drop: {k: v for k, v in {**base, **fields}.items() if k not in drop},
    st.fixed_dictionaries({
        "op": st.sampled_from(OPS) | leaves,
        "v": st.just(PROTOCOL_VERSION) | leaves,
        "id": st.integers(0, UINT_MAX) | leaves,
        "session": st.text(max_size=8) | leaves,
    }),
    st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), nested_trees, max_size=6),
    st.sets(st.sampled_from(["op", "v", "id", "session"]), max_size=1))

pack_options = st.fixed_dictionaries({
    "use_bin_type": st.booleans(),  # False: bytes go out as (maybe not UTF-8) str
    "use_single_float": st.booleans(),
})


def _length_header(kind: int, width: int):
    """msgpack type byte ``kind`` with a ``width``-byte length near or past the limits."""
    top = 2 ** (8 * width) - 1
    lengths = st.integers(0, top) | st.sampled_from(
        [n for n in (0, 1, MAX_TEXT_LEN, MAX_TEXT_LEN + 1, MAX_REQUEST_BYTES,
                     MAX_REQUEST_BYTES + 1, MAX_REPLY_BYTES, MAX_REPLY_BYTES + 1, top)
         if n <= top])
    return lengths.map(lambda n: bytes([kind]) + n.to_bytes(width, "big"))


def token_streams():
    """Concatenated msgpack fragments: type bytes, length headers, ext headers, valid scalars
    and containers, and raw bytes; this reaches more of the decoder than uniform bytes."""
    token = st.one_of(
        st.integers(0, 255).map(lambda b: bytes([b])),
        st.integers(0x80, 0x9F).map(lambda b: bytes([b])),  # fixmap / fixarray headers
        st.sampled_from([(0xC4, 1), (0xC5, 2), (0xC6, 4), (0xD9, 1), (0xDA, 2), (0xDB, 4),
                         (0xDC, 2), (0xDD, 4), (0xDE, 2), (0xDF, 4), (0xC7, 1), (0xC8, 2),
                         (0xC9, 4)]).flatmap(lambda kw: _length_header(*kw)),
        st.sampled_from([0xD4, 0xD5, 0xD6, 0xD7, 0xD8]).flatmap(  # fixext, with a type
            lambda kind: st.integers(-128, 127).map(lambda t: bytes([kind, t & 0xFF]))),
        leaves.map(pack),
        st.sampled_from([pack(k) for k in ("op", "v", "id", "session", "path", "lease", "ok",
                                           "result", "error", "code", "message", "tensors")]),
        st.binary(max_size=8),
    )
    prefix = st.sampled_from([
        b"", pack(envelope())[:1], pack(envelope())[:-3],
        encode_request(1, "s", REQUEST_TYPES["acquire"](path="a"))[:12],
        encode_reply(1, {"k": 1})[:-3], encode_error(1, LoraCacheError("NOT_FOUND", "m"))[:9]])
    return st.builds(lambda head, parts: head + b"".join(parts), prefix,
                     st.lists(token, max_size=25))


def values_of(t: msgspec.inspect.Type) -> st.SearchStrategy[Any]:
    """Valid values of a message field of type ``t`` (small, but over the whole range)."""
    i = msgspec.inspect
    if isinstance(t, i.BoolType):
        return st.booleans()
    if isinstance(t, i.IntType):
        return st.integers(INT_MIN if t.ge is None else t.ge, UINT_MAX)
    if isinstance(t, i.FloatType):
        return st.floats()
    if isinstance(t, i.StrType):
        return st.text(max_size=min(40, t.max_length or 40))
    if isinstance(t, i.NoneType):
        return st.none()
    if isinstance(t, i.AnyType):
        return trees(str_keys, max_leaves=8, leaf=plain_leaves)
    if isinstance(t, i.ListType):
        return st.lists(values_of(t.item_type), max_size=4)
    if isinstance(t, i.TupleType):
        return st.tuples(*map(values_of, t.item_types))
    if isinstance(t, i.DictType):
        return st.dictionaries(values_of(t.key_type), values_of(t.value_type), max_size=4)
    if isinstance(t, i.UnionType):
        return st.one_of(*map(values_of, t.types))
    if isinstance(t, i.StructType):
        return st.builds(t.cls, **{f.name: values_of(f.type) for f in t.fields
                                   if f.name not in ENVELOPE or not issubclass(t.cls, Request)})
    raise NotImplementedError(f"no strategy for message fields of type {t}; extend this test")


def messages(cls: type) -> st.SearchStrategy[Any]:
    return values_of(msgspec.inspect.type_info(cls))


valid_requests = st.one_of([messages(cls) for cls in REQUEST_TYPES.values()])
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
@given(token_streams())
def test_msgpack_token_streams_decode_or_are_refused(data: bytes) -> None:
    decode_or_refuse(data)


@FAST
@given(nested_trees | request_maps, pack_options)
def test_arbitrary_msgpack_values_decode_or_are_refused(obj: Any, options: dict) -> None:
    decode_or_refuse(pack_with(obj, options))


@FAST
@given(st.dictionaries(keys, trees(max_leaves=6), min_size=1, max_size=4), valid_requests)
def test_keys_of_any_type_inside_an_unknown_field_are_ignored(extra: dict,
                                                              request: Request) -> None:
    """Only the request's own map must have str keys: what an unknown field holds is skipped
    unread."""
    body = msgpack.unpackb(encode_request(7, "tok", request))
    decoded = decode_or_refuse(pack({**body, "extra": extra}))
    assert decoded == msgspec.structs.replace(request, id=7, session="tok")


@FAST
@given(st.dictionaries(keys.filter(lambda k: k not in KEYS), leaves, min_size=1, max_size=4),
       valid_requests)
def test_top_level_keys_that_are_not_str_are_refused(extra: dict, request: Request) -> None:
    """A request is a map of field names: str keys are unknown fields, any other key (bin
    included) makes it no request at all."""
    body = msgpack.unpackb(encode_request(7, "tok", request))
    outcome = decode_or_refuse(pack({**body, **extra}))
    if all(type(k) is str for k in extra):
        assert outcome == msgspec.structs.replace(request, id=7, session="tok")
    else:
        assert isinstance(outcome, BadRequest) and outcome.code is ErrorCode.BAD_REQUEST


@st.composite
def damaged(draw: st.DrawFn, encoded: st.SearchStrategy[bytes]) -> bytes:
    """A valid encoded message, then up to 6 edits: bit flips, byte insertions, deletions of a
    range, duplications of a range, truncation, or a splice with another message."""
    raw = bytearray(draw(encoded))
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
            other = draw(encoded)
            raw[at:] = other[draw(st.integers(0, len(other))):]
    return bytes(raw)


encoded_requests = st.builds(encode_request, request_ids, sessions, valid_requests)


@FAST
@given(damaged(encoded_requests))
def test_damaged_valid_requests_decode_or_are_refused(data: bytes) -> None:
    decode_or_refuse(data)


# -------------------------------------------------------------------------- valid requests


@FAST
@given(request_ids, sessions, valid_requests)
def test_valid_requests_round_trip_exactly(request_id: int, session: str,
                                          request: Request) -> None:
    decoded = decode_request(encode_request(request_id, session, request))
    assert decoded == msgspec.structs.replace(request, id=request_id, session=session)
    assert type(decoded) is type(request)
    check_request(decoded)


@FAST
@given(request_ids, sessions, valid_requests,
       st.dictionaries(st.text(min_size=1, max_size=8).filter(lambda k: k not in KEYS),
                       st.builds(wrap, trees(max_leaves=10),
                                 st.lists(st.sampled_from(["list", "map"]), max_size=40)),
                       max_size=3),
       pack_options)
def test_unknown_fields_with_any_value_are_ignored(request_id: int, session: str,
                                                  request: Request, extra: dict,
                                                  options: dict) -> None:
    """Whatever a newer peer puts in a field this version does not know (any keys, ext types,
    raw strings that are not UTF-8, dozens of levels deep), the request still decodes."""
    body = msgpack.unpackb(encode_request(request_id, session, request))
    decoded = decode_or_refuse(pack_with({**body, **extra}, options))
    assert decoded == msgspec.structs.replace(request, id=request_id, session=session)


@st.composite
def mistyped_fields(draw: st.DrawFn) -> tuple[bytes, str, int]:
    """A valid request with one field (its own, or the session) replaced by a wrong value."""
    request = draw(valid_requests)
    types = {n: f.type for n, f in fields_of(type(request)).items() if n not in ("v", "id")}
    field = draw(st.sampled_from(sorted(types)))
    value = draw(trees(str_keys, max_leaves=6).filter(lambda v: not matches(v, types[field])))
    request_id = draw(request_ids)
    body = msgpack.unpackb(encode_request(request_id, "tok", request))
    body[field] = value
    return pack(body), field, request_id


@FAST
@given(mistyped_fields())
def test_a_field_of_the_wrong_type_is_refused_naming_it(case: tuple[bytes, str, int]) -> None:
    data, field, request_id = case
    error = check_refusal(refused(data))
    assert names(error.message, field), error.message
    assert error.request_id == request_id


MISSING = object()  # a field left out of the message


@FAST
@given(st.sampled_from(OPS) | leaves,
       trees(str_keys, max_leaves=6).filter(lambda v: type(v) is not int)
       | st.sampled_from([0, 2, -1, PROTOCOL_VERSION + 1, UINT_MAX, INT_MIN, True, 1.0, "1",
                          None, MISSING]),
       st.dictionaries(st.sampled_from(KEYS).filter(lambda k: k not in ("v", "id")),
                       trees(str_keys, max_leaves=6), max_size=3))
def test_any_version_but_1_is_a_version_mismatch(op: Any, version: Any, fields: dict) -> None:
    """Whatever else the request holds (an unknown op, fields of any type): another version's
    messages may differ in anything but the id and the version. True and 1.0 equal 1 in
    Python, not on the wire."""
    body = {**envelope(), **fields, "op": op, "v": version}
    if version is MISSING:
        del body["v"]
    error = check_refusal(refused(pack(body), code=ErrorCode.VERSION_MISMATCH))
    assert error.request_id == 7
    assert f"v{PROTOCOL_VERSION}" in error.message


@FAST
@given(st.sampled_from(OPS), trees(str_keys, max_leaves=6).filter(
    lambda v: not (type(v) is int and 0 <= v <= UINT_MAX))
    | st.sampled_from([-1, INT_MIN, True, False, 1.0, "1", None, MISSING]))
def test_an_id_that_is_not_an_unsigned_integer_is_refused_without_id(op: str,
                                                                     request_id: Any) -> None:
    body = {**envelope(op, path="a", lease="L"), "id": request_id}
    if request_id is MISSING:
        del body["id"]
    error = check_refusal(refused(pack(body)))
    assert names(error.message, "id"), error.message
    assert error.request_id == 0


# ---------------------------------------------------------------------------------- limits

TEXT_FIELDS = sorted((op, name) for op, cls in REQUEST_TYPES.items()
                     for name, field in fields_of(cls).items()
                     if isinstance(field.type, msgspec.inspect.StrType))


@FAST
@given(st.sampled_from(TEXT_FIELDS), st.integers(-3, 3),
       st.sampled_from(["a", "é", "€", "😀"]))
def test_request_strings_are_refused_exactly_past_max_text_len(case: tuple[str, str],
                                                               delta: int, char: str) -> None:
    """Every str field of every request, the session included: the cap counts characters
    (code points), whatever their width in UTF-8."""
    op, field = case
    text = char * (MAX_TEXT_LEN + delta)
    body = envelope(op, path="p", lease="L", paths=["p"])
    body[field] = text
    if len(text) <= MAX_TEXT_LEN:
        assert getattr(check_request(decode_request(pack(body))), field) == text
    else:
        error = check_refusal(refused(pack(body)))
        assert names(error.message, field) and str(MAX_TEXT_LEN) in error.message, error.message
        assert error.request_id == 7


@pytest.mark.parametrize("value", ["x" * (MAX_TEXT_LEN + 1), "é" * 100_000,
                                   ["y" * MAX_TEXT_LEN] * 8, b"z" * 500_000],
                         ids=["str", "long-str", "list-of-str", "bin"])
def test_unknown_fields_are_bounded_only_by_the_message_size(value: Any) -> None:
    """MAX_TEXT_LEN is a property of the typed fields: what is skipped costs no memory."""
    assert decode_request(pack(envelope(later=value))) == REQUEST_TYPES["stats"](
        id=7, session="tok")


def test_result_strings_are_not_capped_at_max_text_len() -> None:
    """MAX_TEXT_LEN guards the daemon; the daemon's own answers are bounded by the reply size."""
    path = "p" * (MAX_TEXT_LEN * 4)
    entry = EntryInfo(id="e", path=path, device="cpu", layout="raw", nbytes=1)
    assert decode_result(decode_reply(encode_reply(1, entry))[1], EntryInfo) == entry


def _sized(size: int, build) -> bytes:
    """``build(n)`` for the n that makes it exactly ``size`` bytes (headers grow with n)."""
    n = size
    for _ in range(10):
        data = build(n)
        if len(data) == size:
            return data
        n += size - len(data)
    raise AssertionError(f"no message of exactly {size} bytes")


def _strings(n: int) -> list[str]:
    return ["y" * min(n - i * 1000, 1000) for i in range(-(-n // 1000))]


@pytest.mark.parametrize("filler", ["bin", "str"])
@pytest.mark.parametrize("delta", [0, 1], ids=["at", "over"])
def test_requests_are_refused_exactly_past_max_request_bytes(filler: str, delta: int) -> None:
    """A request of exactly MAX_REQUEST_BYTES is accepted, one byte more is refused naming the
    limit. Nothing else bounds a bin or a list of strings in an unknown field."""
    size = MAX_REQUEST_BYTES + delta
    data = _sized(size, lambda n: pack(envelope(
        padding=b"x" * n if filler == "bin" else _strings(n))))
    if delta == 0:
        assert decode_request(data) == REQUEST_TYPES["stats"](id=7, session="tok")
    else:
        message = check_refusal(refused(data)).message
        assert f"exceeds the limit of {MAX_REQUEST_BYTES}" in message, message


@pytest.mark.parametrize("delta", [0, 1], ids=["at", "over"])
def test_replies_are_refused_exactly_past_max_reply_bytes(delta: int) -> None:
    head = pack({"id": 7, "ok": True, "result": None})[:-1] + b"\xc6"  # "result": bin32
    n = MAX_REPLY_BYTES + delta - len(head) - 4
    data = head + n.to_bytes(4, "big") + b"x" * n
    assert len(data) == MAX_REPLY_BYTES + delta
    if delta == 0:
        reply_id, raw = decode_reply(data)
        assert reply_id == 7 and isinstance(raw, msgspec.Raw)
        assert len(raw) == n + 5
    else:
        message = refused(data, decode_reply).message
        assert f"exceeds the limit of {MAX_REPLY_BYTES}" in message, message


# --------------------------------------------------------------------------------- nesting

CONTAINERS = {"lists": b"\x91", "maps": b"\x81\xa1k"}


def _map(*pairs: tuple[str, bytes]) -> bytes:
    """A msgpack map of str keys to already-encoded values (a fixmap: at most 15 pairs)."""
    return bytes([0x80 | len(pairs)]) + b"".join(pack(k) + v for k, v in pairs)


def _request_with(slot: str, value: bytes) -> bytes:
    pairs = {"op": pack("acquire"), "v": pack(1), "id": pack(7), "session": pack("tok"),
             "path": pack("p"), slot: value}
    return _map(*pairs.items())


def _reply_with(slot: str, value: bytes) -> bytes:
    if slot in ("message", "code"):
        return _map(("id", pack(7)), ("ok", pack(False)), ("error", _map((slot, value))))
    return _map(("id", pack(7)), ("ok", pack(slot == "result")), (slot, value))


def _result_with(slot: str, value: bytes) -> bytes:
    body = msgspec.to_builtins(AcquireResult(
        lease="L", entry=EntryInfo(id="e", path="p", device="cpu", layout="raw", nbytes=1),
        handle={}, tensors=None))
    pairs = [(k, pack(v)) for k, v in body.items() if k != "handle"]
    handle = _map(("k", value)) if slot == "handle" else pack({})
    return _map(*pairs, ("handle", handle), *([(slot, value)] if slot != "handle" else []))


def _reply_result(data: bytes) -> None:
    """What the client does with a reply: match the id, then read the result as its type."""
    _, value = decode_reply(data)
    if isinstance(value, msgspec.Raw):
        decode_result(value, Done)


# Every place a nested value can sit: decoded as Any (op, v, a reply's error, the handle),
# skipped (unknown fields, an ok reply's result until read), or typed (the rest: refused at
# the first level). The flag: whether the outcome changes where msgspec runs out of stack.
SLOTS = [
    *(pytest.param(decode_request, functools.partial(_request_with, slot), nested,
                   id=f"request-{slot}")
      for slot, nested in [("op", True), ("v", True), ("id", False), ("session", False),
                           ("path", False), ("later", True)]),
    *(pytest.param(decode_reply, functools.partial(_reply_with, slot), True, id=f"reply-{slot}")
      for slot in ("error", "message", "code", "result", "later")),
    pytest.param(_reply_result, functools.partial(_reply_with, "result"), False,
                 id="reply-result-read"),
    *(pytest.param(lambda data: decode_result(msgspec.Raw(data), AcquireResult),
                   functools.partial(_result_with, slot), nested, id=f"result-{slot}")
      for slot, nested in [("handle", True), ("later", True), ("tensors", False)]),
]


def _outcome(decoder, data: bytes) -> tuple[ErrorCode, int] | None:
    """None when ``decoder`` accepted ``data``, else the refusal's code and request id; any
    exception but LoraCacheError propagates."""
    try:
        decoder(data)
    except LoraCacheError as exc:
        assert exc.code in REQUEST_CODES and exc.message
        return exc.code, getattr(exc, "request_id", 0)
    return None


def _nested(container: str, depth: int) -> bytes:
    return CONTAINERS[container] * depth + b"\x00"


# Deeper than any stack: as deep as a request may be (1 MiB), at one or three bytes a level.
ABSURD = {name: (MAX_REQUEST_BYTES - 100) // len(head) for name, head in CONTAINERS.items()}


@pytest.mark.parametrize("decoder, build, nested", SLOTS)
@pytest.mark.parametrize("container", sorted(CONTAINERS))
def test_pathological_nesting_is_refused(decoder, build, nested: bool, container: str) -> None:
    assert _outcome(decoder, build(_nested(container, ABSURD[container]))) is not None


@pytest.mark.parametrize("decoder, build, nested",
                         [slot for slot in SLOTS if slot.values[2]])
@pytest.mark.parametrize("container", sorted(CONTAINERS))
def test_nesting_around_the_recursion_limit_never_escapes_as_recursion_error(
        decoder, build, nested: bool, container: str) -> None:
    """msgspec recurses per level and turns running out into RecursionError, which the
    decoders must refuse; a value decoded just below that depth must not then overflow in the
    decoder's own code (a repr in an error message, say). So: find the depth where the outcome
    turns into the refusal of absurd nesting, and try every depth around it."""
    def outcome(depth: int) -> tuple[ErrorCode, int] | None:
        return _outcome(decoder, build(_nested(container, depth)))

    deep = outcome(ABSURD[container])
    assert deep == (ErrorCode.BAD_REQUEST, 0)  # the id may be past the nesting: not read
    low, high = 0, ABSURD[container]
    assert outcome(low) != deep
    while high - low > 1:  # outcome(low) != deep == outcome(high)
        middle = (low + high) // 2
        low, high = (low, middle) if outcome(middle) == deep else (middle, high)
    for depth in range(max(0, high - 40), high + 20):
        outcome(depth)


@FAST
@given(st.integers(0, 3 * sys.getrecursionlimit()), st.sampled_from(sorted(CONTAINERS)),
       valid_requests)
def test_nested_unknown_fields_are_ignored_until_too_deep_to_skip(depth: int, container: str,
                                                                  request: Request) -> None:
    """Moderate nesting is ignored like any unknown field; only depths near the recursion
    limit may be refused, and then as BAD_REQUEST."""
    body = encode_request(7, "tok", request)
    data = bytes([body[0] + 1]) + body[1:] + pack("later") \
        + CONTAINERS[container] * depth + b"\x00"
    outcome = decode_or_refuse(data)
    if depth <= 200:
        assert outcome == msgspec.structs.replace(request, id=7, session="tok")
    elif isinstance(outcome, BadRequest):
        assert outcome.code is ErrorCode.BAD_REQUEST and depth > 500, (depth, outcome)


# --------------------------------------------------------------------------------- replies

reply_maps = st.fixed_dictionaries(
    {"id": st.integers(INT_MIN, UINT_MAX) | leaves, "ok": st.booleans() | leaves},
    optional={
        "result": trees(str_keys, max_leaves=20),
        "error": st.fixed_dictionaries(
            {}, optional={"code": st.sampled_from([c.value for c in ErrorCode]) | leaves,
                          "message": st.text(max_size=20) | leaves}) | leaves,
        "later": trees(max_leaves=6),
    })


@FAST
@given(st.binary(max_size=4096) | token_streams())
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
    data = pack(body)
    outcome = reply_or_refuse(data)
    if type(body["id"]) is not int or type(body["ok"]) is not bool:
        assert isinstance(outcome, BadRequest), outcome
        return
    assert not isinstance(outcome, BadRequest), outcome
    reply_id, value = outcome
    assert reply_id == body["id"]
    if body["ok"]:
        assert bytes(value) == (pack(body["result"]) if "result" in body else b"")
    else:
        check_error_value(value, body.get("error"))


def has_ext(value: Any) -> bool:
    if isinstance(value, (msgpack.ExtType, msgpack.Timestamp)):
        return True
    if isinstance(value, dict):
        return any(has_ext(k) or has_ext(v) for k, v in value.items())
    return isinstance(value, list) and any(map(has_ext, value))


def check_error_value(value: Any, error: Any) -> None:
    """The LoraCacheError the client gets for an error reply whose error body is ``error``."""
    assert isinstance(value, LoraCacheError)
    if isinstance(error, dict):
        code, message = error.get("code"), error.get("message", "")
        assert value.code is (ErrorCode[code] if isinstance(code, str)
                              and code in ErrorCode.__members__ else ErrorCode.INTERNAL)
        if isinstance(message, str):
            assert value.message == message
        else:  # named briefly: a repr of any nesting a peer sent could overflow the stack
            assert isinstance(value.message, str) and len(value.message) <= 40
    else:
        assert value.code is ErrorCode.INTERNAL
        assert "malformed error reply" in value.message


error_bodies = st.fixed_dictionaries(
    {}, optional={"code": st.sampled_from([c.value for c in ErrorCode]) | st.text(max_size=20)
                  | leaves, "message": st.text(max_size=20) | leaves,
                  "later": trees(max_leaves=4)}) | trees(str_keys, max_leaves=6)


@FAST
@given(st.integers(INT_MIN, UINT_MAX), error_bodies)
def test_any_error_body_gives_a_loracache_error_with_a_known_code(request_id: int,
                                                                 error: Any) -> None:
    """Whatever a daemon (of another version, or a buggy one) says went wrong, the client gets
    an error it can raise: a known code (INTERNAL when it is not one) and a str message."""
    reply_id, value = decode_reply(pack({"id": request_id, "ok": False, "error": error}))
    assert reply_id == request_id
    check_error_value(value, error)


@FAST
@given(st.integers(INT_MIN, UINT_MAX),
       st.dictionaries(st.text(max_size=6), trees(st.text(max_size=6), 10, plain_leaves),
                       max_size=4))
def test_replies_round_trip(request_id: int, result: dict[str, Any]) -> None:
    reply_id, raw = decode_reply(encode_reply(request_id, result))
    assert reply_id == request_id
    assert isinstance(raw, msgspec.Raw)
    assert pack(msgpack.unpackb(bytes(raw))) == pack(result)  # NaN-safe, keeps int vs float


@FAST
@given(st.integers(0, UINT_MAX), st.sampled_from(list(ErrorCode)), st.text(max_size=200))
def test_error_replies_round_trip(request_id: int, code: ErrorCode, message: str) -> None:
    reply_id, value = decode_reply(encode_error(request_id, LoraCacheError(code, message)))
    assert reply_id == request_id
    assert isinstance(value, LoraCacheError)
    assert (value.code, value.message) == (code, message)


# --------------------------------------------------------------------------------- results


@FAST
@given(st.integers(0, UINT_MAX), st.one_of([messages(t) for t in RESULT_TYPES]))
def test_every_result_type_round_trips_for_any_values(request_id: int, result: Any) -> None:
    reply_id, raw = decode_reply(encode_reply(request_id, result))
    assert reply_id == request_id
    decoded = decode_result(raw, type(result))
    assert type(decoded) is type(result)
    assert same(decoded, result)


@FAST
@given(damaged(st.builds(encode_reply, st.integers(0, UINT_MAX),
                         st.one_of([messages(t) for t in RESULT_TYPES]))))
def test_damaged_result_replies_give_a_result_or_loracache_error(data: bytes) -> None:
    reply_or_refuse(data)


@FAST
@given(trees(max_leaves=20) | nested_trees, st.sampled_from(RESULT_TYPES), pack_options)
def test_any_value_as_a_result_decodes_or_is_refused(value: Any, result_type: type,
                                                     options: dict) -> None:
    result_or_refuse(msgspec.Raw(pack_with(value, options)), result_type)


@st.composite
def mistyped_results(draw: st.DrawFn) -> tuple[bytes, type, str]:
    """A valid result (a map) with one field replaced by a value no field type accepts."""
    result_type = draw(st.sampled_from([t for t in RESULT_TYPES
                                        if t.__struct_fields__ and t is not TensorSpec]))
    body = msgspec.to_builtins(draw(messages(result_type)))
    field = draw(st.sampled_from(sorted(body)))
    body[field] = draw(exts | st.lists(exts, min_size=1, max_size=2).map(lambda v: [[v]]))
    return pack(body), result_type, field


@FAST
@given(mistyped_results())
def test_a_result_field_of_the_wrong_type_is_refused_naming_it(
        case: tuple[bytes, type, str]) -> None:
    data, result_type, field = case
    error = result_or_refuse(msgspec.Raw(data), result_type)
    assert isinstance(error, BadRequest), error
    assert names(error.message, field), error.message
