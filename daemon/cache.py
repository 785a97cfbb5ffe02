"""One device's cache: entries under a byte budget, and the idle ones in LRU order.

Plain state with no I/O, owned by the event loop. It decides *what* to evict; the caller frees
the buffers. Only idle entries (no lease, not pinned) can be evicted, so only they are kept in
LRU order: every operation on the hit path is O(1) however many entries are cached.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import itertools
import time
from typing import Any, Hashable

from loracache.shared.protocol import EntryInfo, LoadTimesInfo, TensorSpec
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
    file: str = ""  # FileIdentity.token of the file it was loaded from
    source: str = ""  # the URL the file was downloaded from, for a remote LoRA
    packed: int = 0  # bytes of its packed tensors (the buffer may be larger: a GPU segment)
    leases: int = 0
    pinned: bool = False
    cached: bool = True  # False: a probe, lent but never in the cache, freed once released
    # (its bytes count in the device's ``reserved`` while it lives)
    last_used: float = dataclasses.field(default_factory=time.monotonic)

    @property
    def nbytes(self) -> int:
        return self.buffer.nbytes

    @property
    def idle(self) -> bool:
        return self.leases == 0 and not self.pinned

    def info(self) -> EntryInfo:
        return EntryInfo(id=self.id, path=self.path, device=self.device, layout=self.layout,
                         nbytes=self.nbytes, leases=self.leases, pinned=self.pinned,
                         idle_s=time.monotonic() - self.last_used if self.idle else 0.0,
                         file=self.file, source=self.source)


class LoadTimes:
    """Durations of loads: cumulative buckets (for a histogram) and recent ones (percentiles)."""

    BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
    RECENT = 1024

    def __init__(self) -> None:
        self.counts = [0] * (len(self.BUCKETS) + 1)  # the last one is +Inf
        self.count = 0
        self.sum = 0.0
        self.recent: collections.deque[float] = collections.deque(maxlen=self.RECENT)

    def record(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.BUCKETS, seconds)] += 1
        self.count += 1
        self.sum += seconds
        self.recent.append(seconds)

    def percentile(self, q: float) -> float | None:
        """The ``q``-th percentile (nearest rank) of the recent loads, or None before any."""
        if not self.recent:
            return None
        ordered = sorted(self.recent)
        return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]

    def stats(self) -> LoadTimesInfo:
        return LoadTimesInfo(
            count=self.count, sum=self.sum,
            buckets=list(zip((*self.BUCKETS, "+Inf"), itertools.accumulate(self.counts))),
            p50=self.percentile(50), p90=self.percentile(90), p99=self.percentile(99))


class DeviceCache:
    """Entries of one device. ``reserved`` counts bytes of loads in flight.

    Lease counts and pins change only through :meth:`lend`, :meth:`give_back` and :meth:`pin`,
    which keep the idle LRU and the byte counters in step.
    """

    def __init__(self, device: str, budget: int, cache_size: int) -> None:
        self.device = device
        self.budget = budget
        self.cache_size = cache_size  # idle entries kept once released
        self.entries: dict[Hashable, Entry] = {}
        self.idle: collections.OrderedDict[Hashable, Entry] = collections.OrderedDict()  # LRU first
        self.used = self.reserved = self.leased_bytes = self.pinned_bytes = self.leases = 0
        self.hits = self.misses = self.loads = self.evictions = 0
        self.load_times = LoadTimes()

    def add(self, entry: Entry) -> None:
        """Add a loaded entry (idle until lent or pinned)."""
        self.entries[entry.key] = entry
        self.idle[entry.key] = entry
        self.used += entry.nbytes

    def remove(self, entry: Entry) -> None:
        """Take an idle entry out (the caller frees its buffer)."""
        assert entry.leases == 0, "a leased entry is never removed"
        del self.entries[entry.key]
        self.idle.pop(entry.key, None)
        self.used -= entry.nbytes
        if entry.pinned:
            self.pinned_bytes -= entry.nbytes
        self.evictions += 1

    def take_all(self) -> list[Entry]:
        """Empty the cache, leased entries included (at shutdown); returns what it held."""
        entries = list(self.entries.values())
        self.entries.clear()
        self.idle.clear()
        self.used = self.leased_bytes = self.pinned_bytes = self.leases = 0
        return entries

    def lend(self, entry: Entry) -> None:
        """Count one more lease (a probe's bytes count as ``reserved``, not as leased)."""
        if entry.leases == 0 and entry.cached:
            self.idle.pop(entry.key, None)
            self.leased_bytes += entry.nbytes
        entry.leases += 1
        self.leases += 1
        entry.last_used = time.monotonic()

    def give_back(self, entry: Entry) -> None:
        entry.leases -= 1
        self.leases -= 1
        entry.last_used = time.monotonic()
        if entry.leases == 0 and entry.cached:
            self.leased_bytes -= entry.nbytes
            if not entry.pinned and entry.key in self.entries:
                self.idle[entry.key] = entry  # most recently used

    def pin(self, entry: Entry) -> None:
        if not entry.pinned:
            entry.pinned = True
            self.pinned_bytes += entry.nbytes
            self.idle.pop(entry.key, None)

    def touch(self, entry: Entry) -> None:
        """Mark an entry used now (an idle one moves to the end of the LRU)."""
        entry.last_used = time.monotonic()
        if entry.key in self.idle:
            self.idle.move_to_end(entry.key)

    def victims_for(self, nbytes: int) -> list[Entry] | None:
        """The LRU idle entries to drop so ``nbytes`` more fit, or None if they cannot."""
        victims, short = self._lru_covering(self.used + self.reserved + nbytes - self.budget)
        return victims if short <= 0 else None

    def over_limits(self) -> list[Entry]:
        """The LRU idle entries to drop to get back under the budget and the cache-size cap
        after either was lowered (every idle one when leased entries alone exceed the budget)."""
        victims, _ = self._lru_covering(self.used + self.reserved - self.budget)
        return victims + [e for e in self.over_cap() if e not in victims]

    def _lru_covering(self, need: int) -> tuple[list[Entry], int]:
        """The least recently used idle entries whose bytes cover ``need``, and what is left."""
        victims = []
        for entry in self.idle.values():
            if need <= 0:
                break
            victims.append(entry)
            need -= entry.nbytes
        return victims, need

    def over_cap(self) -> list[Entry]:
        """The LRU idle entries beyond ``cache_size``."""
        excess = len(self.idle) - self.cache_size
        if excess <= 0:
            return []
        return [entry for entry, _ in zip(self.idle.values(), range(excess))]

    def stats(self) -> dict[str, Any]:
        """The cache's part of its device's :class:`DeviceStats`."""
        return {
            "device": self.device,
            "budget": self.budget,
            "used": self.used,
            "reserved": self.reserved,
            "leased_bytes": self.leased_bytes,
            "pinned_bytes": self.pinned_bytes,
            "entries": len(self.entries),
            "leases": self.leases,
            "cache_size": self.cache_size,
            "hits": self.hits,
            "misses": self.misses,
            "loads": self.loads,
            "evictions": self.evictions,
            "hit_rate": self.hits / (self.hits + self.misses) if self.hits + self.misses else None,
            "load_seconds": self.load_times.stats(),
        }
