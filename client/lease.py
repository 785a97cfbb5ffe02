"""Leases and the per-process mappings behind them.

A process maps each entry once, however many leases (and clients) it holds on it: the first
lease maps the buffer and builds the tensor views, later ones reuse them. When the last lease on
an entry is released the mapping is dropped; views the caller still holds keep the memory
mapped until they are gone, so nothing is ever freed under a live tensor.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Callable

import torch

from loracache.shared.dtypes import TORCH_DTYPES
from loracache.shared.protocol import AcquireResult, EntryInfo, TensorSpec
from loracache.shared.transport import discard_handle, open_handle

if TYPE_CHECKING:
    from types import TracebackType


@dataclasses.dataclass
class _Mapping:
    buffer: torch.Tensor  # flat uint8 over the whole entry
    tensors: "TensorViews"
    leases: int = 0


class MappingRegistry:
    """The mappings of this process, keyed by (daemon instance, entry id)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._mappings: dict[tuple[str, str], _Mapping] = {}
        self._forgotten: collections.deque[list[str]] = collections.deque()

    def forget(self, key: list[str]) -> None:
        """Detach a lease the garbage collector took without its release. This may run in any
        thread, even one holding the lock: then the next attach or detach does it."""
        self._forgotten.append(key)
        if self._lock.acquire(blocking=False):
            try:
                self._detach_forgotten()
            finally:
                self._lock.release()

    def _detach_forgotten(self) -> None:
        while self._forgotten:
            instance, entry_id = self._forgotten.popleft()
            self._detach_locked((instance, entry_id))

    def attach(self, instance: str, result: AcquireResult,
               table: Sequence[TensorSpec]) -> "TensorViews":
        """Count one more lease on the entry of ``result`` and return its tensor views."""
        key = (instance, result.entry.id)
        with self._lock:
            self._detach_forgotten()
            mapping = self._mappings.get(key)
            if mapping is None:
                buffer = open_handle(result.handle)
                SHARED_STORAGES.add(buffer)
                mapping = _Mapping(buffer, TensorViews(buffer, table))
                self._mappings[key] = mapping
            else:
                discard_handle(result.handle)
            mapping.leases += 1
            return mapping.tensors

    def detach(self, instance: str, entry_id: str) -> None:
        with self._lock:
            self._detach_forgotten()
            self._detach_locked((instance, entry_id))

    def _detach_locked(self, key: tuple[str, str]) -> None:
        mapping = self._mappings[key]
        mapping.leases -= 1
        if mapping.leases == 0:
            del self._mappings[key]


class SharedStorages:
    """The storages of the daemon's memory mapped in this process, for as long as any tensor
    views them (mappings outlive their leases while views remain): memory never to write into.
    On the CPU a write faults; on a GPU it would change the LoRA under every worker."""

    def __init__(self) -> None:
        self._pointers: set[int] = set()

    def add(self, buffer: torch.Tensor) -> None:
        storage = buffer.untyped_storage()
        pointer = storage.data_ptr()
        self._pointers.add(pointer)
        forget = weakref.finalize(storage, self._pointers.discard, pointer)
        forget.atexit = False

    def holds(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` is a view of the daemon's memory."""
        return tensor.untyped_storage().data_ptr() in self._pointers


MAPPINGS = MappingRegistry()
SHARED_STORAGES = SharedStorages()


class TensorViews(Mapping[str, torch.Tensor]):
    """Name -> tensor view into one entry's buffer, each view made on first access.

    Making 200 views eagerly costs about as much as the whole acquire round trip; most callers
    touch each tensor once, so views are made when asked for and then kept.
    """

    def __init__(self, buffer: torch.Tensor, specs: Sequence[TensorSpec]) -> None:
        self._buffer = buffer
        self._specs = {spec.name: spec for spec in specs}
        self._views: dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        view = self._views.get(name)
        if view is None:
            view = self._views[name] = self._make(self._specs[name])
        return view

    def __contains__(self, name: object) -> bool:  # without making the view
        return name in self._specs

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def _make(self, spec: TensorSpec) -> torch.Tensor:
        dtype = TORCH_DTYPES[spec.dtype]
        nbytes = math.prod(spec.shape) * dtype.itemsize
        # The tensor's bytes, seen as its dtype and shape (offsets are 256-byte aligned).
        return self._buffer.narrow(0, spec.offset, nbytes).view(dtype).view(spec.shape)


class Lease:
    """A loan of one cached entry: ``tensors`` stay valid and unchanged until :meth:`release`.

    On CPU the tensors are read-only views of shared memory (writing through them faults);
    on CUDA they are views of the daemon's device buffer. If the daemon restarts, the client
    leases the same file again from the new one and points ``tensors`` at the new copy
    (``generation`` counts these renewals), so code that keeps views should fetch them again
    when ``generation`` changes.
    """

    def __init__(self, lease_id: str, entry: EntryInfo, tensors: Mapping[str, torch.Tensor],
                 on_release: Callable[["Lease"], None], *, instance: str = "",
                 request: tuple[str, str, str] = ("", "", "")) -> None:
        self.id = lease_id
        self.entry = entry
        self.tensors = tensors
        self.instance = instance  # the daemon instance that lent it
        self.request = request  # (path, device, layout) as acquired, to lease it again
        self.generation = 0
        self.orphaned = False
        self._on_release = on_release
        self._released = False
        self._lock = threading.Lock()
        # The mapping it counts on, followed through renewals: collected without a release,
        # the lease is detached from it (the book holds leases weakly; the daemon's side of it
        # ends with the session).
        self._mapping_key = [instance, entry.id]
        self._collected = weakref.finalize(self, MAPPINGS.forget, self._mapping_key)
        self._collected.atexit = False

    def renewed(self, lease_id: str, entry: EntryInfo, tensors: Mapping[str, torch.Tensor],
                instance: str) -> tuple[str, str] | None:
        """Point this lease at the same file's entry in a new daemon instance; returns the
        (instance, entry id) of the mapping it used before, or None if it was released."""
        with self._lock:
            if self._released:
                return None
            old = (self.instance, self.entry.id)
            self.id, self.entry, self.tensors, self.instance = lease_id, entry, tensors, instance
            self._mapping_key[:] = [instance, entry.id]
            self.generation += 1
            self.orphaned = False  # the daemon knows it again
            return old

    def snapshot(self) -> tuple[int, Mapping[str, torch.Tensor]]:
        """``(generation, tensors)`` read together, as a renewal may change both."""
        with self._lock:
            return self.generation, self.tensors

    def orphan(self) -> None:
        """The daemon no longer knows this lease (it restarted, or the session expired, and the
        file could not be leased again): releasing it only lets go of the mapping."""
        self.orphaned = True

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        """Give the entry back to the daemon. Idempotent. The lease lets go of its views, so
        the memory goes once the caller drops those it kept."""
        with self._lock:
            if self._released:
                return
            self._released = True
        self._collected.detach()  # the release detaches it
        self._on_release(self)
        self.tensors = {}

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: "TracebackType | None") -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self._released else f"{len(self.tensors)} tensors"
        return f"<Lease {self.entry.path} on {self.entry.device}: {state}>"
