"""CPU transport: one file per entry in a daemon-owned tmpfs directory, mapped read-only.

Clients map with ``mmap(ACCESS_READ)``, so a client bug cannot write to the shared copy (a write
through a view faults in that client only). Freeing unlinks the file; mappings that clients
still hold stay valid until they drop them, as with any unlinked file.
"""

from __future__ import annotations

import errno
import io
import mmap
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import ErrorCode, LoraCacheError
from .base import DeviceBuffer, Segment, Transport, tensor_bytes

FILE_MODE = 0o640  # the daemon writes, the group (workers) reads
DIR_MODE = 0o750


class ShmBuffer(DeviceBuffer):
    def __init__(self, path: Path, nbytes: int) -> None:
        self.path = path
        self.nbytes = nbytes

    def fill(self, f: io.FileIO, segments: list[Segment]) -> None:
        # sendfile copies page cache to tmpfs inside the kernel: one copy, no user buffer.
        fd = os.open(self.path, os.O_WRONLY)
        try:
            for segment in segments:
                os.lseek(fd, segment.dst, os.SEEK_SET)
                offset, left = segment.src, segment.nbytes
                while left:
                    sent = os.sendfile(fd, f.fileno(), offset, left)
                    if sent == 0:
                        raise LoraCacheError(ErrorCode.INVALID_LORA,
                                             f"file ended while reading {segment.nbytes} bytes "
                                             f"at offset {segment.src}: it was truncated")
                    offset, left = offset + sent, left - sent
        finally:
            os.close(fd)

    def write_tensors(self, items: list[tuple[int, torch.Tensor]]) -> None:
        fd = os.open(self.path, os.O_WRONLY)
        try:
            for offset, tensor in items:
                data = tensor_bytes(tensor).numpy().data
                while data:
                    written = os.pwrite(fd, data, offset)
                    data, offset = data[written:], offset + written
        finally:
            os.close(fd)

    def contents(self) -> torch.Tensor:
        return open_shm_handle(self.export())  # a read-only mapping: no copy

    def export(self) -> dict[str, Any]:
        return {"kind": "shm", "path": str(self.path), "nbytes": self.nbytes}

    def free(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


class ShmTransport(Transport):
    """Buffers for device ``cpu``, as files in ``directory`` (created 0750, removed on close)."""

    device = "cpu"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=False)
        directory.chmod(DIR_MODE)  # whatever the umask: group members must be able to map

    def allocate(self, nbytes: int, name: str) -> ShmBuffer:
        path = self.directory / f"{name}.bin"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, FILE_MODE)
        try:
            os.fchmod(fd, FILE_MODE)
            # Reserve the pages now: a full tmpfs must fail here with ENOSPC, not later with
            # SIGBUS while writing through a mapping.
            os.posix_fallocate(fd, 0, nbytes)
        except OSError as exc:
            os.close(fd)
            path.unlink()
            if exc.errno in (errno.ENOSPC, errno.ENOMEM):
                raise LoraCacheError(ErrorCode.CACHE_FULL,
                                     f"no space left in {self.directory} for {nbytes} bytes; "
                                     "lower --max-bytes or enlarge the tmpfs") from exc
            raise
        os.close(fd)
        return ShmBuffer(path, nbytes)

    def total_memory(self) -> int:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    def close(self) -> None:
        for leftover in self.directory.glob("*.bin"):
            leftover.unlink()
        self.directory.rmdir()


def open_shm_handle(handle: dict[str, Any]) -> torch.Tensor:
    path, nbytes = handle["path"], handle["nbytes"]
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise LoraCacheError(ErrorCode.MAPPING_FAILED,
                             f"cannot open the daemon's shared-memory file {path}: {exc}; "
                             "the worker must run on the daemon's host with access to its "
                             "shm directory (group loracache)") from exc
    try:
        mapping = mmap.mmap(fd, nbytes, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)
    with warnings.catch_warnings():
        # torch warns that the buffer is not writable: that is the point.
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(mapping, dtype=torch.uint8)
