"""Prometheus metrics (``--metrics-addr``), read from the service at each scrape.

The HTTP server runs in prometheus_client's thread; the cache state belongs to the event loop.
So a scrape asks the loop for a stats snapshot and waits for it: the values are exactly what
``loracache stats`` would print at that moment, and a stuck loop shows as a failed scrape.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Callable, Iterator

from prometheus_client import start_http_server
from prometheus_client.core import (CollectorRegistry, CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, Metric)
from prometheus_client.registry import Collector

from loracache.shared.protocol import LoadTimesInfo, StatsResult

SNAPSHOT_TIMEOUT = 5.0

DEVICE_GAUGES = {  # DeviceStats field -> (metric name, help)
    "budget": ("loracache_budget_bytes", "Cache budget of the device"),
    "used": ("loracache_used_bytes", "Bytes of cached entries on the device"),
    "leased_bytes": ("loracache_leased_bytes", "Bytes of entries with at least one lease"),
    "pinned_bytes": ("loracache_pinned_bytes", "Bytes of pinned entries"),
    "entries": ("loracache_entries", "Cached entries"),
    "leases": ("loracache_leases", "Leases held by clients"),
    "sessions": ("loracache_device_sessions", "Sessions holding leases on the device"),
}
ALLOCATOR_GAUGES = {  # GPUs only: what torch's allocator in the daemon holds
    "allocated_bytes": ("loracache_allocator_allocated_bytes",
                        "Device memory the daemon's allocator has handed out"),
    "reserved_bytes": ("loracache_allocator_reserved_bytes",
                       "Device memory the daemon's allocator holds from the driver"),
    "waiting_bytes": ("loracache_allocator_waiting_bytes",
                      "Memory of evicted entries that workers still map"),
}
TIER_GAUGES = {  # TierStats field -> (metric name, help)
    "budget": ("loracache_tier_budget_bytes", "Budget of a tier behind the devices"),
    "used": ("loracache_tier_used_bytes", "Bytes held by a tier behind the devices"),
    "entries": ("loracache_tier_entries", "Entries of a tier behind the devices"),
}
TIER_COUNTERS = {
    "hits": ("loracache_tier_hits", "Loads served by the tier"),
    "misses": ("loracache_tier_misses", "Loads the tier could not serve"),
    "evictions": ("loracache_tier_evictions", "Entries the tier evicted"),
}
DEVICE_COUNTERS = {
    "hits": ("loracache_hits", "Acquires served from the cache"),
    "misses": ("loracache_misses", "Acquires that loaded the file"),
    "loads": ("loracache_loads", "Files loaded (acquires and preloads)"),
    "evictions": ("loracache_evictions", "Entries evicted"),
}


class StatsCollector(Collector):
    """Turns one stats snapshot per scrape into metric families."""

    def __init__(self, snapshot: Callable[[], StatsResult]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        stats = self._snapshot()
        devices = stats.devices
        for key, (name, help_text) in (*DEVICE_GAUGES.items(), *ALLOCATOR_GAUGES.items()):
            family = GaugeMetricFamily(name, help_text, labels=["device"])
            for device in devices:
                value = getattr(device, key)
                if value is not None:  # allocator figures exist for GPUs only
                    family.add_metric([device.device], value)
            yield family
        for key, (name, help_text) in DEVICE_COUNTERS.items():
            counter = CounterMetricFamily(name, help_text, labels=["device"])
            for device in devices:
                counter.add_metric([device.device], getattr(device, key))
            yield counter
        histogram = HistogramMetricFamily("loracache_load_duration_seconds",
                                          "Time to load a file into the cache", labels=["device"])
        for device in devices:
            times = device.load_seconds
            histogram.add_metric([device.device], _buckets(times), times.sum)
        yield histogram
        stages = HistogramMetricFamily("loracache_load_stage_seconds",
                                       "Time of each stage of loads: read, convert, upload",
                                       labels=["device", "stage"])
        for device in devices:
            for stage, times in device.stage_seconds.items():
                stages.add_metric([device.device, stage], _buckets(times), times.sum)
        yield stages
        yield from _tiers(stats)
        errors = CounterMetricFamily("loracache_errors", "Error replies by code", labels=["code"])
        for code, count in sorted(stats.errors.items()):
            errors.add_metric([code], count)
        yield errors
        yield GaugeMetricFamily("loracache_sessions", "Open client sessions",
                                value=stats.sessions)


def _tiers(stats: StatsResult) -> Iterator[Metric]:
    for key, (name, help_text) in TIER_GAUGES.items():
        family = GaugeMetricFamily(name, help_text, labels=["tier"])
        for tier in stats.tiers:
            family.add_metric([tier.tier], getattr(tier, key))
        yield family
    for key, (name, help_text) in TIER_COUNTERS.items():
        counter = CounterMetricFamily(name, help_text, labels=["tier"])
        for tier in stats.tiers:
            counter.add_metric([tier.tier], getattr(tier, key))
        yield counter
    downloads = HistogramMetricFamily("loracache_download_seconds",
                                      "Time to download a remote LoRA into the disk tier")
    for tier in stats.tiers:
        if tier.load_seconds is not None:
            downloads.add_metric([], _buckets(tier.load_seconds), tier.load_seconds.sum)
    yield downloads


def _buckets(times: LoadTimesInfo) -> list[tuple[str, float]]:
    return [(str(le), n) for le, n in times.buckets]


def loop_snapshot(loop: asyncio.AbstractEventLoop,
                  stats: Callable[[], StatsResult]) -> Callable[[], StatsResult]:
    """A function, callable from any thread, that runs ``stats`` on ``loop`` and returns it."""
    def snapshot() -> StatsResult:
        future: concurrent.futures.Future[StatsResult] = concurrent.futures.Future()

        def take() -> None:
            try:
                future.set_result(stats())
            except Exception as exc:  # reported to the scrape, which fails with it
                future.set_exception(exc)

        loop.call_soon_threadsafe(take)
        return future.result(SNAPSHOT_TIMEOUT)
    return snapshot


class MetricsServer:
    """The /metrics endpoint on its own thread; ``address`` is where it listens."""

    def __init__(self, host: str, port: int, snapshot: Callable[[], StatsResult]) -> None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(StatsCollector(snapshot))
        self._server, self._thread = start_http_server(port, host, registry)
        bound_host, bound_port = self._server.server_address[:2]
        self.address = f"{bound_host!s}:{bound_port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
