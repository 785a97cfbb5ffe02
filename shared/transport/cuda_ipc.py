"""CUDA transport: one device allocation per entry, lent through legacy CUDA IPC handles.

How an entry's memory is lent (see ../shared/notes/cuda-ipc.md for torch's side):

- Each entry is one caching-allocator block that fills a segment of its own
  (:func:`segment_bytes`): an IPC handle maps a whole ``cudaMalloc`` segment, so a worker that
  maps an entry reaches that entry's bytes and nothing else, and freeing the entry gives the
  segment back to the device.
- Each lease gets its own ``_share_cuda_()`` export, made on a fresh, short-lived storage that
  aliases the entry (through DLPack) and keeps it alive. torch parks that storage in its
  "limbo" until the consumer's reference-counter slot drops to zero, so the entry's memory
  outlives the last mapping however the entry is evicted, and the entry's own storage is
  never wrapped: per-entry bookkeeping stays bounded however many leases it served.
- The daemon synchronises after every upload, so handles say ``event_sync=False``: consumers
  never open torch's interprocess event (which they would never destroy).
- The consumer decrements its slot exactly once (torch does it when the mapping is dropped, or
  at once when the process already maps the block). For a consumer that died first, or never
  opened the handle, the daemon decrements it (:meth:`CudaBuffer.forget_export`).
- torch creates the counter files 0600; they are opened to the daemon's group, since workers
  run as other users in that group and must be able to decrement their slots.
- torch's IPC bookkeeping (counter files, limbo) is not thread-safe: exports run on the event
  loop, frees and collection on the device thread, so all of them hold :data:`IPC_LOCK`.
- Devices are named by UUID: ordinals differ between processes under CUDA_VISIBLE_DEVICES.
"""

from __future__ import annotations

import functools
import io
import os
import struct
import threading
from typing import Any

import torch
from torch.multiprocessing.reductions import rebuild_cuda_tensor

from ..device_names import bare_uuid
from ..errors import ErrorCode, LoraCacheError
from .base import DeviceBuffer, Segment, Transport, tensor_bytes

STAGING_BYTES = 64 << 20  # pinned host chunk for uploads: bounds host memory per load
# The caching allocator serves requests under 10 MiB from segments it shares between blocks
# (2 MiB and 20 MiB ones); from 10 MiB up, a request rounded to 2 MiB gets a segment of exactly
# that size. So every entry asks for at least this, in multiples of the rounding.
MIN_SEGMENT = 10 << 20
SEGMENT_ROUNDING = 2 << 20
# torch's reference-counter files (RefcountedMapAllocator) start with a 64-byte header; slot i
# is the int64 at byte 64 + 8 * i.
COUNTER_HEADER = 64
COUNTER_MODE = 0o660  # the daemon's group (the workers) must decrement their slots
IPC_LOCK = threading.Lock()

_opened_counter_files: set[bytes] = set()  # guarded by IPC_LOCK


def segment_bytes(nbytes: int) -> int:
    """The device memory an entry of ``nbytes`` holds: a segment of its own."""
    need = max(nbytes, MIN_SEGMENT)
    return -(-need // SEGMENT_ROUNDING) * SEGMENT_ROUNDING


@functools.cache
def device_uuid(index: int) -> str:
    """The UUID of local CUDA device ``index`` as nvidia-smi prints it: ``GPU-...``, or
    ``MIG-...`` for a MIG instance."""
    uuid = str(torch.cuda.get_device_properties(index).uuid)
    if uuid.startswith(("GPU-", "MIG-")):
        return uuid
    return f"{'MIG' if _is_mig(uuid) else 'GPU'}-{uuid}"


def _is_mig(bare_uuid: str) -> bool:
    """Whether NVML knows a MIG instance of this UUID (CUDA reports both kinds bare)."""
    try:
        import pynvml  # nvidia-ml-py, where installed

        pynvml.nvmlInit()
        try:
            pynvml.nvmlDeviceGetHandleByUUID(f"MIG-{bare_uuid}".encode())
            return True
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML, or no such MIG instance
        return False


@functools.cache
def _local_indices() -> dict[str, int]:
    return {bare_uuid(device_uuid(i)): i for i in range(torch.cuda.device_count())}


def local_index(uuid: str) -> int:
    """This process's ordinal for the device with ``uuid``."""
    try:
        return _local_indices()[bare_uuid(uuid)]
    except KeyError:
        raise LoraCacheError(ErrorCode.UNKNOWN_DEVICE,
                             f"device {uuid} is not visible in this process; check "
                             "CUDA_VISIBLE_DEVICES and that the worker runs on the daemon's "
                             "host") from None


class CudaBuffer(DeviceBuffer):
    def __init__(self, tensor: torch.Tensor, uuid: str) -> None:
        self.tensor = tensor  # the whole segment
        self.uuid = uuid
        self.nbytes = tensor.numel()

    def fill(self, f: io.FileIO, segments: list[Segment]) -> None:
        staging = torch.empty(min(self.nbytes, STAGING_BYTES), dtype=torch.uint8, pin_memory=True)
        host = staging.numpy().data
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

    def contents(self) -> torch.Tensor:
        return self.tensor

    def export(self) -> dict[str, Any]:
        # On the event loop's thread, whose current device is 0: DLPack exports only from the
        # current device.
        with torch.cuda.device(self.tensor.device), IPC_LOCK:
            alias = torch.from_dlpack(self.tensor)  # a storage of its own that holds the entry
            storage = alias.untyped_storage()
            (_, handle, size, offset, rc_handle, rc_offset, _event,
             _sync) = storage._share_cuda_()
            del storage, alias  # into torch's limbo until the consumer lets go
            try:
                _open_to_group(rc_handle)
            except OSError:  # nobody will get this export: its slot must not pin the entry
                torch.UntypedStorage._release_ipc_counter_cuda(rc_handle, rc_offset)
                raise
        return {"kind": "cuda_ipc", "uuid": self.uuid, "nbytes": self.nbytes,
                "handle": handle, "size": size, "offset": offset,
                "rc_handle": rc_handle, "rc_offset": rc_offset,
                "event_handle": b"", "event_sync": False}

    def forget_export(self, handle: dict[str, Any]) -> None:
        # Only called once the consumer is gone or never opened it: nobody else touches the slot.
        with IPC_LOCK:
            if counter_value(handle["rc_handle"], handle["rc_offset"]) > 0:
                torch.UntypedStorage._release_ipc_counter_cuda(handle["rc_handle"],
                                                               handle["rc_offset"])

    def free(self) -> None:
        with IPC_LOCK:
            del self.tensor  # the memory goes once every export's consumer has let go


def counter_path(rc_handle: bytes) -> str:
    """Where torch keeps a reference-counter file (POSIX shared memory, so /dev/shm)."""
    return "/dev/shm/" + rc_handle.decode().lstrip("/")


def counter_value(rc_handle: bytes, rc_offset: int) -> int:
    """Read slot ``rc_offset`` of torch's reference-counter file; 0 once the file is gone
    (torch removes it when every slot in it has been released and collected)."""
    try:
        with open(counter_path(rc_handle), "rb") as counter_file:
            counter_file.seek(COUNTER_HEADER + 8 * rc_offset)
            return struct.unpack("<q", counter_file.read(8))[0]
    except (OSError, struct.error):
        return 0


def _open_to_group(rc_handle: bytes) -> None:
    """Make a counter file writable by the daemon's group (once per file; torch makes it 0600).
    Call with IPC_LOCK held."""
    if rc_handle in _opened_counter_files:
        return
    os.chmod(counter_path(rc_handle), COUNTER_MODE)
    if len(_opened_counter_files) > 64:  # files are used one after another: keep the recent
        _opened_counter_files.clear()
    _opened_counter_files.add(rc_handle)


def set_allocator_settings(settings: str) -> None:
    """torch's allocator settings, by the call of the installed release (renamed in 2.9)."""
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    if setter is None:
        setter = torch.cuda.memory._set_allocator_settings
    setter(settings)


class CudaIpcTransport(Transport):
    """Buffers on the local CUDA device ``index``, named ``cuda:<uuid>`` on the wire."""

    def __init__(self, index: int) -> None:
        backend = torch.cuda.get_allocator_backend()
        if backend != "native":
            raise LoraCacheError(
                ErrorCode.UNKNOWN_DEVICE,
                f"torch's CUDA allocator backend is {backend!r}, whose memory cannot be shared "
                "through CUDA IPC; remove backend:cudaMallocAsync from PYTORCH_CUDA_ALLOC_CONF "
                "(or PYTORCH_ALLOC_CONF) in the daemon's environment")
        self.index = index
        self.uuid = device_uuid(index)
        self.device = f"cuda:{self.uuid}"
        # Expandable segments export file descriptors that importers take with pidfd_getfd
        # (ptrace rights) and leak address space: the daemon's buffers must not use them.
        set_allocator_settings("expandable_segments:False")

    def footprint(self, nbytes: int) -> int:
        return segment_bytes(nbytes)

    def allocate(self, nbytes: int, name: str) -> CudaBuffer:
        size = segment_bytes(nbytes)
        with IPC_LOCK:  # torch's out-of-memory callback collects torch's IPC limbo
            # A cached free segment would be split for this block, sharing it with the next:
            # give cached segments back first, so the block gets a segment of its own.
            torch.cuda.empty_cache()
            try:
                tensor = torch.empty(size, dtype=torch.uint8, device=f"cuda:{self.index}")
            except torch.OutOfMemoryError as exc:
                raise LoraCacheError(ErrorCode.CACHE_FULL,
                                     f"device {self.uuid} is out of memory for {size} bytes; "
                                     "lower --max-bytes for it") from exc
        return CudaBuffer(tensor, self.uuid)

    def total_memory(self) -> int:
        return torch.cuda.get_device_properties(self.index).total_memory

    def collect(self) -> None:
        with IPC_LOCK:
            torch.cuda.ipc_collect()  # frees blocks whose consumers have all let go
            torch.cuda.empty_cache()  # and gives them back to the driver, for the workers' models

    def memory(self) -> dict[str, int]:
        return {"allocated": torch.cuda.memory_allocated(self.index),
                "reserved": torch.cuda.memory_reserved(self.index)}


def open_cuda_handle(handle: dict[str, Any]) -> torch.Tensor:
    try:
        index = local_index(handle["uuid"])
    except LoraCacheError as exc:  # this process cannot map it: the caller may fall back
        raise LoraCacheError(ErrorCode.MAPPING_FAILED, exc.message) from None
    counter = counter_path(handle["rc_handle"])
    if not os.access(counter, os.R_OK | os.W_OK):
        # torch would map the memory, then fail to release it without a word: refuse now.
        raise LoraCacheError(
            ErrorCode.MAPPING_FAILED,
            f"cannot write the daemon's CUDA IPC reference counter {counter}: the worker must "
            "share the daemon's /dev/shm (containers: --ipc=host) and be in its group "
            "(loracache)")
    try:
        return rebuild_cuda_tensor(
            torch.Tensor, torch.Size([handle["nbytes"]]), (1,), 0, torch.UntypedStorage,
            torch.uint8, index, handle["handle"], handle["size"], handle["offset"], False,
            handle["rc_handle"], handle["rc_offset"], handle["event_handle"],
            handle["event_sync"])
    except RuntimeError as exc:
        raise LoraCacheError(
            ErrorCode.MAPPING_FAILED,
            f"cannot open the daemon's CUDA IPC handle for device {handle['uuid']}: {exc}. "
            "The worker must run on the daemon's host, in its PID and IPC namespaces "
            "(containers: --pid=host --ipc=host), see the GPU, and use a torch release "
            "whose IPC handles match the daemon's; `loracache doctor` checks each") from exc


def visible_devices() -> list[int]:
    """Ordinals of the CUDA devices this process sees (none without a CUDA build or GPU)."""
    if not torch.cuda.is_available():
        return []
    return list(range(torch.cuda.device_count()))
