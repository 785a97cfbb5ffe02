"""tiers: where a re-acquire comes from, what a download through the daemon costs, and how many
downloads N workers asking at once cause.

1. An SDXL LoRA (the key names and shapes of a real kohya SDXL file, random bf16 weights),
   acquired in the converted ``sdxl`` layout on the CPU and then evicted for room, is acquired
   again: from the host tier (the evicted entry's copy), from the disk tier (its download,
   read and converted again) and from its source (downloaded, read and converted again).
2. A 256 MiB file downloaded by the daemon (its own download time, from ``stats``) against the
   same library's plain download of it to a file (obstore, streaming, as the daemon does), from
   the same local HTTP server; and the whole preload (download and load) against that plain
   download followed by ``safetensors.torch.load_file``.
3. N client processes acquire one new URL at once: the server counts the GETs.
"""

from __future__ import annotations

import functools
import http.server
import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

import obstore
import torch
from obstore.store import HTTPStore
from safetensors.torch import load_file, save_file

from loracache.client import LoraCacheClient

from .common import (REPO, MiB, Report, Target, WorkerGroup, bench_daemon, median, ms, ratio,
                     reporting_failure, scratch_dir, write_lora, x)

SDXL_KEYS = REPO / "tests" / "fixtures" / "keysets" / "invokeai_sdxl_kohya_AlienStyle.keys.json"
HOST_TARGET = 1 / 5  # re-acquire from the host tier at least 5 x faster than read-and-convert
DOWNLOAD_TARGET = 1.2  # the daemon's download at most 1.2 x the library's plain download
CHUNK = 8 << 20


class Files(http.server.SimpleHTTPRequestHandler):
    """Serves a directory (Content-Length and Last-Modified, as a plain web server does) and
    counts the GETs per path."""

    gets: dict[str, int] = {}

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        Files.gets[self.path] = Files.gets.get(self.path, 0) + 1
        super().do_GET()

    def log_message(self, *args: object) -> None:
        pass


def serve(directory: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Files, directory=str(directory)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_port}"


def run(quick: bool) -> Report:
    repetitions = 3 if quick else 5
    size = 64 * MiB if quick else 256 * MiB
    workers = 4 if quick else 8
    with scratch_dir() as root:
        served, loras, cache = root / "served", root / "loras", root / "cache"
        for directory in (served, loras, cache):
            directory.mkdir()
        server, base = serve(served)
        try:
            sdxl = _sdxl_lora(served / "sdxl.safetensors")
            write_lora(served / "filler.safetensors", rank=64, nbytes=sdxl.stat().st_size // 2)
            big = write_lora(served / "big.safetensors", rank=128, nbytes=size, seed=1)
            with bench_daemon(loras, "--allow-source", f"{base}/", "--cache-dir", str(cache),
                              max_bytes=f"{sdxl.stat().st_size * 5 // 4}") as daemon, \
                    daemon.client() as client:
                tiers = _tiers(client, base, served, repetitions)
                download = _download(client, base, big, root, repetitions)
                one_download = _many_ask(daemon.socket, base, served, workers)
        finally:
            server.shutdown()
            server.server_close()
    host, disk, source = (median(tiers[k]) for k in ("host", "disk", "source"))
    daemon_s, plain_s = median(download["daemon"]), median(download["plain"])
    preload_s, plain_load_s = median(download["preload"]), median(download["plain+load"])
    rows = [
        ["re-acquire from the host tier", ms(host), "1.00 x", ""],
        ["re-acquire from the disk tier (read + convert)", ms(disk), x(ratio(disk, host)), ""],
        ["re-acquire from the source (download + read + convert)", ms(source),
         x(ratio(source, host)), ""],
        [f"download {size // MiB} MiB: obstore, plain", ms(plain_s), "", "1.00 x"],
        [f"download {size // MiB} MiB: the daemon's", ms(daemon_s), "",
         x(ratio(daemon_s, plain_s))],
        ["preload by URL (download + load)", ms(preload_s), "", x(ratio(preload_s, plain_s))],
        ["plain download + load_file", ms(plain_load_s), "", x(ratio(plain_load_s, plain_s))],
        [f"{workers} workers acquire one new URL at once: GETs", one_download, "", ""],
    ]
    return Report(
        name="tiers",
        title=f"an SDXL LoRA ({tiers['nbytes'] / MiB:.0f} MiB converted) re-acquired on "
              f"the CPU, and a {size // MiB} MiB download; median of {repetitions}",
        headers=["case", "median", "/ host tier", "/ plain download"],
        rows=rows,
        targets=[Target("host tier / disk tier (read + convert)", ratio(host, disk),
                        HOST_TARGET),
                 Target("daemon download / plain download", ratio(daemon_s, plain_s),
                        DOWNLOAD_TARGET),
                 Target(f"GETs for {workers} workers asking at once", one_download, 1)],
        data={"tiers_s": {k: tiers[k] for k in ("host", "disk", "source")},
              "converted_bytes": tiers["nbytes"], "download_s": download,
              "download_bytes": size, "workers": workers, "gets": one_download},
        notes=["every re-acquire follows an eviction for room (a filler LoRA acquired in "
               "between); the host tier holds the evicted entry's shared-memory file itself, "
               "so on the CPU it comes back without a copy",
               "the daemon's download time is its own (stats: the disk tier's download "
               "histogram): the request round trip is not in it",
               "the HTTP server is Python's http.server on this machine; both downloads read "
               "from it"])


def _sdxl_lora(path: Path) -> Path:
    """Random bf16 weights under a real kohya SDXL LoRA's key names and shapes."""
    keys: dict[str, Any] = json.loads(SDXL_KEYS.read_text())
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for name, spec in keys.items():
        shape = spec["shape"]
        tensors[name] = (torch.full(shape, 8.0) if name.endswith(".alpha") else
                         torch.randn(math.prod(shape), generator=generator).reshape(shape) * 0.01
                         ).to(torch.bfloat16)
    save_file(tensors, str(path))
    return path


def _tiers(client: LoraCacheClient, base: str, served: Path,
           repetitions: int) -> dict[str, Any]:
    """Seconds of re-acquires from each tier; the budget holds the LoRA or the filler."""
    url, filler = f"{base}/sdxl.safetensors", f"{base}/filler.safetensors"
    samples: dict[str, Any] = {"host": [], "disk": [], "source": []}
    with client.acquire(url, layout="sdxl") as lease:
        samples["nbytes"] = lease.entry.nbytes
    for i in range(repetitions):
        client.acquire(filler).release()  # evicts the LoRA for room: it goes to the host tier
        samples["host"].append(_timed_acquire(client, url))
        client.evict(url)  # drops its host copy too: the next acquire reads the download
        client.acquire(filler).release()
        samples["disk"].append(_timed_acquire(client, url))
        fresh = served / f"sdxl-{i}.safetensors"  # a new URL: downloaded, read and converted
        os.link(served / "sdxl.safetensors", fresh)
        client.acquire(filler).release()
        samples["source"].append(_timed_acquire(client, f"{base}/{fresh.name}"))
    return samples


def _timed_acquire(client: LoraCacheClient, url: str) -> float:
    started = time.perf_counter()
    client.acquire(url, layout="sdxl").release()
    return time.perf_counter() - started


def _download(client: LoraCacheClient, base: str, big: Path, root: Path,
              repetitions: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {"daemon": [], "plain": [], "preload": [], "plain+load": []}
    store = HTTPStore.from_url(base, client_options={"allow_http": True})
    target = root / "plain.safetensors"
    for i in range(repetitions):
        name = f"big-{i}.safetensors"
        os.link(big, big.with_name(name))
        if i % 2:  # alternate which goes first, so drift hits both alike
            _plain(store, name, target, samples)
        before = _download_seconds(client)
        started = time.perf_counter()
        client.preload(f"{base}/{name}")
        samples["preload"].append(time.perf_counter() - started)
        samples["daemon"].append(_download_seconds(client) - before)
        client.evict(f"{base}/{name}")
        if not i % 2:
            _plain(store, name, target, samples)
    return samples


def _plain(store: Any, name: str, target: Path, samples: dict[str, list[float]]) -> None:
    """The library's plain download of ``name`` to a file, then the file loaded."""
    started = time.perf_counter()
    _plain_download(store, name, target)
    samples["plain"].append(time.perf_counter() - started)
    load_file(str(target))
    samples["plain+load"].append(time.perf_counter() - started)
    target.unlink()


def _plain_download(store: Any, key: str, target: Path) -> None:
    with open(target, "wb") as out:
        for chunk in obstore.get(store, key).stream(min_chunk_size=CHUNK):
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())


def _download_seconds(client: LoraCacheClient) -> float:
    disk = next(t for t in client.stats().tiers if t.tier == "disk")
    assert disk.load_seconds is not None, "the disk tier reports its downloads"
    return disk.load_seconds.sum


def _many_ask(socket: Path, base: str, served: Path, workers: int) -> int:
    name = "many.safetensors"
    os.link(served / "big.safetensors", served / name)
    with WorkerGroup(_acquire_worker, [(str(socket), f"{base}/{name}")] * workers) as group:
        group.expect("ready")
        group.send_all("go")
        group.expect("done")
    return Files.gets.get(f"/{name}", 0)


def _acquire_worker(link: Any, socket: str, url: str) -> None:
    with reporting_failure(link), LoraCacheClient(socket) as client:
        link.send("ready")
        link.recv()
        client.acquire(url).release()
        link.send("done")

