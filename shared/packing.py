"""The packed layout of an entry: all its tensors in one buffer, at aligned offsets.

One buffer per entry means one allocation and one IPC handle (opening a CUDA IPC handle costs
about a millisecond, so per-tensor handles would dominate a hit).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Protocol, Sequence

from .protocol import TensorSpec

ALIGNMENT = 256  # cudaMalloc's alignment; also keeps every view aligned for any dtype


class Packable(Protocol):
    """What packing needs to know of a tensor (a file's TensorRecord, or a TensorItem)."""

    @property
    def name(self) -> str: ...
    @property
    def dtype(self) -> str: ...
    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def nbytes(self) -> int: ...


class TensorItem(NamedTuple):
    """A tensor that comes from memory rather than straight from the file (a converted one)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


@dataclasses.dataclass(frozen=True)
class PackedLayout:
    specs: list[TensorSpec]
    nbytes: int  # size of the whole buffer


def pack(records: Sequence[Packable]) -> PackedLayout:
    """Place ``records`` one after another, each starting at a multiple of ALIGNMENT."""
    specs, cursor = [], 0
    for record in records:
        specs.append(TensorSpec(name=record.name, dtype=record.dtype, shape=list(record.shape),
                                offset=cursor))
        cursor = _align(cursor + record.nbytes)
    return PackedLayout(specs=specs, nbytes=max(cursor, ALIGNMENT))


def _align(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT
