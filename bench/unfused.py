"""unfused: diffusers' unfused LoRA API over the daemon's shared copy (``load_lora_weights``),
against fused LoRAs and against diffusers' own loading, on an SD 1.5-shaped UNet (CPU, float32).

The UNet has the real SD 1.5 shapes (860 M parameters, random weights, built as in ``fuse``).
The LoRAs are random, rank 16, in diffusers' PEFT keys, on the UNet's 192 attention,
feed-forward and proj_in/proj_out layers (as ``fuse``'s), stored in float32, the pipeline's
dtype, so nothing is cast: 26 MiB each. In the same run:

1. **Switch per request.** Two adapters loaded unfused through loracache, alternating
   ``pipe.set_adapters(["a"], [1.0])`` and ``(["b"], [1.0])`` (diffusers' own call), against
   the fused switch: both loaded with ``load_and_fuse_lora``, alternating
   ``set_and_fuse_adapters(pipe, ["a"])`` and ``["b"]``. Also one adapter's load:
   ``load_lora_weights`` of a LoRA in the daemon's cache against diffusers'
   ``pipe.load_lora_weights(path)`` (page cache warm).
2. **Denoising step.** One UNet forward (latent 1x4x32x32, text embeddings 1x77x768,
   ``torch.no_grad``) with one adapter unfused, and with two active (``set_adapters``), against
   the same adapter fused (a fused UNet is the bare one: fusing leaves no layer behind). Each
   repetition runs the fused and the unfused cases, in turns, so drift on the machine hits
   them alike. While timing, glibc's malloc keeps freed memory in the heap (``mallopt``), else
   every step faults its activations in afresh, and the faults' varying cost hides the
   difference (``_heap_kept``).
3. **Hotswap under torch.compile** (full run only: compiling takes over a minute here).
   ``pipe.enable_lora_hotswap(target_rank=16)``, the first adapter loaded through loracache,
   the UNet compiled with inductor (``pipe.unet.compile()``, at the first step: 60-80 s on 2
   cores, from an empty cache of its own), then ``load_lora_weights(..., hotswap=True)`` of the
   other adapter under ``torch._dynamo.config.patch(error_on_recompile=True)``, each swap
   followed by a step, alternating with diffusers' own ``pipe.load_lora_weights(path,
   hotswap=True)`` of the first adapter. A recompilation would raise; it is reported, as is
   the count of graphs compiled.
4. **Memory of N = 1, 2, 4, 8 workers** (1, 2, 4 in ``--quick``), each holding the same K = 10
   adapters unfused (2 in ``--quick``). Each worker process holds the whole pipeline: the UNet
   built on the meta device, its base weights assigned (``assign=True``) from one safetensors
   file that safetensors maps copy-on-write, so they are file-backed and shared through the
   page cache (3.2 GiB per worker that is not the worker's own: 8 workers fit in 24 GB). The
   file is sparse (zeros; the workers run no step). A worker warms up (a 2-layer LoRA loaded
   and unloaded: imports, PEFT's first use), then loads the K adapters and reads every page of
   their weights, as a step would. Counted per worker: the growth of its anonymous memory
   (``memory_maps``: memory backed by no file, where a private copy lands) from before loading
   to after, and of that, the bytes of LoRA weights that lie in anonymous memory (their
   addresses against ``/proc/self/maps``), i.e. private copies. The node total adds the one
   shared copy: for loracache the daemon's entries (``client.list()``), for diffusers the LoRA
   files' pages mapped by the workers (their PSS summed over workers: each page once). The
   workers load one group after another in the same processes (the first, then the second,
   then two more, then four more), and every loaded worker is measured at each N.
   Three ways of loading (two in ``--quick``): loracache (the float32 files, through the
   daemon); diffusers' ``pipe.load_lora_weights(path)`` of the same float32 files; and of
   float16 copies of them, as LoRAs are usually published, which PEFT casts to the pipeline's
   float32 in each worker (the daemon would cast them once for every worker: ``sd:F32``).
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import dataclasses
import gc
import json
import os
import shutil
import struct
import tempfile
import time
import warnings
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable, Iterator

import psutil
import torch
from safetensors.torch import load_file, save_file

from examples.model_shapes import sd15_pipeline
from loracache.client import (LoraCacheClient, delete_adapters, load_and_fuse_lora,
                              load_lora_weights, set_and_fuse_adapters)
from loracache.shared.dtypes import SAFETENSORS_NAMES

from .common import (MiB, Report, Target, WorkerFailed, WorkerGroup, bench_daemon, median, ms,
                     print_table, ratio, reporting_failure, scratch_dir, touch, warm_page_cache,
                     x)
from .fuse import _MachineLoad, _load_note, _lora_shapes, _quiet_diffusers

RANK = 16
TARGET_COPIES = 1.1  # loracache: the LoRA tensors on the node at most 1.1 x one copy, every N
# A per-request set_adapters at most 0.2 x a fused switch (5 x cheaper); measured about 0.05 x
# on an idle 2-core machine: see the notes in bench/README.md.
TARGET_SWITCH = 0.2
TARGET_NO_OP = 0.01  # asking for the set already fused rewrites nothing
LATENT, TEXT = (1, 4, 32, 32), (1, 77, 768)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
INDUCTOR_CACHE = "TORCHINDUCTOR_CACHE_DIR"
HOTSWAP_BACKEND = "inductor"  # compiles in 60-80 s here (on 2 quiet cores)

SWITCH_SET = "switch: set_adapters (unfused, loracache)"
SWITCH_FUSED = "switch: set_and_fuse_adapters (fused)"
SWITCH_SAME = "switch: set_and_fuse_adapters to the set fused"
LOAD_LC = "load: load_lora_weights (loracache, cached)"
LOAD_DF = "load: pipe.load_lora_weights (diffusers)"
STEP_FUSED = "step: 1 adapter fused"
STEP_UNFUSED = "step: 1 adapter unfused"
STEP_UNFUSED2 = "step: 2 adapters unfused"
COMPILE = "hotswap: compile + first step"
STEP_COMPILED = "hotswap: compiled step"
HOTSWAP_LC = "hotswap: load_lora_weights (loracache)"
HOTSWAP_DF = "hotswap: pipe.load_lora_weights (diffusers)"
ROWS = [  # (case, its baseline in the ratio column)
    (SWITCH_FUSED, None), (SWITCH_SAME, SWITCH_FUSED), (SWITCH_SET, SWITCH_FUSED),
    (LOAD_DF, None), (LOAD_LC, LOAD_DF),
    (STEP_FUSED, None), (STEP_UNFUSED, STEP_FUSED),
    (STEP_UNFUSED2, STEP_FUSED), (COMPILE, None), (STEP_COMPILED, STEP_UNFUSED),
    (HOTSWAP_DF, None), (HOTSWAP_LC, HOTSWAP_DF)]

LORACACHE, DIFFUSERS, DIFFUSERS_F16 = "loracache", "diffusers", "diffusers, fp16 file"
FILE_DTYPES = {LORACACHE: torch.float32, DIFFUSERS: torch.float32, DIFFUSERS_F16: torch.float16}

Samples = dict[str, list[float]]


def run(quick: bool) -> Report:
    repetitions, switches = (1, 3) if quick else (5, 10)
    adapters, counts = (2, (1, 2, 4)) if quick else (10, (1, 2, 4, 8))
    modes = [LORACACHE, DIFFUSERS] if quick else [LORACACHE, DIFFUSERS, DIFFUSERS_F16]
    _quiet()
    machine = _MachineLoad()
    with scratch_dir() as loras, scratch_dir() as base_dir:
        shapes = _lora_shapes()
        written = {dtype: [_write_lora(loras / f"lora{i}-{name}.safetensors", shapes, seed=i,
                                       dtype=dtype) for i in range(adapters)]
                   for name, dtype in (("f32", torch.float32), ("f16", torch.float16))
                   if dtype == torch.float32 or DIFFUSERS_F16 in modes}
        files = {mode: written[FILE_DTYPES[mode]] for mode in modes}
        warm = {mode: _write_lora(loras / f"warm-{mode}.safetensors", shapes, seed=99,
                                  dtype=FILE_DTYPES[mode], layers=2) for mode in modes}
        for paths in written.values():
            for path in paths:
                warm_page_cache(path)
        a, b = files[LORACACHE][:2]
        with (bench_daemon(loras, "--cache-size", "64", max_bytes="2GiB") as daemon,
              daemon.client() as client):
            for path in files[LORACACHE]:  # in the daemon's cache: what load_lora_weights
                client.preload(path, layout="sd:F32")  # leases ...
            for path in (a, b):  # ... and what load_and_fuse_lora does
                client.preload(path, layout="sd")
            pipe = sd15_pipeline(torch.float32)
            misses = _misses(client)
            bench = _Timing(pipe, client, a, b)
            hotswap: dict[str, Any] = {}
            with _heap_kept() as kept:
                samples = bench.measure(repetitions, switches)
                if not quick:
                    with _inductor_cache():
                        hotswap = bench.hotswap(repetitions=2)
                    samples.update(hotswap.pop("samples"))
            load = machine.stop()  # the timed part (the workers' CPU would count as others')
            if _misses(client) != misses:
                raise RuntimeError(f"a timed loracache load missed the cache: "
                                   f"{_misses(client) - misses} misses")
            del bench, pipe
            gc.collect()
            torch._dynamo.reset()
            base = _sparse_weights(base_dir / "unet.safetensors")
            memory = {mode: _memory(mode, counts, daemon, base, files[mode], warm[mode],
                                    shared_root=daemon.shm_root if mode == LORACACHE else loras)
                      for mode in modes}
            daemon_bytes = sum(entry.nbytes for entry in client.list()
                               if entry.layout == "sd:F32"
                               and Path(entry.path) in files[LORACACHE])
        lora_bytes = sum(path.stat().st_size for path in files[LORACACHE])
    return _report(samples, hotswap, memory, daemon_bytes, lora_bytes, adapters, counts,
                   len(shapes), repetitions, {**load, "heap_kept": kept})


# ------------------------------------------------------------------------ timing in this process


class _Timing:
    """Switches, loads and steps on one pipeline. Each case starts and ends with no LoRA."""

    def __init__(self, pipe: Any, client: LoraCacheClient, path_a: Path, path_b: Path) -> None:
        self.pipe, self.client, self.paths = pipe, client, {"a": path_a, "b": path_b}
        generator = torch.Generator().manual_seed(0)
        self.inputs = (torch.randn(LATENT, generator=generator), torch.tensor(500),
                       torch.randn(TEXT, generator=generator))

    def measure(self, repetitions: int, switches: int) -> Samples:
        self.step()  # first calls pay for allocator growth, oneDNN's set-up and imports
        self._load("a")
        self.pipe.set_adapters(["a"], [1.0])
        self.pipe.unload_lora_weights()
        self.pipe.load_lora_weights(str(self.paths["a"]), adapter_name="a")
        self.pipe.unload_lora_weights()
        self._fuse("a")
        delete_adapters(self.pipe)
        gc.collect()
        samples: Samples = {}
        cases: list[Callable[[], Samples]] = [lambda: self.fused(switches),
                                              lambda: self.unfused(switches)]
        for _ in range(repetitions):
            for case in cases:
                for name, values in case().items():
                    samples.setdefault(name, []).extend(values)
            cases.reverse()  # neither goes first every time
        return samples

    def step(self) -> float:
        sample, timestep, text = self.inputs
        with torch.no_grad():
            return _timed(lambda: self.pipe.unet(sample, timestep, encoder_hidden_states=text))

    def fused(self, switches: int) -> Samples:
        pipe = self.pipe
        self._fuse("a")
        self._fuse("b")
        set_and_fuse_adapters(pipe, ["a"])
        step = self.step()
        times = []
        for _ in range(switches):
            times.append(_timed(lambda: set_and_fuse_adapters(pipe, ["b"])))
            times.append(_timed(lambda: set_and_fuse_adapters(pipe, ["a"])))
        again = [_timed(lambda: set_and_fuse_adapters(pipe, ["a"])) for _ in range(switches)]
        delete_adapters(pipe)
        return {STEP_FUSED: [step], SWITCH_FUSED: times, SWITCH_SAME: again}

    def unfused(self, switches: int) -> Samples:
        pipe = self.pipe
        load = _timed(lambda: self._load("a"))
        self._load("b")
        pipe.set_adapters(["a"], [1.0])
        step = self.step()
        pipe.set_adapters(["a", "b"], [1.0, 1.0])
        step2 = self.step()
        times = []
        for _ in range(switches):
            times.append(_timed(lambda: pipe.set_adapters(["b"], [1.0])))
            times.append(_timed(lambda: pipe.set_adapters(["a"], [1.0])))
        pipe.unload_lora_weights()
        df_load = _timed(lambda: pipe.load_lora_weights(str(self.paths["a"]), adapter_name="a"))
        pipe.unload_lora_weights()
        gc.collect()
        return {STEP_UNFUSED: [step], STEP_UNFUSED2: [step2], SWITCH_SET: times,
                LOAD_LC: [load], LOAD_DF: [df_load]}

    def hotswap(self, repetitions: int) -> dict[str, Any]:
        """Compile the UNet with one adapter hotswap-ready, then swap to the other and back."""
        pipe = self.pipe
        pipe.enable_lora_hotswap(target_rank=RANK)
        self._load("a", "x")
        pipe.unet.compile(backend=HOTSWAP_BACKEND)  # compiled at the first step
        compile_s = self.step()
        samples: Samples = {COMPILE: [compile_s], STEP_COMPILED: [self.step()],
                            HOTSWAP_LC: [], HOTSWAP_DF: []}
        graphs = _compiled_graphs()
        recompiled = ""
        try:
            with torch._dynamo.config.patch(error_on_recompile=True):
                for _ in range(repetitions):
                    samples[HOTSWAP_LC].append(_timed(lambda: self._load("b", "x", True)))
                    samples[STEP_COMPILED].append(self.step())
                    samples[HOTSWAP_DF].append(_timed(lambda: pipe.load_lora_weights(
                        str(self.paths["a"]), adapter_name="x", hotswap=True)))
                    samples[STEP_COMPILED].append(self.step())
        except torch._dynamo.exc.RecompileError as exc:
            recompiled = str(exc).splitlines()[0]
        return {"samples": samples, "recompiled": recompiled,
                "graphs_added": _compiled_graphs() - graphs, "backend": HOTSWAP_BACKEND}

    def _fuse(self, name: str) -> None:
        load_and_fuse_lora(self.pipe, self.paths[name], name, client=self.client,
                           fallback="error")

    def _load(self, name: str, adapter: str | None = None, hotswap: bool = False) -> None:
        load_lora_weights(self.pipe, self.paths[name], adapter or name, client=self.client,
                          hotswap=hotswap, fallback="error")


@contextlib.contextmanager
def _inductor_cache() -> Iterator[None]:
    """A private, empty cache directory for inductor, removed after: every run compiles from
    scratch (the default cache, /tmp/torchinductor_<user>, would make a second run's compile
    5 x shorter) and leaves nothing behind."""
    previous = os.environ.get(INDUCTOR_CACHE)
    os.environ[INDUCTOR_CACHE] = tempfile.mkdtemp(prefix="lc-bench-inductor-", dir="/tmp")
    try:
        yield
    finally:
        shutil.rmtree(os.environ[INDUCTOR_CACHE], ignore_errors=True)
        if previous is None:
            del os.environ[INDUCTOR_CACHE]
        else:
            os.environ[INDUCTOR_CACHE] = previous


@contextlib.contextmanager
def _heap_kept() -> Iterator[bool]:
    """glibc's malloc keeps freed memory in the heap while timing (yields whether it could).

    By default it hands each step's large activations back to the kernel and faults them in
    again at the next step: about 300,000 page faults (1.2 GB) per step, 40 % of a step's time
    on a 2-core VM, and the share varies two-fold from step to step, which drowns the
    difference between an unfused and a fused step. Held, a step faults nothing. Restored
    after (to glibc's default thresholds, fixed rather than adaptive from then on)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        kept = bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
                    and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):  # not glibc
        libc, kept = None, False
    try:
        yield kept
    finally:
        if libc is not None:
            libc.mallopt(M_MMAP_THRESHOLD, 128 << 10)
            libc.mallopt(M_TRIM_THRESHOLD, 128 << 10)
            libc.malloc_trim(0)


def _timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


# -------------------------------------------------------------------------- memory, in workers


def _memory(mode: str, counts: tuple[int, ...], daemon: Any, base: Path, paths: list[Path],
            warm: Path, shared_root: Path) -> dict[int, dict[str, int]]:
    """Start max(counts) workers; let the first n hold the adapters, for each n in turn, and
    measure every worker holding them."""
    args = [(mode, str(daemon.socket), str(base), [str(p) for p in paths], str(warm))
            ] * max(counts)
    results: dict[int, dict[str, int]] = {}
    with WorkerGroup(_worker, args) as workers:
        for link in workers.links:
            if _answer(link) != "ready":
                raise RuntimeError("a worker did not say ready")
        before = {pid: _anonymous(pid) for pid in workers.pids}
        private: dict[int, int] = {}
        held = 0
        for n in counts:
            links = workers.links[held:n]
            for link in links:
                link.send("load")
            for pid, link in zip(workers.pids[held:n], links):
                private[pid] = _answer(link)["private_lora_bytes"]
            held = n
            pids = workers.pids[:n]
            results[n] = {
                "anonymous_growth": sum(_anonymous(pid) - before[pid] for pid in pids),
                "private_lora_bytes": sum(private[pid] for pid in pids),
                "shared_pss": sum(_pss_under(pid, shared_root) for pid in pids)}
        workers.send_all("exit")
        workers.join()
    return results


def _answer(link: Connection, timeout: float = 300.0) -> Any:
    if not link.poll(timeout):
        raise TimeoutError(f"a worker did not answer within {timeout:g} s")
    message = link.recv()
    if isinstance(message, WorkerFailed):
        raise RuntimeError(f"a worker failed: {message.error}")
    return message


def _anonymous(pid: int) -> int:
    """Memory backed by no file: where a private copy of a LoRA lands."""
    return sum(m.anonymous for m in psutil.Process(pid).memory_maps(grouped=False))


def _pss_under(pid: int, root: Path) -> int:
    """PSS of the process's mappings of files under ``root``: summed over every process that
    maps them, each resident page once."""
    prefix = f"{root}/"
    return sum(m.pss for m in psutil.Process(pid).memory_maps() if m.path.startswith(prefix))


def _worker(link: Connection, mode: str, socket: str, base: str, paths: list[str],
            warm: str) -> None:
    """One worker: the pipeline over the shared base weights, a warm-up, then on "load" every
    adapter loaded and read; answers how many bytes of LoRA weights are its own."""
    with reporting_failure(link):
        pipe = sd15_pipeline(torch.float32, "meta")
        pipe.unet.load_state_dict(load_file(base), assign=True)  # mapped, not copied
        with contextlib.ExitStack() as stack:
            client = (stack.enter_context(LoraCacheClient(socket)) if mode == LORACACHE
                      else None)

            def load(path: str, name: str) -> None:
                if client is not None:
                    load_lora_weights(pipe, path, name, client=client, fallback="error")
                else:
                    pipe.load_lora_weights(path, adapter_name=name)

            _quiet()
            load(warm, "warm")
            pipe.unload_lora_weights()
            gc.collect()
            link.send("ready")
            link.recv()
            for i, path in enumerate(paths):
                load(path, f"lora{i}")
            weights = _lora_weights(pipe.unet)
            touch({str(i): w for i, w in enumerate(weights)})
            gc.collect()
            link.send({"private_lora_bytes": _private_bytes(weights)})
            link.recv()


def _lora_weights(unet: torch.nn.Module) -> list[torch.Tensor]:
    weights = []
    for module in unet.modules():
        for factor in ("lora_A", "lora_B"):
            layers = getattr(module, factor, None)
            if isinstance(layers, torch.nn.ModuleDict):
                weights.extend(layer.weight.detach() for layer in layers.values())
    return weights


def _private_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of ``tensors`` that lie in anonymous memory of this process (not in a mapping of
    a file: the daemon's shared memory, a LoRA file mapped by safetensors)."""
    spans = _file_spans()
    starts = [start for start, _ in spans]
    private = 0
    for tensor in tensors:
        address = tensor.data_ptr()
        i = bisect.bisect_right(starts, address) - 1
        if not (i >= 0 and address < spans[i][1]):
            private += tensor.numel() * tensor.element_size()
    return private


def _file_spans() -> list[tuple[int, int]]:
    """The address ranges of this process's file-backed mappings (an inode), sorted."""
    spans = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if fields[4] != "0":
                start, end = (int(v, 16) for v in fields[0].split("-"))
                spans.append((start, end))
    return sorted(spans)


# ---------------------------------------------------------------------------- LoRAs and report


def _write_lora(path: Path, shapes: dict[str, torch.Size], seed: int,
                dtype: torch.dtype = torch.float32, layers: int | None = None) -> Path:
    """A random rank-16 LoRA in diffusers' PEFT keys, as ``fuse``'s, in ``dtype``; the first
    ``layers`` layers only when given."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, shape in list(shapes.items())[:layers]:
        out, rest = shape[0], shape[1:]
        tail = (1,) * (len(shape) - 2)
        tensors[f"unet.{module}.lora_A.weight"] = (
            torch.randn(RANK, *rest, generator=generator) / rest.numel() ** 0.5).to(dtype)
        tensors[f"unet.{module}.lora_B.weight"] = (
            torch.randn(out, RANK, *tail, generator=generator) * 0.01).to(dtype)
    save_file(tensors, str(path))
    return path


def _quiet() -> None:
    """diffusers' and PEFT's warnings on every load (no text encoder; a second adapter)."""
    _quiet_diffusers()
    warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")


def _sparse_weights(path: Path) -> Path:
    """The SD 1.5 UNet's weights as a safetensors file of zeros that is all hole: a header, then
    the file extended to its size without writing (no time, no disk). safetensors maps it
    copy-on-write, so workers that assign its tensors hold their base weights in the page cache,
    shared, not in memory of their own; they run no step, so the values do not matter."""
    header, offset = {}, 0
    for name, tensor in sd15_pipeline(torch.float32, "meta").unet.state_dict().items():
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": SAFETENSORS_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return path


def _misses(client: LoraCacheClient) -> int:
    return client.stats().device("cpu").misses


@dataclasses.dataclass
class _Report(Report):
    """A Report with a second table (the memory one), printed after the first."""

    second: tuple[str, list[str], list[list[Any]]] = ("", [], [])

    def print(self) -> None:
        title, headers, rows = self.second
        print(f"\n== {self.name}: {self.title}")
        print_table(self.headers, self.rows)
        print(f"\n   {title}")
        print_table(headers, rows)
        for note in self.notes:
            print(f"   note: {note}")
        for target in self.targets:
            verdict = "met" if target.met else "MISSED"
            print(f"   target {target.metric}: {target.value:.2f} <= {target.limit:g} -> {verdict}")


def _report(samples: Samples, hotswap: dict[str, Any], memory: dict[str, dict[int, dict[str, int]]],
            daemon_bytes: int, lora_bytes: int, adapters: int, counts: tuple[int, ...],
            layers: int, repetitions: int, machine: dict[str, Any]) -> Report:
    med = {name: median(values) for name, values in samples.items()}
    rows = []
    for name, baseline in ROWS:
        if name in samples:
            values = samples[name]
            rows.append([name, len(values), ms(med[name]), ms(min(values)), ms(max(values)),
                         x(ratio(med[name], med[baseline])) if baseline else "",
                         baseline or ""])
    targets = [Target(f"{SWITCH_SET} / {SWITCH_FUSED}", ratio(med[SWITCH_SET], med[SWITCH_FUSED]),
                      TARGET_SWITCH),
               Target(f"{SWITCH_SAME} / {SWITCH_FUSED}",
                      ratio(med[SWITCH_SAME], med[SWITCH_FUSED]), TARGET_NO_OP)]
    if hotswap:
        targets.append(Target(f"recompilations after {len(samples[HOTSWAP_LC])} loracache and "
                              f"{len(samples[HOTSWAP_DF])} diffusers hotswaps",
                              float(bool(hotswap["recompiled"]) or hotswap["graphs_added"]),
                              0))
    memory_rows = []
    for n in counts:
        for mode, results in memory.items():
            got = results[n]
            shared = daemon_bytes if mode == LORACACHE else got["shared_pss"]
            total = shared + got["anonymous_growth"]
            copies = shared + got["private_lora_bytes"]
            memory_rows.append([n, mode, _mib(shared), _mib(got["private_lora_bytes"]),
                                _mib(got["anonymous_growth"]), _mib(total),
                                x(ratio(total, lora_bytes)), x(ratio(copies, lora_bytes))])
            if mode == LORACACHE:
                targets.append(Target(f"N={n}: loracache LoRA tensors on the node / LoRAs' size",
                                      ratio(copies, lora_bytes), TARGET_COPIES))
    unfused = (STEP_UNFUSED, STEP_UNFUSED2)
    overhead = {mode: (got[counts[-1]]["anonymous_growth"] - got[counts[-1]]["private_lora_bytes"])
                / (counts[-1] * adapters * MiB) for mode, got in memory.items()}
    step = {name: ratio(med[name], med[STEP_FUSED]) for name in unfused}
    least = {name: ratio(min(samples[name]), min(samples[STEP_FUSED])) for name in unfused}
    notes = [
        f"step cost, unfused over fused: 1 adapter {step[STEP_UNFUSED]:.2f} x, 2 adapters "
        f"{step[STEP_UNFUSED2]:.2f} x (medians); {least[STEP_UNFUSED]:.2f} x and "
        f"{least[STEP_UNFUSED2]:.2f} x (fastest steps); a fused step is the bare UNet's, as "
        "fusing leaves no layer behind",
        "a switch has two samples per repetition and switch (to b and back to a); a fused "
        "switch rewrites every touched weight, set_adapters only sets the layers' scales",
        "memory: 'shared copy' is the daemon's entries (loracache) or the PSS of the LoRA files "
        "mapped by the workers (diffusers: safetensors maps the file and PEFT assigns its "
        "tensors when the dtypes match); 'private LoRA' the LoRA weights in the workers' "
        "anonymous memory; 'anon growth' all of the workers' anonymous growth: private LoRA "
        "plus PEFT's layers and Python objects, per worker and adapter (at N = "
        f"{counts[-1]}) " + ", ".join(f"{mode} {mib:.1f} MiB" for mode, mib in overhead.items()),
        "'node total' = shared copy + anon growth; 'LoRA copies' = shared copy + private LoRA, "
        f"both over the {adapters} LoRAs' size ({_mib(lora_bytes)} MiB)",
    ]
    if hotswap:
        notes.append(f"hotswap: backend {hotswap['backend']!r}; "
                     + (f"RECOMPILED: {hotswap['recompiled']}" if hotswap["recompiled"] else
                        f"no recompilation ({hotswap['graphs_added']} graphs added, "
                        "error_on_recompile=True)"))
    else:
        notes.append("hotswap under torch.compile: left out of --quick (compiling takes over a "
                     "minute)")
    notes.append(f"LoRAs: rank {RANK}, {layers} layers, float32, {lora_bytes / adapters / MiB:.1f}"
                 f" MiB each; torch uses {torch.get_num_threads()} threads")
    notes.append(_load_note(machine).replace("during the run", "while timing") + (
        "; glibc's malloc kept freed memory while timing (no page faults per step)"
        if machine["heap_kept"] else "; malloc's thresholds could not be set (not glibc): "
        "steps include page faults, which vary"))
    return _Report(
        name="unfused",
        title=f"unfused LoRAs (diffusers' set_adapters over loracache's shared copy) on an SD 1.5 "
              f"UNet (CPU, float32); medians of {repetitions} repetition"
              f"{'s' if repetitions > 1 else ''}",
        headers=["case", "n", "median", "min", "max", "ratio", "over"],
        rows=rows, targets=targets, notes=notes,
        second=(f"memory: N workers each holding the same {adapters} adapters (MiB; x: over the "
                f"LoRAs' size)",
                ["N", "loading", "shared copy", "private LoRA", "anon growth", "node total",
                 "node total x", "LoRA copies x"], memory_rows),
        data={"samples_s": samples, "median_s": med, "step_unfused_over_fused": step,
              "step_unfused_over_fused_fastest": least, "memory": memory,
              "peft_mib_per_worker_and_adapter": overhead,
              "daemon_entries_bytes": daemon_bytes, "lora_bytes": lora_bytes,
              "adapters": adapters, "hotswap": hotswap, "repetitions": repetitions,
              "memory_rows": memory_rows, **machine})


def _mib(nbytes: int) -> str:
    return f"{nbytes / MiB:,.1f}"
