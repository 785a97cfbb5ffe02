"""The host tier: copies in host memory of entries their device evicted for room.

An entry evicted to make room keeps its packed bytes here, in the layout it was converted to,
so a later acquire on any device gets it back at copy speed instead of reading, parsing and
converting its file again. The copies are shared-memory segments of the daemon's CPU
transport: a CPU entry moves here and back without a copy, and a CPU lease of a copy's file
and layout takes the copy itself, so the node holds one host copy, not two. The tier is an LRU
under its own byte budget (``host_max_bytes``). Plain state owned by the event loop; the
caller frees what it hands back.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Hashable

from loracache.shared.protocol import EntryInfo, TensorSpec, TierStats
from loracache.shared.transport import DeviceBuffer, Transport


@dataclasses.dataclass(eq=False)
class HostCopy:
    """One evicted entry's bytes in host memory (a CPU transport buffer)."""

    key: Hashable  # (FileIdentity, layout), as the device caches key entries
    path: str
    layout: str
    source: str  # the URL it was downloaded from, or ""
    file: str  # FileIdentity.token
    buffer: DeviceBuffer
    tensors: list[TensorSpec]

    @property
    def nbytes(self) -> int:
        return self.buffer.nbytes

    def info(self) -> EntryInfo:
        return EntryInfo(id="", path=self.path, device="host", layout=self.layout,
                         nbytes=self.nbytes, file=self.file, tier="host", source=self.source)


class HostTier:
    """Host copies by key, least recently used first; ``transport`` makes their buffers."""

    def __init__(self, transport: Transport, budget: int) -> None:
        self.transport = transport
        self.budget = budget
        self.copies: collections.OrderedDict[Hashable, HostCopy] = collections.OrderedDict()
        self.used = 0
        self.hits = self.misses = self.evictions = 0

    def find(self, key: Hashable) -> HostCopy | None:
        """The copy of ``key``, marked used, or None (a miss: the file is read)."""
        copy = self.copies.get(key)
        if copy is None:
            self.misses += 1
            return None
        self.hits += 1
        self.copies.move_to_end(key)
        return copy

    def take(self, key: Hashable) -> HostCopy | None:
        """Take the copy of ``key`` out (a CPU entry is made of it), if it is still here."""
        copy = self.copies.pop(key, None)
        if copy is not None:
            self.used -= copy.nbytes
        return copy

    def keep(self, copy: HostCopy) -> list[DeviceBuffer]:
        """Keep ``copy`` as the most recent; returns the buffers to free: the least recent
        copies beyond the budget (``copy``'s own if it alone exceeds it)."""
        if copy.nbytes > self.budget:
            return [copy.buffer]
        freed = self.take(copy.key)
        self.copies[copy.key] = copy
        self.used += copy.nbytes
        return ([freed.buffer] if freed is not None else []) + self._over_budget()

    def drop_oldest(self) -> list[DeviceBuffer]:
        """Take out the least recently used copy (its file system is full); its buffer."""
        _, victim = self.copies.popitem(last=False)
        self.used -= victim.nbytes
        self.evictions += 1
        return [victim.buffer]

    def drop(self, match: Callable[[str], bool]) -> list[DeviceBuffer]:
        """Take out the copies whose path ``match`` accepts; returns their buffers to free."""
        dropped = [copy for copy in self.copies.values() if match(copy.path)]
        for copy in dropped:
            self.take(copy.key)
        return [copy.buffer for copy in dropped]

    def shrink(self, budget: int) -> list[DeviceBuffer]:
        """A new budget; returns the buffers of the copies it no longer holds."""
        self.budget = budget
        return self._over_budget()

    def _over_budget(self) -> list[DeviceBuffer]:
        victims = []
        while self.used > self.budget:
            victims += self.drop_oldest()
        return victims

    def stats(self) -> TierStats:
        return TierStats(tier="host", budget=self.budget, used=self.used,
                         entries=len(self.copies), hits=self.hits, misses=self.misses,
                         evictions=self.evictions)

