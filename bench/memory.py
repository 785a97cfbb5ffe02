"""memory: N worker processes holding the same K LoRAs cost K copies with loracache, N x K
without.

PSS splits each shared page among the processes that map it, so the PSS of the daemon's
mappings summed over the workers is the memory those leases really cost (the daemon itself
never maps its files). The baselines load with safetensors.torch.load_file in each worker and
count the growth of each worker's total PSS. load_file's default backend maps the file
copy-on-write, so untouched-for-writing weights share the page cache as well; the
``backend="pread"`` baseline copies, like any loader that converts or moves the weights.
"""

from __future__ import annotations

import inspect
from multiprocessing.connection import Connection
from pathlib import Path

import psutil
from safetensors.torch import load_file

from loracache.client import LoraCacheClient

from examples.daemon_process import PrivateDaemon

from .common import (MiB, bench_daemon, Report, Target, WorkerGroup, ratio, reporting_failure,
                     scratch_dir, touch, warm_page_cache, write_lora, x)

TARGET = 1.1  # total PSS of the mappings at most 1.1 x the LoRAs' size, for every N
LORAS = 4
LORACACHE, LOAD_FILE, LOAD_FILE_PREAD = "loracache", "load_file", "load_file pread"


def run(quick: bool) -> Report:
    lora_size, counts = (4 * MiB, (1, 2, 4)) if quick else (16 * MiB, (1, 2, 4, 8))
    modes = [LORACACHE, LOAD_FILE]
    if "backend" in inspect.signature(load_file).parameters:  # safetensors >= 0.8
        modes.append(LOAD_FILE_PREAD)
    with scratch_dir() as loras:
        paths = [write_lora(loras / f"lora{i}.safetensors", rank=32, nbytes=lora_size, seed=i)
                 for i in range(LORAS)]
        total = sum(path.stat().st_size for path in paths)
        for path in paths:
            warm_page_cache(path)
        with bench_daemon(loras) as daemon:
            with daemon.client(heartbeat=False) as client:
                for path in paths:
                    client.preload(path)
            results = {mode: {n: _measure(n, mode, daemon, paths) for n in counts}
                       for mode in modes}
    rows, targets = [], []
    for n in counts:
        mapped = ratio(results[LORACACHE][n]["mapping_pss"], total)
        growth = {mode: ratio(results[mode][n]["pss_growth"], total) for mode in modes}
        rows.append([n, x(mapped), *(x(growth[mode]) for mode in modes),
                     x(ratio(growth[modes[-1]], growth[LORACACHE]))])
        targets.append(Target(f"N={n}: mapping PSS / LoRA size", mapped, TARGET))
    return Report(
        name="memory",
        title=f"{LORAS} LoRAs of {lora_size / MiB:.0f} MiB ({total / MiB:.1f} MiB) held by N "
              "worker processes; figures are / the LoRAs' total size",
        headers=["N", "loracache mapping PSS", *(f"{mode} PSS growth" for mode in modes),
                 f"{modes[-1]} / loracache"],
        rows=rows,
        targets=targets,
        data={"lora_bytes": total, "loras": LORAS, "results": results},
        notes=["PSS growth: the sum over workers of total PSS after loading minus before",
               "loracache's shared copy lives in the daemon's tmpfs files: one per LoRA, "
               "whatever N is"])


def _measure(n: int, mode: str, daemon: PrivateDaemon, paths: list[Path]) -> dict[str, int]:
    """Start ``n`` workers, let each load or lease every LoRA, and sum their PSS."""
    args = [(mode, str(daemon.socket), [str(p) for p in paths])] * n
    with WorkerGroup(_worker, args) as workers:
        workers.expect("ready")
        before = [psutil.Process(pid).memory_full_info().pss for pid in workers.pids]
        workers.send_all("go")
        workers.expect("held")
        after = [psutil.Process(pid).memory_full_info().pss for pid in workers.pids]
        mapped = [sum(m.pss for m in psutil.Process(pid).memory_maps()
                      if str(daemon.shm_root) in m.path) for pid in workers.pids]
        workers.send_all("exit")
        workers.join()
    return {"pss_growth": sum(after) - sum(before), "mapping_pss": sum(mapped),
            "pss_before": sum(before), "pss_after": sum(after)}


def _worker(link: Connection, mode: str, socket: str, paths: list[str]) -> None:
    """One worker process: connect, then on "go" lease or load every LoRA and fault all its
    pages in, and hold them until "exit"."""
    with reporting_failure(link):
        client = LoraCacheClient(socket) if mode == LORACACHE else None
        link.send("ready")
        link.recv()
        held = []
        for path in paths:
            if client is not None:
                lease = client.acquire(path)
                held.append(lease)
                touch(lease.tensors)
            else:
                tensors = load_file(path, **({"backend": "pread"} if mode == LOAD_FILE_PREAD
                                             else {}))
                held.append(tensors)
                touch(tensors)
        link.send("held")
        link.recv()
        if client is not None:
            client.close()
