"""One device's cache: entries in LRU order under a byte budget and a cap on idle entries.

Plain state with no I/O, owned by the event loop. It decides *what* to evict; the caller frees
the buffers. Leased and pinned entries are never chosen.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any, Hashable

from loracache.shared.protocol import EntryInfo, TensorSpec
from loracache.shared.transport import DeviceBuffer


@dataclasses.dataclass(eq=False)
class Entry:
    id: str
    key: Hashable
    path: str
    device: str
    layout: str
    buffer: DeviceBuffer
    tensors: list[TensorSpec]
    leases: int = 0
    pinned: bool = False
    last_used: float = dataclasses.field(default_factory=time.monotonic)

    @property
    def nbytes(self) -> int:
        return self.buffer.nbytes

    @property
    def evictable(self) -> bool:
        return self.leases == 0 and not self.pinned

    def info(self) -> EntryInfo:
        return EntryInfo(id=self.id, path=self.path, device=self.device, layout=self.layout,
                         nbytes=self.nbytes, leases=self.leases, pinned=self.pinned,
                         idle_s=0.0 if self.leases else time.monotonic() - self.last_used)


class DeviceCache:
    """Entries of one device. ``reserved`` counts bytes of loads in flight."""

    def __init__(self, device: str, budget: int, cache_size: int) -> None:
        self.device = device
        self.budget = budget
        self.cache_size = cache_size  # unleased, unpinned entries kept once released
        self.entries: collections.OrderedDict[Hashable, Entry] = collections.OrderedDict()
        self.used = 0
        self.reserved = 0
        self.hits = self.misses = self.loads = self.evictions = 0

    def lookup(self, key: Hashable) -> Entry | None:
        entry = self.entries.get(key)
        if entry is not None:
            self.touch(entry)
        return entry

    def touch(self, entry: Entry) -> None:
        entry.last_used = time.monotonic()
        self.entries.move_to_end(entry.key)

    def add(self, entry: Entry) -> None:
        self.entries[entry.key] = entry
        self.used += entry.nbytes

    def remove(self, entry: Entry) -> None:
        del self.entries[entry.key]
        self.used -= entry.nbytes
        self.evictions += 1

    def victims_for(self, nbytes: int) -> list[Entry] | None:
        """The LRU evictable entries to drop so ``nbytes`` more fit, or None if they cannot."""
        need = self.used + self.reserved + nbytes - self.budget
        victims = []
        for entry in self.entries.values():
            if need <= 0:
                break
            if entry.evictable:
                victims.append(entry)
                need -= entry.nbytes
        return victims if need <= 0 else None

    def over_cap(self) -> list[Entry]:
        """The LRU idle entries beyond ``cache_size``."""
        idle = [e for e in self.entries.values() if e.evictable]
        return idle[:max(0, len(idle) - self.cache_size)]

    def stats(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "budget": self.budget,
            "used": self.used,
            "reserved": self.reserved,
            "leased_bytes": sum(e.nbytes for e in self.entries.values() if e.leases),
            "pinned_bytes": sum(e.nbytes for e in self.entries.values() if e.pinned),
            "entries": len(self.entries),
            "leases": sum(e.leases for e in self.entries.values()),
            "cache_size": self.cache_size,
            "hits": self.hits,
            "misses": self.misses,
            "loads": self.loads,
            "evictions": self.evictions,
        }
