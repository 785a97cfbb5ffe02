"""The safetensors header reader: real files parse exactly, malformed ones get INVALID_LORA."""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from loracache.shared.dtypes import ITEM_SIZES, TORCH_DTYPES
from loracache.shared.errors import ErrorCode, LoraCacheError
from loracache.shared.safetensors_header import (
    MAX_DIMS,
    MAX_HEADER_BYTES,
    SafetensorsHeader,
    read_header,
)

DTYPE_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}


def write_raw(path: Path, header: dict[str, Any] | bytes, data: bytes = b"",
              header_len: int | None = None) -> Path:
    """A safetensors-shaped file built by hand: length prefix, header bytes, data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(raw) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", length) + raw + data)
    return path


def entry(dtype: Any = "F16", shape: Any = (2,), offsets: Any = (0, 4)) -> dict[str, Any]:
    return {"dtype": dtype,
            "shape": list(shape) if isinstance(shape, tuple) else shape,
            "data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets}


def parse(path: Path, name: str = "") -> SafetensorsHeader:
    with open(path, "rb") as f:
        return read_header(f, name)


def invalid(path: Path) -> str:
    with pytest.raises(LoraCacheError) as info:
        parse(path)
    assert info.value.code is ErrorCode.INVALID_LORA
    return info.value.message


def as_bytes(t: torch.Tensor) -> bytes:
    if t.numel() == 0:
        return b""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


# ------------------------------------------------------------------------------ valid files

VALID = {
    "fp16": {"a.lora_down.weight": torch.randn(4, 33).half(),
             "a.lora_up.weight": torch.randn(17, 4).half()},
    "bf16": {"w.lora_A.weight": torch.randn(8, 7).bfloat16(),
             "w.lora_B.weight": torch.randn(7, 8).bfloat16()},
    "fp32": {"conv.lora_down.weight": torch.randn(4, 3, 3, 3),
             "conv.lora_up.weight": torch.randn(5, 4, 1, 1)},
    "mixed": {"h": torch.randn(3, 5).half(), "b": torch.randn(9).bfloat16(),
              "f": torch.randn(2, 2), "d": torch.randn(3).double(),
              "i": torch.arange(5), "u": torch.arange(7, dtype=torch.uint8),
              "m": torch.tensor([True, False, True]),
              "e4": torch.randn(6).to(torch.float8_e4m3fn)},
    "zero-dim": {"a.alpha": torch.tensor(8.0), "a.lora_down.weight": torch.randn(2, 3).half()},
    "zero-size": {"empty": torch.empty(0, 4).half(), "full": torch.randn(3).half(),
                  "also_empty": torch.empty(5, 0, dtype=torch.float32)},
}


@pytest.mark.parametrize("case", sorted(VALID))
def test_saved_file_parses_to_its_tensors(tmp_path: Path, case: str) -> None:
    tensors = VALID[case]
    path = tmp_path / "lora.safetensors"
    save_file(tensors, str(path))
    header = parse(path)

    content = path.read_bytes()
    assert header.file_size == len(content)
    assert header.metadata == {}
    assert sorted(t.name for t in header.tensors) == sorted(tensors)
    assert [t.begin for t in header.tensors] == sorted(t.begin for t in header.tensors)
    for record in header.tensors:
        tensor = tensors[record.name]
        assert record.dtype == DTYPE_NAMES[tensor.dtype]
        assert record.shape == tuple(tensor.shape)
        assert record.nbytes == tensor.numel() * tensor.element_size()
        assert content[record.begin:record.end] == as_bytes(tensor)


def test_metadata_is_returned(tmp_path: Path) -> None:
    path = tmp_path / "lora.safetensors"
    metadata = {"format": "pt", "ss_network_alpha": "8", "note": "ünïcode"}
    save_file({"w": torch.ones(2)}, str(path), metadata=metadata)
    header = parse(path)
    assert header.metadata == metadata
    assert [t.name for t in header.tensors] == ["w"]


def test_first_tensor_starts_right_after_the_header(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "f", {"w": entry("F32", (1,), (0, 4))}, b"\x00\x00\x80\x3f")
    (record,) = parse(path).tensors
    header_len = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert (record.begin, record.end) == (8 + header_len, 8 + header_len + 4)


def test_max_dims_is_accepted(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "f", {"w": entry("F16", (1,) * MAX_DIMS, (0, 2))}, b"\x00\x00")
    assert parse(path).tensors[0].shape == (1,) * MAX_DIMS


def test_zero_size_tensor_listed_after_a_tensor_at_the_same_offset(tmp_path: Path) -> None:
    """An empty tensor shares its offset with its neighbour without overlapping it."""
    path = write_raw(tmp_path / "f", {"a": entry("F16", (2,), (0, 4)),
                                      "z": entry("F32", (0,), (0, 0))},
                     b"\x00\x3c\x00\x40")
    assert set(load_file(str(path))) == {"a", "z"}  # safetensors itself accepts this file
    assert {t.name for t in parse(path).tensors} == {"a", "z"}


def test_error_message_names_the_file(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "f", b"[]")
    with pytest.raises(LoraCacheError) as info:
        parse(path, name="styles/ink.safetensors")
    assert info.value.message.startswith("styles/ink.safetensors: ")


# -------------------------------------------------------------------------- malformed files


def test_file_shorter_than_8_bytes(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"\x02\x00\x00\x00\x00\x00\x00")
    assert "too short" in invalid(path)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"")
    assert "too short" in invalid(path)


def test_header_length_past_end_of_file(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "f", b"{}", header_len=100)
    assert "past the end" in invalid(path)


def test_header_length_over_the_limit(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "f", b"", header_len=MAX_HEADER_BYTES + 1)
    assert "exceeds the limit" in invalid(path)


def test_header_length_of_2_pow_64_minus_1(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "f", b"{}", header_len=2**64 - 1)
    assert "exceeds the limit" in invalid(path)


@pytest.mark.parametrize("raw", [b"\xff\xfe{}", b'{"w\xc3": {}}'], ids=["bad-start", "bad-in-key"])
def test_header_not_utf8(tmp_path: Path, raw: bytes) -> None:
    assert "UTF-8" in invalid(write_raw(tmp_path / "f", raw))


@pytest.mark.parametrize("raw", [b"{not json", b"", b'{"w": ', b"{} {}"],
                         ids=["garbage", "empty", "truncated", "two-values"])
def test_header_not_json(tmp_path: Path, raw: bytes) -> None:
    assert "JSON" in invalid(write_raw(tmp_path / "f", raw))


def test_deeply_nested_json_header(tmp_path: Path) -> None:
    # A few hundred KB of brackets is well under MAX_HEADER_BYTES.
    raw = b'{"w": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    assert "JSON" in invalid(write_raw(tmp_path / "f", raw))


@pytest.mark.parametrize("raw", [b"[1, 2]", b'"w"', b"7", b"null"])
def test_header_not_an_object(tmp_path: Path, raw: bytes) -> None:
    assert "JSON object" in invalid(write_raw(tmp_path / "f", raw))


def test_duplicate_tensor_names(tmp_path: Path) -> None:
    one = json.dumps(entry())
    raw = f'{{"w": {one}, "w": {one}}}'.encode()
    assert "duplicate" in invalid(write_raw(tmp_path / "f", raw, b"\x00" * 4))


def test_duplicate_keys_inside_an_entry(tmp_path: Path) -> None:
    raw = b'{"w": {"dtype": "F16", "dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}'
    assert "duplicate" in invalid(write_raw(tmp_path / "f", raw, b"\x00" * 4))


@pytest.mark.parametrize("metadata", [
    {"alpha": 8}, {"alpha": None}, {"nested": {"a": "b"}}, "format=pt", [["a", "b"]],
    [],  # empty, but still not a map
], ids=["int-value", "null-value", "map-value", "string", "pairs", "empty-list"])
def test_metadata_not_str_to_str(tmp_path: Path, metadata: Any) -> None:
    path = write_raw(tmp_path / "f", {"__metadata__": metadata, "w": entry()}, b"\x00" * 4)
    assert "__metadata__" in invalid(path)


@pytest.mark.parametrize("header", [{}, {"__metadata__": {"format": "pt"}}],
                         ids=["empty", "metadata-only"])
def test_no_tensors(tmp_path: Path, header: dict[str, Any]) -> None:
    assert "no tensors" in invalid(write_raw(tmp_path / "f", header))


def test_entry_not_an_object(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "f", {"w": ["F16", [2], [0, 4]]}, b"\x00" * 4)
    message = invalid(path)
    assert "'w'" in message and "object" in message


@pytest.mark.parametrize("dtype", ["F4", "C64", "f16", "float16", "", None, 2],
                         ids=["F4", "C64", "lowercase", "torch-name", "empty", "null", "int"])
def test_unknown_dtype(tmp_path: Path, dtype: Any) -> None:
    path = write_raw(tmp_path / "f", {"w": entry(dtype=dtype)}, b"\x00" * 4)
    assert "dtype" in invalid(path)


def test_missing_dtype(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "f", {"w": {"shape": [2], "data_offsets": [0, 4]}}, b"\x00" * 4)
    assert "dtype" in invalid(path)


@pytest.mark.parametrize("dtype", [["F16"], {"name": "F16"}], ids=["list", "object"])
def test_dtype_of_a_json_container(tmp_path: Path, dtype: Any) -> None:
    path = write_raw(tmp_path / "f", {"w": entry(dtype=dtype)}, b"\x00" * 4)
    assert "dtype" in invalid(path)


@pytest.mark.parametrize("shape", [
    "2", 2, None, {"0": 2},  # not a list
    [-2], [2, -1],  # negative
    [1] * (MAX_DIMS + 1),  # too many dims
    [2.0], [True, 2], ["2"], [[2]],  # not ints
    [2**40 + 1],  # a dimension over MAX_DIM_SIZE
], ids=["str", "int", "null", "object", "negative", "negative-second", "too-many-dims",
        "float", "bool", "str-dim", "nested", "huge-dim"])
def test_invalid_shape(tmp_path: Path, shape: Any) -> None:
    path = write_raw(tmp_path / "f", {"w": entry(shape=shape)}, b"\x00" * 4)
    assert "shape" in invalid(path)


@pytest.mark.parametrize("offsets", [
    [0], [0, 4, 8], [], "0,4", None,  # wrong length or not a list
    [4, 0],  # reversed
    [-4, 0], [0.0, 4.0], ["0", "4"], [False, 4], [0, 4.5],  # not non-negative ints
], ids=["one", "three", "empty", "str", "null", "reversed", "negative", "floats", "strs",
        "bool", "float-end"])
def test_invalid_data_offsets(tmp_path: Path, offsets: Any) -> None:
    path = write_raw(tmp_path / "f", {"w": entry(offsets=offsets)}, b"\x00" * 8)
    assert "data_offsets" in invalid(path)


@pytest.mark.parametrize("dtype, shape, offsets", [
    ("F16", (2,), (0, 6)),  # too many bytes
    ("F32", (2,), (0, 4)),  # too few bytes
    ("BF16", (2, 3), (0, 6)),
    ("F16", (0,), (0, 2)),  # empty tensor with bytes
    ("F16", (), (0, 4)),  # scalar holds one item
], ids=["long", "short", "2d", "empty-with-bytes", "scalar"])
def test_size_mismatch_between_dtype_shape_and_offsets(tmp_path: Path, dtype: str, shape: Any,
                                                       offsets: Any) -> None:
    path = write_raw(tmp_path / "f", {"w": entry(dtype, shape, offsets)}, b"\x00" * 16)
    assert "needs" in invalid(path)


def test_tensor_past_end_of_file(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "f", {"w": entry("F16", (2,), (0, 4))}, b"\x00" * 3)
    message = invalid(path)
    assert "'w'" in message and "truncated" in message


def test_truncated_saved_file(tmp_path: Path) -> None:
    path = tmp_path / "lora.safetensors"
    save_file({"a": torch.randn(8, 8).half(), "b": torch.randn(8, 8).half()}, str(path))
    content = path.read_bytes()
    path.write_bytes(content[:-1])
    assert "truncated" in invalid(path)


@pytest.mark.parametrize("second", [(2, 6), (0, 4), (1, 5)], ids=["tail", "same", "inside"])
def test_overlapping_tensors(tmp_path: Path, second: tuple[int, int]) -> None:
    path = write_raw(tmp_path / "f", {"a": entry(offsets=(0, 4)), "b": entry(offsets=second)},
                     b"\x00" * 8)
    message = invalid(path)
    assert "overlap" in message and "'a'" in message and "'b'" in message


def test_overlap_found_whatever_the_header_order(tmp_path: Path) -> None:
    header = {"c": entry("F32", (4,), (16, 32)), "a": entry("F32", (4,), (0, 16)),
              "b": entry("F16", (2,), (30, 34))}
    assert "overlap" in invalid(write_raw(tmp_path / "f", header, b"\x00" * 34))


# ----------------------------------------------------------------------------- properties


def _read_or_refuse(content: bytes) -> None:
    with tempfile.TemporaryFile() as f:
        f.write(content)
        f.flush()
        try:
            header = read_header(f)
        except LoraCacheError as exc:
            assert exc.code is ErrorCode.INVALID_LORA
        else:
            assert all(t.end <= len(content) for t in header.tensors)


def _prefixed(header: bytes, data: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header + data


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-4, 40) | st.floats() | st.text(max_size=4)
    | st.sampled_from(sorted(ITEM_SIZES)),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["dtype", "shape", "data_offsets", "__metadata__", "w"])
                      | st.text(max_size=3), children, max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=128))
def test_arbitrary_bytes_parse_or_raise_invalid_lora(content: bytes) -> None:
    _read_or_refuse(content)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=96), st.binary(max_size=32))
def test_arbitrary_header_bytes_parse_or_raise_invalid_lora(header: bytes, data: bytes) -> None:
    _read_or_refuse(_prefixed(header, data))


@settings(max_examples=300, deadline=None)
@given(_json, st.binary(max_size=48))
def test_arbitrary_json_headers_parse_or_raise_invalid_lora(header: Any, data: bytes) -> None:
    _read_or_refuse(_prefixed(json.dumps(header).encode(), data))
