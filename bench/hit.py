"""hit: acquire + release of a cached, realistic LoRA against a bare ZeroMQ + msgpack echo.

A hit costs two round trips (acquire, release) plus what the client does per lease: mapping the
entry and building its tensor views, unless this process maps it already through another lease.
The echoes (bench/echo.py) show what the same round trips cost with nothing behind them. Cases
run in interleaved rounds so that a slow patch of the machine does not land on one side only.
"""

from __future__ import annotations

import contextlib
import functools
import time
from pathlib import Path
from typing import Callable

from loracache.client import LoraCacheClient

from .common import (bench_daemon, Report, Target, latency_summary, ratio, scratch_dir, us,
                     write_lora, x)
from .echo import EchoClient, EchoServer

TARGET = 1.5  # hit p50 at most 1.5 x the echo
ROUNDS = 4

Samples = dict[str, list[float]]

ECHO_ASYNC_1, ECHO_ASYNC_2 = "asyncio ROUTER echo, acquire-sized", "asyncio ROUTER echo, 2 msgs"
ECHO_SYNC_1, ECHO_SYNC_2 = "sync ROUTER echo, acquire-sized", "sync ROUTER echo, 2 msgs"
ACQUIRE, RELEASE, HIT = "loracache acquire", "loracache release", "loracache acquire+release"
MAPPED_HIT = "loracache acquire+release, already mapped"
VIEWED_HIT = "loracache acquire+release, every view made"
ROUND_TRIPS = {ECHO_ASYNC_1: 1, ECHO_ASYNC_2: 2, ECHO_SYNC_1: 1, ECHO_SYNC_2: 2, ACQUIRE: 1,
               RELEASE: 1, HIT: 2, MAPPED_HIT: 2, VIEWED_HIT: 2}


def run(quick: bool) -> Report:
    iterations, warmup = (400, 50) if quick else (2000, 300)
    with scratch_dir() as loras:
        path = write_lora(loras / "hit.safetensors", rank=16, pairs=100)
        with (bench_daemon(loras) as daemon, daemon.client() as client,
              EchoServer("asyncio") as async_server, EchoServer("sync") as sync_server):
            async_echo = EchoClient(async_server.endpoint, str(path))
            sync_echo = EchoClient(sync_server.endpoint, str(path))
            with client.acquire(path) as lease:
                tensors = len(lease.tensors)
            cases: list[Callable[[int], Samples]] = [
                functools.partial(_echo_samples, async_echo, ECHO_ASYNC_1, ECHO_ASYNC_2),
                functools.partial(_echo_samples, sync_echo, ECHO_SYNC_1, ECHO_SYNC_2),
                functools.partial(_hit_samples, client, path),
                functools.partial(_variant_samples, client, path, MAPPED_HIT, True, False),
                functools.partial(_variant_samples, client, path, VIEWED_HIT, False, True),
            ]
            try:
                samples = _interleaved(cases, iterations, warmup)
            finally:
                async_echo.close()
                sync_echo.close()
        size = path.stat().st_size
    return _report(samples, tensors, size)


def _interleaved(cases: list[Callable[[int], Samples]], iterations: int, warmup: int) -> Samples:
    """Every case for ``iterations`` in ROUNDS interleaved rounds, after a warmup of each."""
    for case in cases:
        case(warmup)
    samples: Samples = {}
    for _ in range(ROUNDS):
        for case in cases:
            for name, values in case(iterations // ROUNDS).items():
                samples.setdefault(name, []).extend(values)
    return samples


def _echo_samples(echo: EchoClient, one_name: str, two_name: str, n: int) -> Samples:
    clock = time.perf_counter
    one, two = [], []
    for _ in range(n):
        started = clock()
        echo.acquire_like()
        one.append(clock() - started)
    for _ in range(n):
        started = clock()
        echo.hit_like()
        two.append(clock() - started)
    return {one_name: one, two_name: two}


def _hit_samples(client: LoraCacheClient, path: Path, n: int) -> Samples:
    """Acquire and release timed apart; no other lease holds the entry, so every acquire maps
    it and builds its views afresh (what a worker switching LoRAs sees)."""
    clock = time.perf_counter
    acquires, releases, totals = [], [], []
    for _ in range(n):
        started = clock()
        lease = client.acquire(path)
        acquired = clock()
        lease.release()
        released = clock()
        acquires.append(acquired - started)
        releases.append(released - acquired)
        totals.append(released - started)
    return {ACQUIRE: acquires, RELEASE: releases, HIT: totals}


def _variant_samples(client: LoraCacheClient, path: Path, name: str, keep_mapped: bool,
                     make_views: bool, n: int) -> Samples:
    """Hits with one thing changed. ``keep_mapped``: another lease keeps the entry mapped, so
    only the round trips remain, which shows what mapping the entry costs. ``make_views``: every
    tensor is looked up once, which a caller applying the LoRA does (the views are lazy)."""
    clock = time.perf_counter
    totals = []
    with contextlib.ExitStack() as stack:
        if keep_mapped:
            stack.enter_context(client.acquire(path))
        for _ in range(n):
            started = clock()
            with client.acquire(path) as lease:
                if make_views:
                    for _tensor in lease.tensors.values():
                        pass
            totals.append(clock() - started)
    return {name: totals}


def _report(samples: Samples, tensors: int, size: int) -> Report:
    summary = {name: latency_summary(values) for name, values in samples.items()}
    p50 = {name: s["p50_s"] for name, s in summary.items()}

    def against(name: str, one: str, two: str) -> float:
        return ratio(p50[name], p50[one if ROUND_TRIPS[name] == 1 else two])

    rows = [[name, ROUND_TRIPS[name], us(s["p50_s"]), us(s["p99_s"]),
             x(against(name, ECHO_ASYNC_1, ECHO_ASYNC_2)),
             x(against(name, ECHO_SYNC_1, ECHO_SYNC_2))] for name, s in summary.items()]
    literal = ratio(p50[HIT], p50[ECHO_ASYNC_1])
    matched = ratio(p50[HIT], p50[ECHO_ASYNC_2])
    return Report(
        name="hit",
        title=f"hit latency, {tensors}-tensor LoRA of {size / 2**20:.1f} MiB, "
              f"{summary[HIT]['n']} iterations",
        headers=["case", "round trips", "p50", "p99", "p50 / asyncio echo", "p50 / sync echo"],
        rows=rows,
        targets=[Target("hit p50 / asyncio echo (one round trip)", literal, TARGET),
                 Target("hit p50 / asyncio echo (same two round trips)", matched, TARGET)],
        data={"tensors": tensors, "file_bytes": size, "latency": summary,
              "ratio_hit_vs_echo_1rt": literal, "ratio_hit_vs_echo_2rt": matched,
              "ratio_hit_vs_sync_echo_1rt": ratio(p50[HIT], p50[ECHO_SYNC_1]),
              "ratio_hit_vs_sync_echo_2rt": ratio(p50[HIT], p50[ECHO_SYNC_2])},
        notes=["each case is compared with the echo of the same number of round trips; a hit "
               "is two (acquire, release)",
               "'already mapped': another lease keeps the entry mapped (no mmap, views reused); "
               "'every view made': each tensor is looked up once, as applying the LoRA does"])
