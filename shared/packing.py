"""The packed layout of an entry: all its tensors in one buffer, at aligned offsets.

One buffer per entry means one allocation and one IPC handle (opening a CUDA IPC handle costs
about a millisecond, so per-tensor handles would dominate a hit).
"""

from __future__ import annotations

import dataclasses

from .protocol import TensorSpec
from .safetensors_header import TensorRecord

ALIGNMENT = 256  # cudaMalloc's alignment; also keeps every view aligned for any dtype


@dataclasses.dataclass(frozen=True)
class PackedLayout:
    specs: list[TensorSpec]
    nbytes: int  # size of the whole buffer


def pack(records: list[TensorRecord]) -> PackedLayout:
    """Place ``records`` one after another, each starting at a multiple of ALIGNMENT."""
    specs, cursor = [], 0
    for record in records:
        specs.append(TensorSpec(name=record.name, dtype=record.dtype, shape=list(record.shape),
                                offset=cursor))
        cursor = _align(cursor + record.nbytes)
    return PackedLayout(specs=specs, nbytes=max(cursor, ALIGNMENT))


def _align(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT
