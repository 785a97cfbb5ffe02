"""CUDA transport: one device allocation per entry, lent through legacy CUDA IPC handles.

Pitfalls this module handles (see ../shared/notes/cuda-ipc.md):

- Devices are named by UUID: ordinals differ between processes under CUDA_VISIBLE_DEVICES.
- Buffers come from the caching allocator with expandable segments off: their IPC export
  needs ptrace rights and leaks address space.
- Each lease gets its own ``_share_cuda_()`` export, whose reference-counter slot the consumer
  decrements exactly once (torch does it when the consumer drops its mapping, or at once when
  the consumer already maps the same block). For a consumer that died first, the daemon
  decrements the slot itself (:meth:`CudaBuffer.forget_export`), otherwise the block would stay
  in torch's limbo forever.
- ``torch.cuda.synchronize()`` after the upload and before any export.
"""

from __future__ import annotations

import functools
import struct
from typing import Any, BinaryIO

import torch
from torch.multiprocessing.reductions import rebuild_cuda_tensor

from ..errors import ErrorCode, LoraCacheError
from .base import DeviceBuffer, Segment, Transport, tensor_bytes

STAGING_BYTES = 64 << 20  # pinned host chunk for uploads: bounds host memory per load


def device_uuid(index: int) -> str:
    """The UUID of local CUDA device ``index``, as nvidia-smi prints it (``GPU-...``)."""
    uuid = str(torch.cuda.get_device_properties(index).uuid)
    return uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"


@functools.cache
def _local_indices() -> dict[str, int]:
    return {device_uuid(i): i for i in range(torch.cuda.device_count())}


def local_index(uuid: str) -> int:
    """This process's ordinal for the device with ``uuid``."""
    try:
        return _local_indices()[uuid]
    except KeyError:
        raise LoraCacheError(ErrorCode.UNKNOWN_DEVICE,
                             f"device {uuid} is not visible in this process; check "
                             "CUDA_VISIBLE_DEVICES and that the worker runs on the daemon's "
                             "host") from None


class CudaBuffer(DeviceBuffer):
    def __init__(self, tensor: torch.Tensor, uuid: str) -> None:
        self.tensor = tensor
        self.uuid = uuid
        self.nbytes = tensor.numel()

    def fill(self, f: BinaryIO, segments: list[Segment]) -> None:
        staging = torch.empty(min(self.nbytes, STAGING_BYTES), dtype=torch.uint8, pin_memory=True)
        host = memoryview(staging.numpy())
        for segment in segments:
            done = 0
            while done < segment.nbytes:
                piece = min(segment.nbytes - done, len(host))
                f.seek(segment.src + done)
                if f.readinto(host[:piece]) != piece:
                    raise LoraCacheError(ErrorCode.INVALID_LORA,
                                         f"file ended while reading offset {segment.src + done}: "
                                         "it was truncated")
                start = segment.dst + done
                self.tensor[start:start + piece].copy_(staging[:piece])  # synchronous
                done += piece
        torch.cuda.synchronize(self.tensor.device)

    def write_tensors(self, items: list[tuple[int, torch.Tensor]]) -> None:
        for offset, tensor in items:
            data = tensor_bytes(tensor)
            self.tensor[offset:offset + data.numel()].copy_(data)
        torch.cuda.synchronize(self.tensor.device)

    def export(self) -> dict[str, Any]:
        (_, handle, size, offset, rc_handle, rc_offset, event_handle,
         event_sync) = self.tensor.untyped_storage()._share_cuda_()
        return {"kind": "cuda_ipc", "uuid": self.uuid, "nbytes": self.nbytes,
                "handle": handle, "size": size, "offset": offset,
                "rc_handle": rc_handle, "rc_offset": rc_offset,
                "event_handle": event_handle, "event_sync": bool(event_sync)}

    def forget_export(self, handle: dict[str, Any]) -> None:
        # Only called once the consumer process is gone, so nobody else touches the slot.
        if _counter_value(handle["rc_handle"], handle["rc_offset"]) > 0:
            torch.UntypedStorage._release_ipc_counter_cuda(handle["rc_handle"],
                                                           handle["rc_offset"])

    def free(self) -> None:
        del self.tensor


def _counter_value(rc_handle: bytes, rc_offset: int) -> int:
    """Read torch's IPC reference-counter slot (an int64 in a /dev/shm file of ours)."""
    path = "/dev/shm/" + rc_handle.decode().lstrip("/")
    try:
        with open(path, "rb") as counter_file:
            counter_file.seek(rc_offset * 8)
            return struct.unpack("<q", counter_file.read(8))[0]
    except (OSError, struct.error):
        return 0


class CudaIpcTransport(Transport):
    """Buffers on the local CUDA device ``index``, named ``cuda:<uuid>`` on the wire."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.uuid = device_uuid(index)
        self.device = f"cuda:{self.uuid}"
        torch.cuda.memory._set_allocator_settings("expandable_segments:False")

    def allocate(self, nbytes: int, name: str) -> CudaBuffer:
        try:
            tensor = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{self.index}")
        except torch.OutOfMemoryError as exc:
            raise LoraCacheError(ErrorCode.CACHE_FULL,
                                 f"device {self.uuid} is out of memory for {nbytes} bytes; "
                                 "lower --max-bytes for it") from exc
        return CudaBuffer(tensor, self.uuid)

    def total_memory(self) -> int:
        return torch.cuda.get_device_properties(self.index).total_memory

    def collect(self) -> None:
        torch.cuda.ipc_collect()  # frees blocks whose consumers have all let go
        torch.cuda.empty_cache()  # and gives them back to the driver, for the workers' models


def open_cuda_handle(handle: dict[str, Any]) -> torch.Tensor:
    index = local_index(handle["uuid"])
    return rebuild_cuda_tensor(
        torch.Tensor, torch.Size([handle["nbytes"]]), (1,), 0, torch.UntypedStorage,
        torch.uint8, index, handle["handle"], handle["size"], handle["offset"], False,
        handle["rc_handle"], handle["rc_offset"], handle["event_handle"], handle["event_sync"])


def visible_devices() -> list[int]:
    """Ordinals of the CUDA devices this process sees (none without a CUDA build or GPU)."""
    if not torch.cuda.is_available():
        return []
    return list(range(torch.cuda.device_count()))
