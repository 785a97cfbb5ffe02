"""What the benchmarks share: a real daemon process, LoRA files, timing, worker processes and
the report (a printed table plus bench/results/<name>.json).

Every figure a benchmark reports is a ratio against a baseline measured in the same run, so
results from different machines or runs are comparable only as ratios.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import json
import math
import multiprocessing
import multiprocessing.context
import multiprocessing.process
import os
import shutil
import statistics
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors.torch import save_file

from examples.daemon_process import PrivateDaemon

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
SD15_WIDTHS = (320, 640, 1280, 768)  # UNet block widths and the text encoder's, in turn
MiB = 1 << 20
PAGE = 4096


# ------------------------------------------------------------------------------ the daemon


def bench_daemon(lora_dir: Path, *args: str, max_bytes: str = "1GiB") -> PrivateDaemon:
    """A real daemon on the CPU, on a private socket and shm directory (removed on exit: use
    it as a context manager)."""
    return PrivateDaemon("--lora-dir", str(lora_dir), "--devices", "cpu", "--max-bytes",
                         max_bytes, "--log-level", "INFO", *args)


@contextlib.contextmanager
def scratch_dir() -> Iterator[Path]:
    """A temporary directory under /tmp for LoRA files (the daemon's --lora-dir)."""
    path = Path(tempfile.mkdtemp(prefix="lc-bench-loras-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------ LoRA files


def write_lora(path: Path, *, rank: int, pairs: int | None = None, nbytes: int | None = None,
               widths: tuple[int, ...] = SD15_WIDTHS, seed: int = 0) -> Path:
    """An fp16 LoRA of down (rank x width) / up (width x rank) pairs, widths taken in turn:
    ``pairs`` of them, or as many as reach ``nbytes``. Shaped like an SD1.5 LoRA, so the
    daemon and the client see a realistic tensor count, not one big blob."""
    if (pairs is None) == (nbytes is None):
        raise ValueError("give exactly one of pairs and nbytes")
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    total, i = 0, 0
    while (i < pairs) if pairs is not None else (total < nbytes):
        width = widths[i % len(widths)]
        tensors[f"lora_unet_{i}.lora_down.weight"] = torch.randn(
            rank, width, generator=generator).half()
        tensors[f"lora_unet_{i}.lora_up.weight"] = torch.randn(
            width, rank, generator=generator).half()
        total += 2 * rank * width * 2
        i += 1
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def warm_page_cache(path: Path) -> None:
    """Read the file once so both sides of a comparison start from the page cache."""
    with open(path, "rb", buffering=0) as f:
        while f.read(8 * MiB):
            pass


def touch(tensors: dict[str, torch.Tensor]) -> int:
    """Read one byte of every page of every tensor (and each one's last byte), which faults
    every page in: what mapping the weights costs, without timing arithmetic on them."""
    total = 0
    for tensor in tensors.values():
        if tensor.numel():
            flat = tensor.reshape(-1).view(torch.uint8)
            total += int(flat[::PAGE].sum()) + int(flat[-1])
    return total


# ---------------------------------------------------------------------------------- timing


def time_calls(fn: Callable[[], object], iterations: int, warmup: int = 0) -> list[float]:
    """Seconds taken by each of ``iterations`` calls of ``fn``, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    samples = []
    clock = time.perf_counter
    for _ in range(iterations):
        started = clock()
        fn()
        samples.append(clock() - started)
    return samples


def percentile(samples: list[float], q: float) -> float:
    """The nearest-rank percentile (``q`` in 0..100) of ``samples``."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def latency_summary(samples: list[float]) -> dict[str, float]:
    return {"n": len(samples), "p50_s": percentile(samples, 50), "p99_s": percentile(samples, 99),
            "mean_s": statistics.fmean(samples)}


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def us(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f} us"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f} ms"


def ratio(value: float, baseline: float) -> float:
    return value / baseline if baseline else math.inf


def x(value: float) -> str:
    return f"{value:.2f} x"


# -------------------------------------------------------------------------- worker processes


@functools.cache
def process_context() -> multiprocessing.context.BaseContext:
    """A forkserver context whose server has torch and the client imported once: workers start
    in milliseconds (spawn would import torch in each, seconds on a small machine) and share
    nothing with this process (fork would copy its sockets and threads)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["bench.common"])
    return context


class WorkerGroup:
    """Worker processes (from :func:`process_context`), each running ``target(link, *args)``
    with ``link`` a pipe to this process. A context manager: workers still alive at exit are
    killed."""

    def __init__(self, target: Callable[..., None], args: list[tuple[Any, ...]]) -> None:
        context = process_context()
        self.links: list[Connection] = []
        self.processes: list[multiprocessing.process.BaseProcess] = []
        try:
            for worker_args in args:
                parent, child = context.Pipe()
                process = context.Process(target=_run_worker, args=(target, child, *worker_args),
                                          daemon=True)
                process.start()
                child.close()
                self.links.append(parent)
                self.processes.append(process)
        except BaseException:
            self.kill()
            raise

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self.processes]

    def send_all(self, message: Any) -> None:
        for link in self.links:
            link.send(message)

    def receive_all(self, timeout: float = 120.0) -> list[Any]:
        """One message from each worker; a worker's exception arrives as an error."""
        messages = []
        for link in self.links:
            if not link.poll(timeout):
                raise TimeoutError(f"a worker did not answer within {timeout:g} s")
            message = link.recv()
            if isinstance(message, WorkerFailed):
                raise RuntimeError(f"a worker failed: {message.error}")
            messages.append(message)
        return messages

    def expect(self, word: str) -> None:
        for said in self.receive_all():
            if said != word:
                raise RuntimeError(f"a worker said {said!r}, expected {word!r}")

    def join(self, timeout: float = 30.0) -> None:
        for process in self.processes:
            process.join(timeout)
            if process.exitcode != 0:
                raise RuntimeError(f"worker {process.pid} exited with {process.exitcode}")

    def kill(self) -> None:
        for process in self.processes:
            if process.is_alive():
                process.kill()
                process.join()
        for link in self.links:
            link.close()

    def __enter__(self) -> "WorkerGroup":
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def _run_worker(target: Callable[..., None], link: Connection, *args: Any) -> None:
    """The start of every worker. The forkserver's heap (torch and all) is shared with the
    workers copy-on-write; gc.freeze() keeps the collector from touching, hence copying, those
    pages, which would show up as memory that a real (not forked) worker never spends."""
    gc.freeze()
    target(link, *args)


@dataclasses.dataclass
class WorkerFailed:
    """Sent by a worker instead of its answer when it raised."""

    error: str


@contextlib.contextmanager
def reporting_failure(link: Connection) -> Iterator[None]:
    """In a worker: send the exception to the parent (so it fails fast), then re-raise."""
    try:
        yield
    except BaseException as exc:
        with contextlib.suppress(OSError):
            link.send(WorkerFailed(repr(exc)))
        raise


# ---------------------------------------------------------------------------------- reports


@dataclasses.dataclass
class Target:
    """A goal on one ratio, e.g. hit p50 at most 1.5 x the echo."""

    metric: str
    value: float
    limit: float

    @property
    def met(self) -> bool:
        return self.value <= self.limit


@dataclasses.dataclass
class Report:
    """One benchmark's outcome: a table for people, ``data`` and ``targets`` for the JSON."""

    name: str
    title: str
    headers: list[str]
    rows: list[list[Any]]
    targets: list[Target] = dataclasses.field(default_factory=list)
    data: dict[str, Any] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)

    def print(self) -> None:
        print(f"\n== {self.name}: {self.title}")
        print_table(self.headers, self.rows)
        for note in self.notes:
            print(f"   note: {note}")
        for target in self.targets:
            verdict = "met" if target.met else "MISSED"
            print(f"   target {target.metric}: {target.value:.2f} <= {target.limit:g} -> {verdict}")

    def save(self, quick: bool) -> Path:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path = RESULTS_DIR / f"{self.name}.json"
        payload = {"name": self.name, "title": self.title, "quick": quick,
                   "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpus": os.cpu_count(),
                   "headers": self.headers, "rows": self.rows, "notes": self.notes,
                   "targets": [{**dataclasses.asdict(t), "met": t.met} for t in self.targets],
                   "data": self.data}
        path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
        return path


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("   " + "  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    for row in cells:
        print("   " + "  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
