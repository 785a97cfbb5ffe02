"""Loading one file into one packed device buffer (runs in executor threads, never the loop).

Two steps, so the cache can make room in between: :func:`plan_load` reads and validates the
header and computes the packed layout; :func:`fill_buffer` allocates and copies the data.
"""

from __future__ import annotations

import dataclasses
from typing import BinaryIO

from loracache.shared.errors import ErrorCode, LoraCacheError
from loracache.shared.packing import PackedLayout, pack
from loracache.shared.safetensors_header import read_header
from loracache.shared.transport import DeviceBuffer, Segment, Transport

from .files import FileIdentity, open_identified

LAYOUTS = ("raw",)  # tensors as stored in the file


@dataclasses.dataclass
class LoadPlan:
    path: str
    file: BinaryIO  # open until the buffer is filled; the caller closes it
    layout: PackedLayout
    segments: list[Segment]

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes


def plan_load(identity: FileIdentity, layout: str) -> LoadPlan:
    if layout not in LAYOUTS:
        raise LoraCacheError(ErrorCode.BAD_REQUEST,
                             f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    f = open_identified(identity)
    try:
        header = read_header(f, identity.path)
        packed = pack(header.tensors)
    except BaseException:
        f.close()
        raise
    segments = [Segment(src=record.begin, dst=spec.offset, nbytes=record.nbytes)
                for record, spec in zip(header.tensors, packed.specs)]
    return LoadPlan(path=identity.path, file=f, layout=packed, segments=coalesce(segments))


def coalesce(segments: list[Segment]) -> list[Segment]:
    """Merge segments that are adjacent both in the file and in the buffer.

    Tensors whose sizes are multiples of the alignment (most LoRA factors) end up in one copy,
    so a miss costs a few large copies rather than one system call per tensor.
    """
    merged: list[Segment] = []
    for segment in segments:
        last = merged[-1] if merged else None
        if last and last.src + last.nbytes == segment.src and last.dst + last.nbytes == segment.dst:
            merged[-1] = Segment(last.src, last.dst, last.nbytes + segment.nbytes)
        else:
            merged.append(segment)
    return merged


def fill_buffer(transport: Transport, plan: LoadPlan, name: str) -> DeviceBuffer:
    buffer = transport.allocate(plan.nbytes, name)
    try:
        buffer.fill(plan.file, plan.segments)
    except OSError as exc:
        buffer.free()
        raise LoraCacheError(ErrorCode.INVALID_LORA,
                             f"reading {plan.path} failed: {exc.strerror}") from exc
    except BaseException:
        buffer.free()
        raise
    return buffer
