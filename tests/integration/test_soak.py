"""Soak: 16 client processes against one daemon with a tight budget, while workers die by SIGKILL.

Twelve workers lease raw files at random and check every tensor against the file; four fuse SD
LoRAs into a tiny pipeline and check the weights come back. Half the raw files are asked for by
URL, from an HTTP server in the test, through a disk tier with room for a few of them; entries
evicted for room go to a host tier with room for a few more, and come back from it. The test
kills random workers (many holding leases) and starts replacements; some workers kill themselves
while holding leases. It checks that the budget is never exceeded, that every lease comes back
once the killed sessions expire, that the daemon's hit and miss counters match the acquires the
workers saw succeed, that the daemon's memory does not grow, that the tiers keep their budgets,
and that no shared memory is left beyond the entries and host copies the daemon lists.

``LORACACHE_SOAK_SECONDS`` lengthens the busy phase (default 30: the whole test then takes
well under two minutes on two cores). ``LORACACHE_SOAK_SEED`` replays a run's random choices
(the seed is printed; the timing of processes still varies).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import http.server
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import torch

from loracache.client import LoraCacheClient, LoraCacheError
from loracache.shared.packing import TensorItem, pack
from loracache.shared.protocol import StatsResult
from tests.support import REPO, Daemon, serving
from examples.tiny_models import save, sd_lora_peft, tiny_sd_pipeline

SOAK_SECONDS = float(os.environ.get("LORACACHE_SOAK_SECONDS", "30"))
WORKERS, FUSING_WORKERS = 16, 4
FILES, FUSABLE_FILES = 20, 6
RANK = 16  # 250 KiB per file
ENTRIES_THAT_FIT = 6
HOST_ENTRIES = 4  # the host tier's budget, in entries
DISK_FILES = 4  # the disk tier's budget, in files (of the 10 asked for by URL)
SESSION_TTL = 2
WARMUP_SECONDS = 5
RSS_EVERY = 5  # seconds between two samples of the daemon's RSS
# Seconds between two kills by the test. Each replacement costs seconds of CPU to start (the
# fusing ones 7): killing more often starves everything else on two cores.
KILL_INTERVAL = (3.0, 6.0)
SELF_KILL_SHARE = 0.2  # of the workers started, those that SIGKILL themselves...
SELF_KILL_AFTER = (10, 150)  # ...after this many operations, while holding leases
RENEWAL_ACQUIRES = 3  # at most per renewed session: the 2 held files, and a retried request
POLL_INTERVAL = 0.15
READY_TIMEOUT = 90
STOP_TIMEOUT = 30
EXPIRY_TIMEOUT = 10
RSS_GROWTH_LIMIT = 0.05
SOAK_WORKER = REPO / "tests" / "soak_worker.py"
# One thread per worker: sixteen processes each spinning up a thread pool swamp two cores.
WORKER_ENV = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def test_soak_with_kills_keeps_budget_leases_counters_and_memory(start_daemon, lora_dir,
                                                                tmp_path):
    seed = int(os.environ.get("LORACACHE_SOAK_SEED") or random.SystemRandom().randrange(10**6))
    print(f"\nsoak seed {seed} (LORACACHE_SOAK_SEED={seed} replays it)", flush=True)
    soak = Soak(seed, lora_dir, tmp_path / "workers")
    (tmp_path / "downloads").mkdir()
    with file_server(lora_dir) as base:
        soak.base = base
        daemon = soak.phase("daemon", start_daemon, "--max-bytes", str(soak.budget),
                            "--session-ttl", str(SESSION_TTL), "--acquire-timeout", "5",
                            "--host-max-bytes", str(HOST_ENTRIES * soak.entry_bytes),
                            "--allow-source", f"{base}/", "--cache-dir",
                            str(tmp_path / "downloads"), "--cache-max-bytes",
                            str(DISK_FILES * soak.file_bytes), "--cache-min-free-bytes", "1")
        try:
            soak.run(daemon)
        finally:
            soak.finish()
            print(soak.report(), flush=True)

    tally, final = soak.tally, soak.final
    assert not soak.fleet.failures, "\n\n".join(soak.fleet.failures)
    assert not soak.monitor.problems, "\n".join(soak.monitor.problems[:20])
    assert set(tally.errors) <= {"CACHE_FULL"}, f"unexpected errors: {dict(tally.errors)}"
    assert tally.ok > 100 and tally.fused > 10, "the workers hardly did anything"
    assert soak.fleet.kills > 0
    assert final.leases == 0, f"leases left after every session ended: {final}"
    assert final.sessions == 1, f"sessions left besides the asking one: {final}"
    # Each acquire a worker saw succeed is exactly one hit or miss. An acquire whose worker was
    # killed before the reply may or may not have been completed (and counted) by the daemon,
    # and a renewed session leases its files again: those only widen the upper bound.
    counted = soak.counted()
    most = tally.ok + tally.unresolved + RENEWAL_ACQUIRES * tally.renewed
    assert tally.ok <= counted <= most, (
        f"hits + misses = {counted}, acquires ok {tally.ok}, unresolved {tally.unresolved}, "
        f"renewed sessions {tally.renewed}")
    assert soak.rss_growth() < RSS_GROWTH_LIMIT, "the daemon's memory grew"
    host, disk = (next(t for t in final.tiers if t.tier == tier) for tier in ("host", "disk"))
    assert host.hits > 0 and host.used <= host.budget, host  # entries came back from host memory
    assert disk.misses > 0 and disk.hits > 0 and disk.evictions > 0, disk
    assert disk.used <= disk.budget, disk  # nothing in use at the end: back within the budget
    with daemon.client(heartbeat=False) as client:
        listed = client.list(tiers=True)
    assert len(daemon.shm_files()) == sum(e.tier in ("device", "host") for e in listed), (
        "shared memory beyond the entries and host copies the daemon lists")
    assert "Traceback" not in daemon.read_log(), daemon.read_log()[-5000:]


# ------------------------------------------------------------------------------- the run


class Soak:
    """The whole run: LoRA files, the fleet of workers, the budget monitor, and the figures."""

    def __init__(self, seed: int, lora_dir: Path, home: Path) -> None:
        self.started = time.monotonic()
        self.seed = seed
        self.rng = random.Random(seed)
        self.phases: dict[str, float] = {}  # seconds each phase took
        self.names, self.fusable, self.entry_bytes = self.phase("files", write_soak_loras,
                                                                lora_dir)
        self.file_bytes = max((lora_dir / name).stat().st_size for name in self.names)
        self.base = ""  # the file server's URL, where half the raw files are asked for
        # Six entries fit; a seventh does not, so 16 workers holding up to 2 leases compete.
        self.budget = (ENTRIES_THAT_FIT + 1) * self.entry_bytes - self.entry_bytes // 8
        self.lora_dir, self.home = lora_dir, home
        self.fleet: Fleet | None = None
        self.monitor: BudgetMonitor | None = None
        self.tally = Tally()
        self.baseline: StatsResult | None = None
        self.final: StatsResult | None = None
        self.rss: list[int] = []  # the daemon's, every RSS_EVERY s from the end of the warm-up
        self.rss_end: int | None = None

    def phase(self, name: str, action, *args):
        """Run ``action`` and note how long it took (start-up is most of the test on 2 cores)."""
        started = time.monotonic()
        try:
            return action(*args)
        finally:
            self.phases[name] = time.monotonic() - started

    def run(self, daemon: Daemon) -> None:
        self.daemon_pid = daemon.stats().pid
        self.baseline = self.prime(daemon)
        self.fleet = Fleet(daemon.socket, self.lora_dir, self.names, self.fusable, self.home,
                           self.rng, self.base)
        self.monitor = BudgetMonitor(daemon.socket)
        self.monitor.start()
        self.fleet.fill()
        self.phase("start-up", self.fleet.wait_ready)
        self.phase("busy", self.busy_phase)
        self.phase("stop", self.fleet.stop)
        self.monitor.stop()
        self.final = self.phase("expiry", wait_for_expiry, daemon)
        self.rss_end = rss_bytes(self.daemon_pid)

    def prime(self, daemon: Daemon) -> StatsResult:
        """One raw and one SD acquire, so the daemon has imported its converters before the
        RSS is first measured. Returns the stats after them: the counters' baseline."""
        with daemon.client(heartbeat=False) as client:
            client.acquire(self.fusable[0]).release()
            client.acquire(self.fusable[0], layout="sd").release()
        return daemon.stats()

    def busy_phase(self) -> None:
        """Let the workers run, killing one now and then; sample the RSS once warmed up."""
        start = time.monotonic()
        next_kill = start + self.rng.uniform(*KILL_INTERVAL)
        next_rss = start + WARMUP_SECONDS
        while time.monotonic() - start < SOAK_SECONDS and not self.fleet.failures:
            now = time.monotonic()
            if now >= next_rss:
                self.rss.append(rss_bytes(self.daemon_pid))
                next_rss += RSS_EVERY
            if now >= next_kill:
                self.fleet.kill_random()
                next_kill = now + self.rng.uniform(*KILL_INTERVAL)
            self.fleet.replace_dead()
            time.sleep(0.1)
        if not self.rss:  # a busy phase shorter than the warm-up
            self.rss.append(rss_bytes(self.daemon_pid))

    def finish(self) -> None:
        """Whatever happened: no worker left running, the monitor stopped, journals read."""
        if self.monitor is not None:
            self.monitor.stop()
        if self.fleet is not None:
            self.fleet.kill_all()
            self.tally = self.fleet.tally()

    def device_total(self, stats: StatsResult | None, key: str) -> int:
        return sum(getattr(device, key) for device in stats.devices) if stats else 0

    def counted(self) -> int:
        """Hits plus misses since the baseline: the acquires the daemon completed."""
        return sum(self.device_total(self.final, key) - self.device_total(self.baseline, key)
                   for key in ("hits", "misses"))

    def rss_growth(self) -> float:
        return (self.rss_end - self.rss[0]) / self.rss[0]

    def report(self) -> str:
        fleet, tally, monitor, final = self.fleet, self.tally, self.monitor, self.final
        mib = lambda n: f"{n / 2**20:.1f}"  # noqa: E731
        lines = [
            f"seed {self.seed}; test {time.monotonic() - self.started:.1f} s: "
            f"{', '.join(f'{name} {seconds:.1f} s' for name, seconds in self.phases.items())} "
            f"(LORACACHE_SOAK_SECONDS={SOAK_SECONDS:g})",
            f"files {len(self.names)} x {self.entry_bytes} bytes per entry; budget "
            f"{self.budget} bytes ({self.budget / self.entry_bytes:.2f} entries)",
        ]
        if fleet is not None:
            lines.append(f"processes started {fleet.started}; killed by the test {fleet.kills} "
                         f"({tally.killed_holding} of them holding leases); self-killed "
                         f"{fleet.self_kills}")
        lines += [
            f"acquires sent {tally.sent}: ok {tally.ok}, CACHE_FULL "
            f"{tally.errors.get('CACHE_FULL', 0)}, other errors "
            f"{dict((k, v) for k, v in tally.errors.items() if k != 'CACHE_FULL')}, unresolved "
            f"(killed mid-request) {tally.unresolved}; renewed sessions {tally.renewed}; fuse "
            f"cycles {tally.fused}",
        ]
        if final:
            lines.append(
                f"daemon since priming: hits + misses {self.counted()} (hits "
                f"{self.device_total(final, 'hits')}, misses "
                f"{self.device_total(final, 'misses')} in all), loads "
                f"{self.device_total(final, 'loads')}, evictions "
                f"{self.device_total(final, 'evictions')}, error replies {final.errors}")
        if monitor is not None:
            lines.append(f"max used {monitor.max_used} of budget {self.budget} bytes "
                         f"({monitor.max_used / self.budget:.1%}); max used + reserved "
                         f"{monitor.max_committed}; {monitor.polls} polls, "
                         f"{len(monitor.problems)} problems")
        if self.rss and self.rss_end:
            lines.append(f"daemon RSS after warm-up {mib(self.rss[0])} MiB, at the end "
                         f"{mib(self.rss_end)} MiB, growth {100 * self.rss_growth():+.2f} % "
                         f"(every {RSS_EVERY} s: {', '.join(mib(r) for r in self.rss)})")
        if final:
            lines.append(f"final sessions {final.sessions} (1 is the asking client), leases "
                         f"{final.leases}")
            lines += [f"{t.tier} tier: {mib(t.used)} of {mib(t.budget)} MiB, {t.entries} "
                      f"entries, hits {t.hits}, misses {t.misses}, evictions {t.evictions}"
                      for t in final.tiers]
        return "\n".join(["--- soak figures ---", *lines, "--------------------"])


def write_soak_loras(lora_dir: Path) -> tuple[list[str], list[str], int]:
    """FILES LoRA files with the same tensor names and shapes, so every raw entry has the same
    size. The first FUSABLE_FILES are real SD LoRAs made by PEFT for the tiny pipeline; the
    others hold random values seeded by their index. Returns the names, the fusable names and
    the size of one raw entry in the daemon."""
    pipe = tiny_sd_pipeline(smallest=True)
    real = [sd_lora_peft(pipe, rank=RANK, seed=index + 1) for index in range(FUSABLE_FILES)]
    shapes = {key: value.shape for key, value in real[0].items()}
    names = []
    for index in range(FILES):
        if index < FUSABLE_FILES:
            name, tensors = f"sd-{index:02}.safetensors", real[index]
        else:
            generator = torch.Generator().manual_seed(index)
            name = f"pattern-{index:02}.safetensors"
            tensors = {key: torch.randn(shape, generator=generator) * 0.1
                       for key, shape in shapes.items()}
        save(tensors, lora_dir / name)
        names.append(name)
    packed = pack([TensorItem(key, "F32", tuple(shape), shape.numel() * 4)
                   for key, shape in shapes.items()])
    return names, names[:FUSABLE_FILES], packed.nbytes


@contextlib.contextmanager
def file_server(directory: Path) -> Iterator[str]:
    """Serve ``directory`` over HTTP (as a plain web server does); yields its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(
        QuietFiles, directory=str(directory)))
    with serving(server):
        yield f"http://127.0.0.1:{server.server_port}"


class QuietFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def wait_for_expiry(daemon: Daemon) -> StatsResult:
    """The daemon's stats once the killed workers' sessions have expired (or the timeout)."""
    deadline = time.monotonic() + SESSION_TTL + EXPIRY_TIMEOUT
    while True:
        stats = daemon.stats()  # its own client: one session, closed again after
        if (stats.sessions == 1 and stats.leases == 0) or time.monotonic() > deadline:
            return stats
        time.sleep(0.2)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


# ---------------------------------------------------------------------- the worker processes


@dataclasses.dataclass
class Tally:
    """What the journals of every worker process say, summed."""

    sent: int = 0
    ok: int = 0
    released: int = 0
    unresolved: int = 0  # sent, and the worker died before the reply
    renewed: int = 0  # sessions the client had to open again (silent past the TTL)
    killed_holding: int = 0  # workers killed by the test while holding leases
    fused: int = 0  # fuse/unfuse cycles
    errors: collections.Counter = dataclasses.field(default_factory=collections.Counter)


@dataclasses.dataclass
class SoakWorker:
    """One worker process, its journal and its stderr."""

    mode: str
    proc: subprocess.Popen
    journal: Path
    stderr: Path
    killed: bool = False  # by the test

    def lines(self) -> list[str]:
        return self.journal.read_text().splitlines() if self.journal.exists() else []

    def self_killed(self) -> bool:
        lines = self.lines()
        return (self.proc.returncode == -signal.SIGKILL and bool(lines)
                and lines[-1].startswith("selfkill"))

    def describe(self, why: str) -> str:
        return (f"{self.mode} worker pid {self.proc.pid} {why} (exit {self.proc.returncode})\n"
                f"journal ends: {self.lines()[-5:]}\nstderr ends:\n"
                f"{self.stderr.read_text()[-3000:]}")


class Fleet:
    """Keeps WORKERS worker processes alive: starts them, kills some, replaces the dead ones."""

    def __init__(self, socket: Path, lora_dir: Path, names: list[str], fusable: list[str],
                 home: Path, rng: random.Random, base: str) -> None:
        self.socket, self.lora_dir, self.fusable = socket, lora_dir, fusable
        self.home, self.rng = home, rng
        self.popularity = rng.sample(names, len(names))  # most popular first, for all workers
        # every other file by popularity is asked for by URL
        self.urls = {name: f"{base}/{name}" for name in self.popularity[1::2]}
        home.mkdir()
        self.stop_file = home / "stop"
        self.alive: list[SoakWorker] = []
        self.gone: list[SoakWorker] = []
        self.started = self.kills = self.self_kills = 0
        self.failures: list[str] = []

    def fill(self) -> None:
        for number in range(WORKERS):
            self.spawn("fuse" if number < FUSING_WORKERS else "raw")

    def spawn(self, mode: str) -> None:
        number = self.started
        self.started += 1
        self_kill = self.rng.random() < SELF_KILL_SHARE
        config = {"mode": mode, "socket": str(self.socket), "lora_dir": str(self.lora_dir),
                  "files": self.popularity, "fusable": self.fusable, "urls": self.urls,
                  "seed": self.rng.randrange(2**32), "stop_file": str(self.stop_file),
                  "journal": str(self.home / f"{number:03}.journal"),
                  "self_kill_after": self.rng.randint(*SELF_KILL_AFTER) if self_kill else None}
        stderr = self.home / f"{number:03}.stderr"
        with open(stderr, "w") as err:
            proc = subprocess.Popen([sys.executable, str(SOAK_WORKER), json.dumps(config)],
                                    stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                    env={**os.environ, **WORKER_ENV})
        self.alive.append(SoakWorker(mode, proc, Path(config["journal"]), stderr))

    def wait_ready(self) -> None:
        """Wait until every worker has connected (and built its pipeline): start-up is slow."""
        deadline = time.monotonic() + READY_TIMEOUT
        while not all("ready" in w.lines() for w in self.alive):
            self.replace_dead()
            if self.failures or time.monotonic() > deadline:
                self.failures.append(f"not all workers ready after {READY_TIMEOUT} s")
                return
            time.sleep(0.2)

    def kill_random(self) -> None:
        """SIGKILL a random worker that is at work, as the OOM killer would, and replace it."""
        ready = [w for w in self.alive if w.proc.poll() is None and "ready" in w.lines()]
        if not ready:
            return
        worker = self.rng.choice(ready)
        worker.proc.send_signal(signal.SIGKILL)
        worker.proc.wait()
        worker.killed = True
        self.kills += 1
        self.retire(worker)
        self.spawn(worker.mode)

    def replace_dead(self) -> None:
        """Replace workers that killed themselves; any other exit is a failure."""
        for worker in [w for w in self.alive if w.proc.poll() is not None]:
            self.retire(worker)
            if worker.self_killed():
                self.self_kills += 1
                self.spawn(worker.mode)
            else:
                self.failures.append(worker.describe("exited during the soak"))

    def stop(self) -> None:
        """Ask every worker to release what it holds and exit; all must exit 0. Replacements
        still starting hold nothing yet: they are killed rather than waited for (seconds of
        imports), and their sessions expire like those of the other killed workers."""
        self.replace_dead()
        self.stop_file.touch()
        for worker in [w for w in self.alive if "ready" not in w.lines()]:
            worker.proc.kill()
            worker.proc.wait()
            self.retire(worker)
        deadline = time.monotonic() + STOP_TIMEOUT
        for worker in list(self.alive):
            try:
                worker.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                continue  # kill_all() ends it; reported below
            self.retire(worker)
            if worker.self_killed():  # it was due just as the stop came
                self.self_kills += 1
            elif worker.proc.returncode != 0 or worker.lines()[-1:] != ["done"]:
                self.failures.append(worker.describe("did not stop cleanly"))
        for worker in self.alive:
            self.failures.append(worker.describe(f"still running {STOP_TIMEOUT} s after stop"))

    def kill_all(self) -> None:
        for worker in list(self.alive):
            worker.proc.kill()
            worker.proc.wait()
            self.retire(worker)

    def retire(self, worker: SoakWorker) -> None:
        self.alive.remove(worker)
        self.gone.append(worker)

    def tally(self) -> Tally:
        tally = Tally()
        for worker in self.alive + self.gone:
            words = [line.split() for line in worker.lines()]
            count = collections.Counter(w[0] for w in words if w)
            tally.sent += count["sent"]
            tally.ok += count["ok"]
            tally.released += count["rel"]
            tally.renewed += count["renewed"]
            tally.fused += count["fused"]
            tally.errors += collections.Counter(w[1] for w in words if w and w[0] == "err")
            tally.unresolved += count["sent"] - count["ok"] - count["err"]
            if worker.killed and count["ok"] > count["rel"]:
                tally.killed_holding += 1
        return tally


class BudgetMonitor(threading.Thread):
    """Polls the daemon's stats every POLL_INTERVAL from its own client: ``used`` (and ``used``
    plus the bytes of loads in flight, which are allocated too) must stay within the budget on
    every device. Keeps the largest values seen."""

    def __init__(self, socket: Path) -> None:
        super().__init__(name="soak-budget-monitor", daemon=True)
        self.socket = socket
        self.halt = threading.Event()
        self.max_used = self.max_committed = self.polls = 0
        self.problems: list[str] = []

    def run(self) -> None:
        with LoraCacheClient(self.socket, heartbeat=False) as client:
            while not self.halt.wait(POLL_INTERVAL):
                try:
                    self.check(client.stats())
                except LoraCacheError as exc:
                    self.problems.append(f"stats failed: {exc}")

    def check(self, stats: StatsResult) -> None:
        self.polls += 1
        for device in stats.devices:
            used, committed = device.used, device.used + device.reserved
            self.max_used = max(self.max_used, used)
            self.max_committed = max(self.max_committed, committed)
            if used > device.budget or committed > device.budget:
                self.problems.append(f"{device.device}: used {used}, reserved "
                                     f"{device.reserved}, budget {device.budget}")

    def stop(self) -> None:
        self.halt.set()
        if self.is_alive():
            self.join(10)
