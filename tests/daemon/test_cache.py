"""DeviceCache alone: LRU order, budget arithmetic, leased and pinned entries, the idle cap."""

from __future__ import annotations

from loracache.daemon.cache import DeviceCache, Entry
from loracache.shared.transport import DeviceBuffer


class SizedBuffer(DeviceBuffer):
    """Only a size: the cache never touches a buffer's memory."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes

    def fill(self, f, segments):
        raise AssertionError("the cache must not fill buffers")

    def write_tensors(self, items):
        raise AssertionError("the cache must not fill buffers")

    def contents(self):
        raise AssertionError("the cache must not read buffers")

    def export(self):
        raise AssertionError("the cache must not export buffers")

    def free(self) -> None:
        raise AssertionError("the cache must not free buffers")


def entry(name: str, nbytes: int = 100) -> Entry:
    return Entry(id=name, key=name, path=name, device="cpu", layout="raw",
                 buffer=SizedBuffer(nbytes), tensors=[])


def cache_with(*entries: Entry, budget: int = 1000, cache_size: int = 10) -> DeviceCache:
    cache = DeviceCache("cpu", budget, cache_size)
    for e in entries:
        cache.add(e)
    return cache


def test_victims_are_least_recently_used_first():
    a, b, c = entry("a"), entry("b"), entry("c")
    cache = cache_with(a, b, c, budget=300)
    cache.touch(a)  # a becomes the most recent
    assert cache.victims_for(100) == [b]
    assert cache.victims_for(200) == [b, c]


def test_a_released_entry_becomes_the_most_recent():
    a, b = entry("a"), entry("b")
    cache = cache_with(a, b, budget=200)
    cache.lend(a)
    cache.give_back(a)
    assert cache.victims_for(100) == [b]


def test_leased_and_pinned_entries_are_never_victims():
    a, b, c = entry("a"), entry("b"), entry("c")
    cache = cache_with(a, b, c, budget=300)
    cache.lend(a)
    cache.pin(b)
    assert cache.victims_for(100) == [c]
    assert cache.victims_for(200) is None
    cache.give_back(a)
    assert cache.victims_for(200) == [c, a]


def test_reserved_bytes_count_against_the_budget():
    a = entry("a")
    cache = cache_with(a, budget=300)
    cache.reserved = 150
    assert cache.victims_for(50) == []
    assert cache.victims_for(51) == [a]
    cache.lend(a)
    assert cache.victims_for(51) is None


def test_over_cap_keeps_the_most_recent_idle_entries():
    a, b, c, d = entry("a"), entry("b"), entry("c"), entry("d")
    cache = cache_with(a, b, c, d, cache_size=1)
    cache.lend(b)
    assert cache.over_cap() == [a, c]
    cache.cache_size = 0
    assert cache.over_cap() == [a, c, d]


def test_counters_follow_leases_pins_and_removals():
    a, b = entry("a", 100), entry("b", 250)
    cache = cache_with(a, b)
    cache.lend(a)
    cache.lend(a)
    cache.pin(b)
    stats = cache.stats()
    assert (stats["used"], stats["leased_bytes"], stats["pinned_bytes"], stats["leases"]) == (
        350, 100, 250, 2)
    cache.give_back(a)
    cache.give_back(a)
    cache.remove(a)
    cache.remove(b)
    stats = cache.stats()
    assert (stats["used"], stats["leased_bytes"], stats["pinned_bytes"], stats["leases"],
            stats["entries"], stats["evictions"]) == (0, 0, 0, 0, 0, 2)
