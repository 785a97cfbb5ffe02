"""gpu: the CUDA path on a real GPU, each figure against a baseline measured in the same run.

``python -m bench.gpu [--sections a,b] [--budget SECONDS]`` writes ``bench/results/gpu.json``
after every section (a section that fails records its traceback; the others still run):

- ``sharing``: N = 1, 2, 4, 8 worker processes holding the same 4 x 64 MiB LoRAs on the GPU.
  Device memory used (NVML) grows by one copy with loracache and by N copies when each worker
  loads its own (``safetensors.torch.load_file(device="cuda")``); each worker's own allocator
  holds nothing with loracache.
- ``eviction``: memory back on the device after evicting an entry whose leases were held by
  workers killed with SIGKILL, and by a worker of another user (in the daemon's group).
- ``hot``: 100,000 acquire + release of one cached entry by a client that keeps it mapped:
  hit latency and the daemon's memory (RSS, device allocated, counter files) per window.
- ``load``: a cold load of a 1 GiB LoRA onto the GPU vs ``load_file(path, device="cuda")``;
  hit latency on cuda vs cpu; the first acquire of a cached entry in a new process (it opens
  the IPC mapping) vs the next.
- ``fuse``: a full-size SDXL UNet (built from its config, random weights) in float16 and
  bfloat16 with random PEFT-format LoRAs of rank 16 and 128 on every attention, feed-forward
  and proj_in/out layer: loracache's fuse (a cached LoRA) and switch vs diffusers'
  ``load_lora_weights`` + ``fuse_lora``, vs diffusers' hotswap of an unfused adapter, and vs
  the bare GEMM-and-add work.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import glob
import json
import os
import signal
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file

from examples.model_shapes import SDXL_UNET, sdxl_pipeline
import loracache.client.lease  # noqa: F401  (imported now: a worker that becomes another user
from loracache.shared.protocol import DeviceStats
from loracache.shared.transport.cuda_ipc import device_uuid  # (imported now, as above)
from loracache.client import (LoraCacheClient, delete_adapters, load_and_fuse_lora,
                              set_and_fuse_adapters)

from examples.daemon_process import PrivateDaemon

from .common import (RESULTS_DIR, bench_daemon, MiB, WorkerGroup, latency_summary, median,
                     ratio, reporting_failure, scratch_dir, time_calls, warm_page_cache,
                     write_lora)
from .fuse import _bare_layers, _lora_shapes, _quiet_diffusers, _write_peft_lora

GiB = 1 << 30
DEVICE = "cuda:0"
NOBODY = 65534



# --------------------------------------------------------------------------- device memory


def device_used() -> int:
    """Bytes used on the GPU by every process, as NVML reports them (nvidia-smi's figure)."""
    try:
        import pynvml

        pynvml.nvmlInit()  # NVML numbers devices its own way: find ours by UUID
        handle = pynvml.nvmlDeviceGetHandleByUUID(device_uuid(0).encode())
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
    except Exception:  # no NVML here: the driver's own figure through CUDA
        free, total = torch.cuda.mem_get_info(0)
        return total - free


def settle(condition: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def gpu_daemon(loras: Path, max_bytes: str, *args: str) -> PrivateDaemon:
    """A daemon serving cpu and cuda:0 whose CUDA context exists already."""
    daemon = bench_daemon(loras, "--devices", "cpu,cuda:0", "--session-ttl", "2", *args,
                           max_bytes=max_bytes)
    warm = write_lora(loras / "warm-up.safetensors", rank=4, pairs=4)
    with daemon.client(session=False) as client:
        client.preload(warm, device=DEVICE)
        client.evict(warm)
    return daemon


def cuda_stats(client: LoraCacheClient) -> DeviceStats:
    return next(d for d in client.stats().devices if d.device.startswith("cuda:"))


# ---------------------------------------------------------------------------------- sharing


def sharing(deadline: float, results: dict[str, Any]) -> None:
    with scratch_dir() as loras:
        paths = [write_lora(loras / f"l{i}.safetensors", rank=64, nbytes=64 * MiB, seed=i)
                 for i in range(4)]
        copy = sum(p.stat().st_size for p in paths)
        for path in paths:
            warm_page_cache(path)
        with gpu_daemon(loras, "4GiB") as daemon:
            for mode in ("loracache", "load_file"):
                for n in (1, 2, 4, 8):
                    if time.monotonic() > deadline:
                        results["stopped"] = "time budget spent"
                        return
                    with WorkerGroup(_sharing_worker, [(mode, str(daemon.socket),
                                                        [str(p) for p in paths])] * n) as group:
                        group.expect("ready")  # each has its CUDA context now
                        before = device_used()
                        group.send_all("go")
                        allocated = group.receive_all()
                        after = device_used()
                        group.send_all("exit")
                        group.join()
                    if mode == "loracache":
                        with daemon.client(session=False) as client:
                            client.clear()
                    results[f"{mode} N={n}"] = {
                        "growth_bytes": after - before, "growth_over_one_copy":
                        ratio(after - before, copy), "workers_allocated": allocated}
    results["one_copy_bytes"] = copy


def _sharing_worker(link: Connection, mode: str, socket: str, paths: list[str]) -> None:
    with reporting_failure(link):
        torch.zeros(1, device=DEVICE)  # the CUDA context, before the baseline
        client = LoraCacheClient(socket) if mode == "loracache" else None
        link.send("ready")
        link.recv()
        held: list[Any] = []
        for path in paths:
            if client is not None:
                lease = client.acquire(path, device=DEVICE)
                held.append(lease)
                tensors = lease.tensors
            else:
                tensors = load_file(path, device=DEVICE)
                held.append(tensors)
            sum(float(t.float().sum()) for t in tensors.values())  # every byte read
        torch.cuda.synchronize()
        link.send(torch.cuda.memory_allocated())
        link.recv()
        if client is not None:
            client.close()


# --------------------------------------------------------------------------------- eviction


def eviction(deadline: float, results: dict[str, Any]) -> None:
    with scratch_dir() as loras:
        os.chmod(loras, 0o755)
        path = write_lora(loras / "big.safetensors", rank=128, nbytes=512 * MiB)
        with gpu_daemon(loras, "4GiB") as daemon:
            for case, workers in (("3 workers killed holding leases", 3),
                                  ("a worker of another user, released", 1)):
                os.chmod(daemon.home, 0o755)  # as /run/loracache: the group gets in
                before = device_used()
                other_user = workers == 1
                args = [(str(daemon.socket), str(path), other_user)] * workers
                with WorkerGroup(_eviction_worker, args) as group:
                    group.expect("held")
                    held = device_used()
                    if other_user:
                        group.send_all("release")
                        group.expect("released")
                    else:
                        for pid in group.pids:
                            os.kill(pid, signal.SIGKILL)
                with daemon.client(session=False) as client:
                    settle(lambda: client.stats().leases == 0)
                    evicted = client.evict(path)
                    returned = settle(lambda b=before: device_used() <= b + 16 * MiB)
                    stats = cuda_stats(client)
                results[case] = {"entry_bytes": path.stat().st_size, "evicted": evicted.evicted,
                                 "held_growth_bytes": held - before,
                                 "after_eviction_over_before_bytes": device_used() - before,
                                 "returned": returned, "waiting_bytes": stats.waiting_bytes}


def _eviction_worker(link: Connection, socket: str, path: str, other_user: bool) -> None:
    with reporting_failure(link):
        torch.zeros(1, device=DEVICE)
        if other_user:  # into the daemon's group (root's, here), as another user
            os.setgroups([])
            os.setgid(os.getgid())
            os.setuid(NOBODY)
        client = LoraCacheClient(socket)
        lease = client.acquire(path, device=DEVICE)
        float(next(iter(lease.tensors.values())).float().sum())
        link.send("held")
        link.recv()
        lease.release()
        link.send("released")
        link.recv()


# -------------------------------------------------------------------------------------- hot


def hot(deadline: float, results: dict[str, Any]) -> None:
    import psutil

    windows: list[dict[str, Any]] = []
    results["windows"] = windows
    with scratch_dir() as loras:
        path = write_lora(loras / "hot.safetensors", rank=16, nbytes=4 * MiB)
        with gpu_daemon(loras, "1GiB") as daemon, daemon.client() as client:
            daemon_process = psutil.Process(daemon.proc.pid)
            kept = client.acquire(path, device=DEVICE)
            done = 0
            while done < 100_000 and time.monotonic() < deadline:
                samples = time_calls(lambda: client.acquire(path, device=DEVICE).release(),
                                     10_000)
                done += len(samples)
                stats = cuda_stats(client)
                windows.append({"done": done, **latency_summary(samples),
                                "daemon_rss_bytes": daemon_process.memory_info().rss,
                                "allocated_bytes": stats.allocated_bytes,
                                "counter_files": len(glob.glob(
                                    f"/dev/shm/torch_{daemon.proc.pid}_*"))})
            kept.release()
    first, last = windows[0], windows[-1]
    results.update({"acquire_release": done,
                    "p50_last_over_first": ratio(last["p50_s"], first["p50_s"]),
                    "rss_growth_bytes": last["daemon_rss_bytes"] - first["daemon_rss_bytes"]})


# ------------------------------------------------------------------------------------- load


def load(deadline: float, results: dict[str, Any]) -> None:
    with scratch_dir() as loras:
        big = write_lora(loras / "big.safetensors", rank=128, nbytes=GiB)
        small = write_lora(loras / "small.safetensors", rank=16, nbytes=4 * MiB)
        warm_page_cache(big)
        with gpu_daemon(loras, "8GiB") as daemon, daemon.client() as client:
            cold, baseline = [], []
            for _ in range(3):
                client.evict(big)
                started = time.perf_counter()
                client.preload(big, device=DEVICE)
                cold.append(time.perf_counter() - started)
                started = time.perf_counter()
                tensors = load_file(str(big), device=DEVICE)
                torch.cuda.synchronize()
                baseline.append(time.perf_counter() - started)
                del tensors
                torch.cuda.empty_cache()
            results["cold 1 GiB"] = {"loracache_s": cold, "load_file_cuda_s": baseline,
                                     "ratio": ratio(median(cold), median(baseline)),
                                     "target": 1.2}
            hits = {}
            for device in ("cpu", DEVICE):
                kept = client.acquire(small, device=device)  # mapped: the round trips alone
                hits[device] = latency_summary(time_calls(
                    lambda d=device: client.acquire(small, device=d).release(), 2000, 200))
                kept.release()
            results["hit"] = {**hits, "cuda_over_cpu_p50": ratio(hits[DEVICE]["p50_s"],
                                                                 hits["cpu"]["p50_s"]),
                              "target": 1.3}
            with WorkerGroup(_first_open_worker, [(str(daemon.socket), str(big))]) as group:
                results["first open in a new process"] = group.receive_all()[0]
                group.join()


def _first_open_worker(link: Connection, socket: str, path: str) -> None:
    with reporting_failure(link):
        torch.zeros(1, device=DEVICE)
        with LoraCacheClient(socket) as client:
            timings, leases = {}, []
            for name in ("first_s", "second_s"):  # the second finds the entry mapped
                started = time.perf_counter()
                leases.append(client.acquire(path, device=DEVICE))
                float(next(iter(leases[-1].tensors.values())).flatten()[0])
                timings[name] = time.perf_counter() - started
            for lease in leases:
                lease.release()
        link.send(timings)


# ------------------------------------------------------------------------------------- fuse


def fuse(deadline: float, results: dict[str, Any]) -> None:
    _quiet_diffusers()
    shapes = _lora_shapes(SDXL_UNET)
    results["lora_layers"] = len(shapes)
    results["weights_touched"] = sum(s.numel() for s in shapes.values())
    with scratch_dir() as loras:
        files = {rank: {name: _write_peft_lora(loras / f"r{rank}-{name}.safetensors", shapes,
                                               rank, seed=rank + i)
                        for i, name in enumerate("ab")} for rank in (16, 128)}
        results["file_bytes"] = {rank: pair["a"].stat().st_size for rank, pair in files.items()}
        with gpu_daemon(loras, "8GiB") as daemon, daemon.client() as client:
            for pair in files.values():
                for path in pair.values():
                    client.preload(path, device=DEVICE, layout="sdxl")
            for dtype in (torch.float16, torch.bfloat16):
                pipe = sdxl_pipeline(dtype, DEVICE)
                for rank in (16, 128):
                    if time.monotonic() > deadline:
                        results["stopped"] = "time budget spent"
                        return
                    label = f"{str(dtype).removeprefix('torch.')} r{rank}"
                    try:
                        results[label] = _fuse_case(pipe, client, files[rank], rank)
                    except Exception:
                        results[label] = {"error": traceback.format_exc()}
                del pipe
                gc.collect()
                torch.cuda.empty_cache()


def _synced(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - started


def _fuse_case(pipe: Any, client: LoraCacheClient, paths: dict[str, Path],
               rank: int) -> dict[str, Any]:
    a, b = (_device_layers(pipe.unet, paths[name]) for name in "ab")

    def lc_load(name: str) -> None:
        load_and_fuse_lora(pipe, paths[name], name, client=client, fallback="error")

    samples: dict[str, list[float]] = {}

    def record(name: str, seconds: float) -> None:
        samples.setdefault(name, []).append(seconds)

    for repetition in range(4):  # the first is a warm-up, left out
        keep = repetition > 0
        for name, seconds in (("bare fuse", _synced(lambda: _bare_fuse(a, 1.0))),
                              ("bare switch", _synced(lambda: _bare_switch(a, b))),
                              ("bare switch back", _synced(lambda: _bare_switch(b, a)))):
            if keep:
                record(name, seconds)
        _bare_fuse(a, -1.0)
        fused = _synced(lambda: lc_load("a"))
        switch = _synced(lambda: (delete_adapters(pipe, "a"), lc_load("b")))
        lc_load("a")
        set_and_fuse_adapters(pipe, ["a"])
        set_switch = _synced(lambda: set_and_fuse_adapters(pipe, ["b"]))
        unfuse = _synced(lambda: delete_adapters(pipe))
        if keep:
            record("loracache fuse", fused)
            record("loracache switch: delete + load_and_fuse", switch)
            record("loracache switch: set_and_fuse_adapters", set_switch)
            record("loracache unfuse", unfuse)
    for repetition in range(2):
        load = _synced(lambda: pipe.load_lora_weights(str(paths["a"]), adapter_name="a"))
        fuse_only = _synced(pipe.fuse_lora)
        unload = _synced(lambda: (pipe.unfuse_lora(), pipe.unload_lora_weights()))
        if repetition:
            record("diffusers load_lora_weights + fuse_lora", load + fuse_only)
            record("  of which fuse_lora", fuse_only)
            record("diffusers unfuse + unload", unload)
    try:
        samples.update(_hotswap(pipe, paths, rank))
    except Exception:
        samples["diffusers hotswap error"] = [traceback.format_exc()]  # type: ignore[list-item]
    med = {name: median(v) for name, v in samples.items() if isinstance(v[0], float)}
    return {"samples_s": samples, "median_s": med,
            "fuse_vs_bare": ratio(med["loracache fuse"], med["bare fuse"]),
            "switch_set_vs_bare": ratio(med["loracache switch: set_and_fuse_adapters"],
                                        med["bare switch"]),
            "diffusers_over_loracache_fuse": ratio(
                med["diffusers load_lora_weights + fuse_lora"], med["loracache fuse"]),
            "targets": {"fuse_vs_bare": 1.5, "diffusers_over_loracache_fuse": 20}}


def _hotswap(pipe: Any, paths: dict[str, Path], rank: int) -> dict[str, list[float]]:
    """diffusers' own fast switch: unfused adapters, the new one's weights copied into the
    loaded adapter's (``hotswap=True``), prepared with ``enable_lora_hotswap``."""
    samples: dict[str, list[float]] = {}
    pipe.enable_lora_hotswap(target_rank=rank)
    try:
        pipe.load_lora_weights(str(paths["a"]), adapter_name="x")
        for repetition, name in enumerate("baba"):
            seconds = _synced(lambda n=name: pipe.load_lora_weights(
                str(paths[n]), adapter_name="x", hotswap=True))
            if repetition:
                samples.setdefault("diffusers hotswap (unfused)", []).append(seconds)
    finally:
        pipe.unload_lora_weights()
    return samples


def _device_layers(unet: torch.nn.Module, path: Path) -> list[tuple[torch.Tensor, ...]]:
    return [(weight, down.to(DEVICE), up.to(DEVICE))
            for weight, down, up in _bare_layers(unet, path)]


@torch.no_grad()
def _bare_fuse(layers: list[tuple[torch.Tensor, ...]], scale: float) -> None:
    """W += s * B @ A per layer, in float32, written back in the weight's dtype: the least a
    fuser can do on a GPU (one float32 temporary per weight)."""
    for weight, down, up in layers:
        acc = weight.float()
        acc.addmm_(up.float(), down.float(), alpha=scale)
        weight.copy_(acc)


@torch.no_grad()
def _bare_switch(old: list[tuple[torch.Tensor, ...]], new: list[tuple[torch.Tensor, ...]]) -> None:
    for (weight, down_old, up_old), (_, down_new, up_new) in zip(old, new):
        acc = weight.float()
        acc.addmm_(up_old.float(), down_old.float(), alpha=-1.0)
        acc.addmm_(up_new.float(), down_new.float())
        weight.copy_(acc)


# -------------------------------------------------------------------------------------- run


SECTIONS: dict[str, Callable[[float, dict[str, Any]], None]] = {
    "sharing": sharing, "eviction": eviction, "load": load, "fuse": fuse, "hot": hot}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--budget", type=float, default=300.0,
                        help="seconds for all sections; each stops early past its share")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "gpu.json")
    args = parser.parse_args(argv)
    names = args.sections.split(",")
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
        "cuda": torch.version.cuda, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpus": os.cpu_count()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    failed = False
    for i, name in enumerate(names):
        left = args.budget - (time.monotonic() - started)
        deadline = time.monotonic() + left / (len(names) - i)
        print(f"-- {name} ({left:.0f} s left)", flush=True)
        section_started = time.monotonic()
        results[name] = {}  # filled as the section measures: a failure keeps what it had
        try:
            SECTIONS[name](deadline, results[name])
        except Exception:
            failed = True
            results[name]["error"] = traceback.format_exc()
        results[name]["seconds"] = time.monotonic() - section_started
        print(json.dumps(results[name], indent=1, default=str)[:4000], flush=True)
        args.out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    with contextlib.suppress(Exception):
        print(f"written to {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
