"""Loading one file into one packed device buffer (runs in executor threads, never the loop).

Two steps, so the cache can make room in between: :func:`plan_load` reads and validates the
header, converts the tensors when the layout asks for it, and computes the packed layout;
:func:`fill_buffer` allocates and copies the data.
"""

from __future__ import annotations

import dataclasses
import io
import time
from typing import Iterable

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from loracache.shared.canonical import canonical_tensors, cast_factors
from loracache.shared.families import RAW, parse_layout
from loracache.shared.dtypes import SAFETENSORS_NAMES, TORCH_DTYPES
from loracache.shared.errors import ErrorCode, LoraCacheError
from loracache.shared.packing import PackedLayout, TensorItem, pack
from loracache.shared.safetensors_header import read_header
from loracache.shared.transport import DeviceBuffer, Segment, Transport

from .files import FileIdentity, open_identified


@dataclasses.dataclass
class LoadPlan:
    """What to copy: file segments (raw layout) or converted tensors (a family layout)."""

    path: str
    file: io.FileIO  # open until the buffer is filled; the caller closes it
    layout: PackedLayout
    segments: list[Segment]
    tensors: list[tuple[int, torch.Tensor]]
    read_s: float = 0.0  # reading the header, and the data where it is converted
    convert_s: float | None = None  # converting to a family layout (None: raw, no conversion)

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes


def plan_load(identity: FileIdentity, layout: str) -> LoadPlan:
    try:
        parsed = parse_layout(layout)
    except ValueError as exc:
        raise LoraCacheError(ErrorCode.BAD_REQUEST, str(exc)) from None
    started = time.monotonic()
    f = open_identified(identity)
    try:
        header = read_header(f, identity.path)
        if parsed.name == RAW:  # the bytes as they are, like safetensors.load_file
            packed = pack(header.tensors)
            segments = [Segment(src=record.begin, dst=spec.offset, nbytes=record.nbytes)
                        for record, spec in zip(header.tensors, packed.specs)]
            return LoadPlan(identity.path, f, packed, coalesce(segments), [],
                            read_s=time.monotonic() - started)
        f.seek(0)
        try:
            tensors = load_safetensors(f.read())
        except SafetensorError as exc:  # stricter than our reader: gaps, trailing bytes
            raise LoraCacheError(ErrorCode.INVALID_LORA,
                                 f"{identity.path}: safetensors refuses the file: {exc}") from exc
        read = time.monotonic()
        check_finite(identity.path, tensors.items())
        converted = canonical_tensors(tensors, parsed.name, header.metadata)
        if parsed.dtype is not None:  # a value beyond the dtype's range becomes Inf
            converted = cast_factors(converted, TORCH_DTYPES[parsed.dtype])
            check_finite(identity.path, converted.items(),
                         fix=f"a value is beyond {parsed.dtype}'s range; lease it uncast "
                             f"(layout {parsed.name!r})")
        packed = pack([_item(name, tensor) for name, tensor in converted.items()])
        placed = [(spec.offset, converted[spec.name]) for spec in packed.specs]
        return LoadPlan(identity.path, f, packed, [], placed, read_s=read - started,
                        convert_s=time.monotonic() - read)
    except BaseException:
        f.close()
        raise


FINITE_CHUNK = 1 << 24  # elements checked at once: bounds the boolean temporary to 16 MiB


def check_finite(path: str, tensors: Iterable[tuple[str, torch.Tensor]],
                 fix: str = "fix or re-export the LoRA") -> None:
    """Refuse a file with NaN or Inf in a floating tensor: fused, it would poison every weight
    it touches, and nothing downstream would say why. (Family layouts only: the raw layout
    never brings the data into Python, and checking it would double the cost of a miss.)"""
    for name, tensor in tensors:
        if not tensor.is_floating_point() or tensor.element_size() == 1:
            continue  # integers have no NaN; float8 has no isfinite kernel on every device
        for chunk in tensor.reshape(-1).split(FINITE_CHUNK):
            if not bool(torch.isfinite(chunk).all()):
                raise LoraCacheError(ErrorCode.INVALID_LORA,
                                     f"{path}: tensor {name!r} holds NaN or Inf values; {fix}")


def _item(name: str, tensor: torch.Tensor) -> TensorItem:
    return TensorItem(name, SAFETENSORS_NAMES[tensor.dtype], tuple(tensor.shape),
                      tensor.numel() * tensor.element_size())


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
        if plan.tensors:
            buffer.write_tensors(plan.tensors)
        else:
            buffer.fill(plan.file, plan.segments)
    except OSError as exc:
        buffer.free()
        raise LoraCacheError(ErrorCode.INVALID_LORA,
                             f"reading {plan.path} failed: {exc.strerror}") from exc
    except LoraCacheError as exc:  # the transport found the file short: name the file
        buffer.free()
        raise LoraCacheError(exc.code, f"{plan.path}: {exc.message}") from exc
    except BaseException:
        buffer.free()
        raise
    return buffer
