"""The small interface every transport implements, and the client-side dispatch."""

from __future__ import annotations

import abc
import dataclasses
import io
from typing import Any

import torch

from ..errors import ErrorCode, LoraCacheError


@dataclasses.dataclass(frozen=True)
class Segment:
    """Copy ``nbytes`` from file offset ``src`` to buffer offset ``dst``."""

    src: int
    dst: int
    nbytes: int


class DeviceBuffer(abc.ABC):
    """One entry's memory, owned by the daemon. Lives until :meth:`free`."""

    nbytes: int

    @abc.abstractmethod
    def fill(self, f: io.FileIO, segments: list[Segment]) -> None:
        """Copy the segments of the open file ``f`` into the buffer (runs in an executor)."""

    @abc.abstractmethod
    def write_tensors(self, items: list[tuple[int, torch.Tensor]]) -> None:
        """Copy each CPU tensor's bytes to its buffer offset (converted layouts; executor)."""

    @abc.abstractmethod
    def contents(self) -> torch.Tensor:
        """The buffer's bytes as a flat uint8 tensor on its device, to copy from."""

    @abc.abstractmethod
    def export(self) -> dict[str, Any]:
        """Return a handle for one consumer (one lease); msgpack-serialisable."""

    def forget_export(self, handle: dict[str, Any]) -> None:
        """Undo what ``export`` left to the consumer, for a consumer that died holding it."""

    @abc.abstractmethod
    def free(self) -> None:
        """Give the memory back; consumers' existing mappings stay valid until they drop them."""


class Transport(abc.ABC):
    """Allocates buffers on one device; ``device`` is the name clients use for it."""

    device: str

    @abc.abstractmethod
    def allocate(self, nbytes: int, name: str) -> DeviceBuffer:
        """Allocate ``nbytes``; raise CACHE_FULL when the device has no room left."""

    def footprint(self, nbytes: int) -> int:
        """The memory an entry of ``nbytes`` holds on the device (what the budget counts)."""
        return nbytes

    @abc.abstractmethod
    def total_memory(self) -> int:
        """Size of the device's memory, for budgets given as a percentage."""

    def memory(self) -> dict[str, int]:
        """What the device's allocator holds, for stats (empty where nothing but entries)."""
        return {}

    def collect(self) -> None:
        """Reclaim memory whose consumers have all let go (CUDA IPC keeps it until then)."""

    def close(self) -> None:
        """Remove whatever the transport created on the host (directories, files)."""


def open_handle(handle: dict[str, Any]) -> torch.Tensor:
    """Map an exported handle in this process as a flat uint8 tensor, without copying."""
    kind = handle.get("kind")
    if kind == "shm":
        from .shm import open_shm_handle

        return open_shm_handle(handle)
    if kind == "cuda_ipc":
        from .cuda_ipc import open_cuda_handle

        return open_cuda_handle(handle)
    raise LoraCacheError(ErrorCode.BAD_REQUEST, f"unknown transport kind {kind!r} in a handle; "
                                                 "upgrade loracache in this worker")


def discard_handle(handle: dict[str, Any]) -> None:
    """Give up a handle this process already maps through another lease.

    A CUDA IPC export carries a reference-counter slot that the consumer must release exactly
    once; torch does that when it finds the block already mapped. Shared-memory handles need
    nothing.
    """
    if handle.get("kind") == "cuda_ipc":
        from .cuda_ipc import open_cuda_handle

        open_cuda_handle(handle)


PROBE_BYTES = 4096


def probe_pattern() -> torch.Tensor:
    """The bytes of a probe buffer (the test lease of ``loracache doctor``): 0 to 250, again."""
    return torch.arange(PROBE_BYTES).remainder(251).to(torch.uint8)


def tensor_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes as a flat uint8 CPU tensor (a view when it is contiguous already)."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)
