"""DeviceCache alone: LRU order, budget arithmetic, leased and pinned entries, the idle cap."""

from __future__ import annotations

from loracache.daemon.cache import DeviceCache, Entry
from loracache.shared.transport import DeviceBuffer


class FakeBuffer(DeviceBuffer):
    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes

    def fill(self, f, segments):  # pragma: no cover - the cache never fills
        raise AssertionError

    def export(self):  # pragma: no cover
        raise AssertionError

    def free(self) -> None:  # pragma: no cover
        raise AssertionError


def entry(name: str, nbytes: int = 100, leases: int = 0, pinned: bool = False) -> Entry:
    return Entry(id=name, key=name, path=name, device="cpu", layout="raw",
                 buffer=FakeBuffer(nbytes), tensors=[], leases=leases, pinned=pinned)


def cache_with(*entries: Entry, budget: int = 1000, cache_size: int = 10) -> DeviceCache:
    cache = DeviceCache("cpu", budget, cache_size)
    for e in entries:
        cache.add(e)
    return cache


def test_victims_are_least_recently_used_first():
    a, b, c = entry("a"), entry("b"), entry("c")
    cache = cache_with(a, b, c, budget=300)
    cache.lookup("a")  # a becomes the most recent
    assert cache.victims_for(100) == [b]
    assert cache.victims_for(200) == [b, c]


def test_leased_and_pinned_entries_are_never_victims():
    a, b, c = entry("a", leases=1), entry("b", pinned=True), entry("c")
    cache = cache_with(a, b, c, budget=300)
    assert cache.victims_for(100) == [c]
    assert cache.victims_for(200) is None


def test_reserved_bytes_count_against_the_budget():
    cache = cache_with(entry("a"), budget=300)
    cache.reserved = 150
    assert cache.victims_for(50) == []
    assert cache.victims_for(51) == [cache.entries["a"]]
    cache.entries["a"].leases = 1
    assert cache.victims_for(51) is None


def test_over_cap_keeps_the_most_recent_idle_entries():
    a, b, c, d = entry("a"), entry("b", leases=1), entry("c"), entry("d")
    cache = cache_with(a, b, c, d, cache_size=1)
    assert cache.over_cap() == [a, c]
    cache.cache_size = 0
    assert cache.over_cap() == [a, c, d]


def test_used_follows_adds_and_removes():
    a, b = entry("a", 100), entry("b", 250)
    cache = cache_with(a, b)
    assert cache.used == 350
    cache.remove(a)
    assert cache.used == 250 and cache.evictions == 1
    assert cache.stats()["entries"] == 1
