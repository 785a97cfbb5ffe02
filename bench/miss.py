"""miss: loading a 256 MiB LoRA into the cache against safetensors.torch.load_file of it.

Both start from a warm page cache (the file is read once first), so the comparison is of the
copy work, not of the disk. Each miss is acquire + release after evicting the entry, so every
acquire loads; the cases alternate within each repetition so drift hits all of them alike.

safetensors >= 0.8 loads through a copy-on-write mmap of the file by default: load_file itself
copies nothing, the pages are faulted in when the tensors are first read. So besides the bare
calls, the table has each side followed by a read of every tensor (the work done before the
weights are usable), and load_file with ``backend="pread"``, which copies eagerly as the daemon
does.
"""

from __future__ import annotations

import gc
import inspect
import time
from pathlib import Path
from typing import Callable

from safetensors.torch import load_file

from loracache.client import LoraCacheClient

from .common import (MiB, bench_daemon, Report, Target, median, ms, ratio, scratch_dir, touch,
                     warm_page_cache, write_lora, x)

TARGET = 1.3  # a miss at most 1.3 x load_file

LOAD_FILE, LOAD_FILE_READ = "load_file", "load_file + read all"
LOAD_FILE_PREAD = "load_file(backend='pread')"
MISS, MISS_READ = "loracache acquire+release (miss)", "loracache miss + read all"


def run(quick: bool) -> Report:
    size, repetitions = (64 * MiB, 3) if quick else (256 * MiB, 5)
    with scratch_dir() as loras:
        path = write_lora(loras / "big.safetensors", rank=128, nbytes=size)
        warm_page_cache(path)
        with bench_daemon(loras, max_bytes="2GiB") as daemon, daemon.client() as client:
            with client.acquire(path) as lease:  # starts the daemon's loader threads
                tensors = len(lease.tensors)
            cases = _cases(client, path)
            samples: dict[str, list[float]] = {name: [] for name in cases}
            for _ in range(repetitions):
                for name, case in cases.items():
                    samples[name].append(case())
            counters = client.stats().device("cpu")
        file_bytes = path.stat().st_size
    if counters.misses != 1 + 2 * repetitions:
        raise RuntimeError(f"expected {1 + 2 * repetitions} misses, the daemon counted {counters}")
    med = {name: median(values) for name, values in samples.items()}
    same_work = {MISS: LOAD_FILE, MISS_READ: LOAD_FILE_READ}
    rows = [[name, ms(med[name]), ms(min(values)), ms(max(values)),
             x(ratio(med[name], med[LOAD_FILE])),
             x(ratio(med[name], med[same_work[name]])) if name in same_work else ""]
            for name, values in samples.items()]
    literal, matched = ratio(med[MISS], med[LOAD_FILE]), ratio(med[MISS_READ], med[LOAD_FILE_READ])
    return Report(
        name="miss",
        title=f"miss of a {file_bytes / MiB:.0f} MiB, {tensors}-tensor LoRA, median of "
              f"{repetitions}",
        headers=["case", "median", "min", "max", "/ load_file", "/ same work"],
        rows=rows,
        targets=[Target("miss / load_file", literal, TARGET),
                 Target("(miss + read all) / (load_file + read all)", matched, TARGET)],
        data={"file_bytes": file_bytes, "tensors": tensors, "samples_s": samples,
              "median_s": med, "ratio_miss_vs_load_file": literal,
              "ratio_miss_read_vs_load_file_read": matched,
              "miss_GBps": file_bytes / med[MISS] / 1e9},
        notes=["'/ same work' compares each loracache case with load_file followed by the same "
               "reads",
               "load_file's default backend maps the file copy-on-write and copies nothing up "
               "front; the daemon copies the whole file into shared memory on a miss"])


def _cases(client: LoraCacheClient, path: Path) -> dict[str, Callable[[], float]]:
    """Each case returns the seconds it took."""

    def miss(read: bool) -> float:
        if client.evict(path).evicted != 1:
            raise RuntimeError(f"evicting {path} did not evict it: {client.list()}")
        started = time.perf_counter()
        with client.acquire(path) as lease:
            if read:
                touch(lease.tensors)
        return time.perf_counter() - started

    def load(read: bool, **kwargs: str) -> float:
        started = time.perf_counter()
        tensors = load_file(str(path), **kwargs)
        if read:
            touch(tensors)
        elapsed = time.perf_counter() - started
        del tensors
        gc.collect()
        return elapsed

    cases = {LOAD_FILE: lambda: load(False), LOAD_FILE_READ: lambda: load(True)}
    if "backend" in inspect.signature(load_file).parameters:  # safetensors >= 0.8
        cases[LOAD_FILE_PREAD] = lambda: load(False, backend="pread")
    cases[MISS] = lambda: miss(False)
    cases[MISS_READ] = lambda: miss(True)
    return cases
