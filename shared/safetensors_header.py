"""Read and validate a safetensors header without touching the tensor data.

The format: an 8-byte little-endian header length N, N bytes of UTF-8 JSON mapping tensor names
to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the end of the
header) plus an optional ``"__metadata__"`` map of strings, then the data. Everything in the
header comes from an untrusted file, so every number is checked before it is used.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from typing import BinaryIO

from .dtypes import ITEM_SIZES
from .errors import ErrorCode, LoraCacheError

MAX_HEADER_BYTES = 16 << 20  # a 2,000-tensor Flux LoRA has a ~300 KB header
MAX_TENSORS = 65536
MAX_DIMS = 8
MAX_DIM_SIZE = 1 << 40


@dataclasses.dataclass(frozen=True)
class TensorRecord:
    """One tensor as the file stores it; ``begin``/``end`` are absolute file offsets."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclasses.dataclass(frozen=True)
class SafetensorsHeader:
    tensors: list[TensorRecord]  # in file order
    metadata: dict[str, str]
    file_size: int


def read_header(f: BinaryIO, name: str = "") -> SafetensorsHeader:
    """Parse the header of the open file ``f``; raise INVALID_LORA naming the problem."""
    file_size = os.fstat(f.fileno()).st_size
    where = f"{name}: " if name else ""
    if file_size < 8:
        raise _invalid(f"{where}file of {file_size} bytes is too short to be a safetensors file")
    f.seek(0)
    (header_len,) = struct.unpack("<Q", f.read(8))
    if header_len > MAX_HEADER_BYTES:
        raise _invalid(f"{where}header length {header_len} exceeds the limit of {MAX_HEADER_BYTES}")
    if 8 + header_len > file_size:
        raise _invalid(f"{where}header length {header_len} runs past the end of the file "
                       f"({file_size} bytes): the file is truncated or not safetensors")
    raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _invalid(f"{where}header is not valid UTF-8 JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise _invalid(f"{where}header must be a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise _invalid(f"{where}__metadata__ must map strings to strings")
    if not header:
        raise _invalid(f"{where}the file holds no tensors")
    if len(header) > MAX_TENSORS:
        raise _invalid(f"{where}{len(header)} tensors exceed the limit of {MAX_TENSORS}")
    data_start = 8 + header_len
    tensors = [_record(key, value, data_start, file_size, where) for key, value in header.items()]
    tensors.sort(key=lambda t: (t.begin, t.end))
    for before, after in zip(tensors, tensors[1:]):
        if after.begin < before.end:
            raise _invalid(f"{where}tensors {before.name!r} and {after.name!r} overlap in the file")
    return SafetensorsHeader(tensors=tensors, metadata=metadata, file_size=file_size)


def _record(name: str, entry: object, data_start: int, file_size: int, where: str) -> TensorRecord:
    if not isinstance(entry, dict):
        raise _invalid(f"{where}entry of tensor {name!r} must be an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in ITEM_SIZES:
        raise _invalid(f"{where}tensor {name!r} has unsupported dtype {dtype!r}; "
                       f"allowed: {', '.join(ITEM_SIZES)}")
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or not all(_is_int(d) and 0 <= d <= MAX_DIM_SIZE for d in shape)):
        raise _invalid(f"{where}tensor {name!r} has an invalid shape {shape!r:.80} "
                       f"(at most {MAX_DIMS} non-negative dimensions)")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(_is_int(o) for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
        raise _invalid(f"{where}tensor {name!r} has invalid data_offsets {offsets!r:.80}")
    begin, end = offsets[0] + data_start, offsets[1] + data_start
    expected = math.prod(shape) * ITEM_SIZES[dtype]
    if end - begin != expected:
        raise _invalid(f"{where}tensor {name!r} spans {end - begin} bytes but {dtype} {shape} "
                       f"needs {expected}")
    if end > file_size:
        raise _invalid(f"{where}tensor {name!r} ends at byte {end}, past the end of the file "
                       f"({file_size} bytes): the file is truncated")
    return TensorRecord(name=name, dtype=dtype, shape=tuple(shape), begin=begin, end=end)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate key in header")
    return result


def _invalid(message: str) -> LoraCacheError:
    return LoraCacheError(ErrorCode.INVALID_LORA, message)
