"""throughput: hits per second from 1, 4 and 16 client processes, and hit latency as the cache
grows from 10 to 10,000 entries.

The first part compares with the asyncio echo (bench/echo.py) driven by as many processes,
each doing the two round trips of a hit, and with loracache's own single-process rate. Every
process runs for the same wall-clock window, started together. The second part fills a daemon
with tiny LoRAs and times hits on a random subset: a hit should not cost more in a bigger
cache, so the figure is p50 at the largest size over p50 at 10 entries.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import random
import shutil
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Callable

from loracache.client import LoraCacheClient

from examples.daemon_process import PrivateDaemon

from .common import (bench_daemon, Report, Target, WorkerGroup, latency_summary, ratio,
                     reporting_failure, scratch_dir, time_calls, us, write_lora, x)
from .echo import EchoClient, EchoServer

FLAT_TARGET = 1.25  # "flat": hit p50 with the most entries at most 1.25 x with 10 (our margin)
HIT_LORAS = 4  # entries the throughput clients cycle through
SUBSET = 200  # entries hit in the latency part; below the client's table cache (256)
LORACACHE, ECHO = "loracache", "echo"


def run(quick: bool) -> Report:
    processes = (1, 4) if quick else (1, 4, 16)
    window = 1.0 if quick else 3.0
    sizes = (10, 100, 1000) if quick else (10, 1000, 10_000)
    iterations = 300 if quick else 1000  # a hit among 10,000 entries may take 10s of ms
    with scratch_dir() as loras:
        paths = [write_lora(loras / f"hit{i}.safetensors", rank=16, pairs=100, seed=i)
                 for i in range(HIT_LORAS)]
        with bench_daemon(loras) as daemon, EchoServer("asyncio") as echo:
            rates = {kind: {n: _rate(n, kind, window, daemon, echo, paths) for n in processes}
                     for kind in (ECHO, LORACACHE)}
    with scratch_dir() as loras:
        latency = _latency_by_entries(loras, sizes, iterations)
    rows = []
    for n in processes:
        rate = rates[LORACACHE][n]
        rows.append([f"{n} client process{'es' if n > 1 else ''}", f"{rate:,.0f} hits/s",
                     x(ratio(rate, rates[ECHO][n])), x(ratio(rate, rates[LORACACHE][1]))])
    for size in sizes:
        p50 = latency[size]["p50_s"]
        rows.append([f"{size:,} entries cached", f"p50 {us(p50)}, p99 "
                                                  f"{us(latency[size]['p99_s'])}", "",
                     x(ratio(p50, latency[sizes[0]]["p50_s"]))])
    flat = ratio(latency[sizes[-1]]["p50_s"], latency[sizes[0]]["p50_s"])
    return Report(
        name="throughput",
        title=f"hits/s over a {window:g} s window; hit latency by cache size",
        headers=["case", "value", "/ asyncio echo, same processes", "/ 1 process, / 10 entries"],
        rows=rows,
        targets=[Target(f"hit p50 at {sizes[-1]:,} entries / at {sizes[0]:,}", flat,
                        FLAT_TARGET)],
        data={"window_s": window, "rates_per_s": rates, "latency_by_entries": latency,
              "flatness": flat},
        notes=["hits/s: acquire + release of a 200-tensor LoRA (4 of them, in turn); the echo "
               "does the same two round trips per hit",
               f"latency by cache size: tiny 2-tensor LoRAs, hits on {SUBSET} random entries",
               "the client processes and the daemon share this machine's CPUs"])


# ------------------------------------------------------------------------------ hits per second


def _rate(n: int, kind: str, window: float, daemon: PrivateDaemon, echo: EchoServer,
          paths: list[Path]) -> float:
    """Hits per second from ``n`` processes over the same ``window``."""
    target = str(daemon.socket) if kind == LORACACHE else echo.endpoint
    args = [(kind, target, [str(p) for p in paths], window)] * n
    with WorkerGroup(_rate_worker, args) as workers:
        workers.expect("ready")
        workers.send_all(time.monotonic() + 0.2)  # CLOCK_MONOTONIC is the same in every process
        counts = workers.receive_all()
        workers.join()
    return sum(counts) / window


def _rate_worker(link: Connection, kind: str, target: str, paths: list[str],
                 window: float) -> None:
    """Warm up, then count the hits completed within [start, start + window)."""
    with reporting_failure(link):
        hit, close = _hitter(kind, target, paths)
        for _ in range(20):
            hit()
        link.send("ready")
        start = link.recv()
        time.sleep(max(0.0, start - time.monotonic()))
        deadline, count = start + window, 0
        while time.monotonic() < deadline:
            hit()
            count += 1
        close()
        link.send(count)


def _hitter(kind: str, target: str, paths: list[str]) -> tuple[Callable[[], None],
                                                               Callable[[], None]]:
    if kind == ECHO:
        echo = EchoClient(target, paths[0])
        return echo.hit_like, echo.close
    client = LoraCacheClient(target)
    turn = itertools.cycle(paths)

    def hit() -> None:
        client.acquire(next(turn)).release()

    return hit, client.close


# --------------------------------------------------------------------- latency by cache size


def _latency_by_entries(loras: Path, sizes: tuple[int, ...],
                        iterations: int) -> dict[int, dict[str, float]]:
    """Hit p50/p99 on a random subset after preloading the cache to each of ``sizes``."""
    template = write_lora(loras / "tiny.safetensors", rank=4, pairs=1, widths=(64,))
    paths = [template]
    for i in range(1, sizes[-1]):
        paths.append(loras / f"tiny{i:05d}.safetensors")
        shutil.copyfile(template, paths[-1])
    rng = random.Random(0)
    results = {}
    with (bench_daemon(loras, "--cache-size", str(2 * sizes[-1])) as daemon,
          daemon.client() as client):
        loaded = 0
        for size in sizes:
            _preload(daemon, paths[loaded:size])
            loaded = size
            entries = client.stats().device("cpu").entries
            if entries != size:
                raise RuntimeError(f"expected {size} cached entries, the daemon has {entries}")
            subset = rng.sample(paths[:size], min(SUBSET, size))
            for path in subset:  # fetch each table once, as a long-running worker would have
                client.acquire(path).release()
            picks = iter([rng.choice(subset) for _ in range(iterations)])
            results[size] = latency_summary(
                time_calls(lambda p=picks: client.acquire(next(p)).release(), iterations))
    return results


def _preload(daemon: PrivateDaemon, paths: list[Path]) -> None:
    """Load ``paths`` into the cache, a few requests in flight at once to save time."""
    def preload_chunk(chunk: list[Path]) -> None:
        with daemon.client(heartbeat=False) as client:
            for path in chunk:
                client.preload(path)

    chunks = [paths[i::4] for i in range(4)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(preload_chunk, chunks))
