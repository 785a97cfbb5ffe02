"""A worker process of the soak test (tests/integration/test_soak.py).

Run as ``python tests/soak_worker.py CONFIG_JSON`` with PYTHONPATH at the repository root. It
works against the daemon until the stop file appears, then releases everything and exits 0:

- mode ``raw``: acquires random files (some by URL), popular ones more often as real traffic
  does, holding 0 to 2 leases; checks every tensor of each lease against the file on disk when
  it is acquired and again before it is released;
- mode ``fuse``: fuses 1 or 2 SD LoRAs into a tiny pipeline through the daemon, then unfuses
  and deletes them, checking the weights come back (bit-exactly with ``restore="backup"``).

CACHE_FULL is expected (the budget is tight); any other error ends the worker with a traceback.
The journal lets the test reconcile the daemon's counters with what the workers saw, even for
workers it SIGKILLs: "sent" before each acquire and "ok" or "err CODE" after its reply, "rel"
after each release, "renewed" when the client had to open a new session (which leases the held
files again), "selfkill" right before this process SIGKILLs itself.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from loracache.client import (ErrorCode, LoraCacheClient, LoraCacheError, delete_adapters,
                              load_and_fuse_lora, unfuse_lora)

MAX_HELD = 2
SUBTRACT_TOLERANCE = 1e-4  # restore="subtract" is exact up to float32 rounding
HOLD_SECONDS = (0.01, 0.1)  # how long a lease or a fused adapter is used: most time is idle,
IDLE_SECONDS = (0.02, 0.2)  # so that 16 workers leave CPU to the daemon on two cores


class Journal:
    """Lines written straight to the file with no user-space buffer, so a SIGKILL loses none."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write(self, *words: object) -> None:
        os.write(self.fd, (" ".join(map(str, words)) + "\n").encode())


class JournaledClient(LoraCacheClient):
    """A client that journals each acquire: the fusing API acquires through it too."""

    journal: Journal

    def acquire(self, path, device="cpu", layout="raw"):
        self.journal.write("sent")
        try:
            lease = super().acquire(path, device, layout)
        except LoraCacheError as exc:
            self.journal.write("err", exc.code.value)
            raise
        self.journal.write("ok")
        return lease


class Worker:
    """What both modes share: config, RNG, journal, client, stop file and the self-kill."""

    def __init__(self, config: dict) -> None:
        self.lora_dir = Path(config["lora_dir"])
        self.stop_file = Path(config["stop_file"])
        self.rng = random.Random(config["seed"])
        self.self_kill_after = config["self_kill_after"]  # operations, or None
        self.operations = 0
        self.journal = Journal(config["journal"])
        self.client = JournaledClient(config["socket"])
        self.client.journal = self.journal
        self.session = self.client.session

    def stopping(self) -> bool:
        return self.stop_file.exists()

    def full_or(self, action):
        """Run ``action``, which acquires; None when the cache is full, as it may be."""
        try:
            return action()
        except LoraCacheError as exc:
            if exc.code is not ErrorCode.CACHE_FULL:
                raise
            return None

    def step_done(self, holding: int) -> None:
        """Count an operation; note a new session; once due and holding leases, die by SIGKILL
        (between requests, so this process's journal is exact)."""
        self.operations += 1
        if self.client.session != self.session:  # silent past the TTL under load: renewed
            self.session = self.client.session
            self.journal.write("renewed")
        if (self.self_kill_after is not None and self.operations >= self.self_kill_after
                and holding):
            self.journal.write("selfkill", holding)
            os.kill(os.getpid(), signal.SIGKILL)

    def pause(self, seconds: tuple[float, float]) -> None:
        time.sleep(self.rng.uniform(*seconds))


class RawWorker(Worker):
    """Random acquires and releases of raw leases, each checked against the file."""

    def __init__(self, config: dict) -> None:
        super().__init__(config)
        self.files = config["files"]  # most popular first
        self.urls = config["urls"]  # the files asked for by URL, by name
        self.popularity = [1 / (rank + 1) for rank in range(len(self.files))]  # Zipf
        self.written: dict[str, dict[str, torch.Tensor]] = {}  # file name -> its tensors

    def run(self) -> None:
        held: list[tuple[str, object]] = []
        self.journal.write("ready")
        while not self.stopping():
            if held and (len(held) == MAX_HELD or self.rng.random() < 0.5):
                self.release(*held.pop(self.rng.randrange(len(held))))
                self.pause(IDLE_SECONDS)
            else:
                name = self.rng.choices(self.files, self.popularity)[0]
                source = self.urls.get(name, name)
                lease = self.full_or(lambda s=source: self.client.acquire(s))
                if lease is not None:
                    self.check(name, lease)
                    held.append((name, lease))
                    self.pause(HOLD_SECONDS)
            self.step_done(len(held))
        for name, lease in held:
            self.release(name, lease)

    def release(self, name: str, lease) -> None:
        self.check(name, lease)  # unchanged for as long as it was held
        lease.release()
        self.journal.write("rel")

    def check(self, name: str, lease) -> None:
        if name not in self.written:
            self.written[name] = load_file(str(self.lora_dir / name))
        expected = self.written[name]
        if set(lease.tensors) != set(expected):
            raise AssertionError(f"{name}: lease has tensors {sorted(lease.tensors)[:4]}..., the "
                                 f"file {sorted(expected)[:4]}...")
        for key, want in expected.items():
            got = lease.tensors[key]
            if got.dtype != want.dtype or got.shape != want.shape or not torch.equal(got, want):
                raise AssertionError(f"{name}: tensor {key} of lease {lease.id} differs from the "
                                     f"file ({got.dtype} {tuple(got.shape)} vs {want.dtype} "
                                     f"{tuple(want.shape)})")


class FusingWorker(Worker):
    """Fuse and unfuse cycles on a tiny SD pipeline through the daemon."""

    def __init__(self, config: dict) -> None:
        from examples.tiny_models import tiny_sd_pipeline

        self.pipe = tiny_sd_pipeline(smallest=True)  # seconds of CPU: before connecting
        super().__init__(config)
        self.files = config["fusable"]
        self.weights = {f"{part}.{name}": parameter for part in ("unet", "text_encoder")
                        for name, parameter in getattr(self.pipe, part).named_parameters()}
        self.before: dict[str, torch.Tensor] = {}  # the weights before this cycle fused

    def run(self) -> None:
        self.journal.write("ready")
        while not self.stopping():
            restore = self.rng.choice(["subtract", "backup"])
            self.before = {name: w.detach().clone() for name, w in self.weights.items()}
            loaded = self.load(self.rng.sample(self.files, self.rng.choice([1, 2])), restore)
            if loaded:
                if self.drift() == 0:
                    raise AssertionError("fusing changed no weight")
                self.pause(HOLD_SECONDS)  # inference
                self.step_done(loaded)
                if self.rng.random() < 0.5:
                    unfuse_lora(self.pipe)
                    self.check_restored(restore, "unfuse_lora")
                delete_adapters(self.pipe)
                self.check_restored(restore, "delete_adapters")
                for _ in range(loaded):
                    self.journal.write("rel")
                self.journal.write("fused", loaded)
            self.step_done(0)
            self.pause(IDLE_SECONDS)

    def load(self, names: list[str], restore: str) -> int:
        """Fuse ``names`` one after another; stops at the first CACHE_FULL. Returns how many."""
        for count, name in enumerate(names):
            fused = self.full_or(lambda n=name, c=count: load_and_fuse_lora(
                self.pipe, str(self.lora_dir / n), f"a{c}", client=self.client,
                restore=restore, fallback="error") or True)
            if fused is None:
                return count
        return len(names)

    def drift(self) -> float:
        """The largest difference between the weights now and before this cycle fused."""
        return max(float((w.detach() - self.before[n]).abs().max())
                   for n, w in self.weights.items())

    def check_restored(self, restore: str, after: str) -> None:
        drift = self.drift()
        limit = 0.0 if restore == "backup" else SUBTRACT_TOLERANCE
        if drift > limit:
            raise AssertionError(f"weights differ by {drift:g} after {after} "
                                 f"(restore={restore!r}, allowed {limit:g})")


def main() -> None:
    config = json.loads(sys.argv[1])
    worker = (FusingWorker if config["mode"] == "fuse" else RawWorker)(config)
    try:
        worker.run()
        worker.step_done(0)  # a renewal during the last operation is journaled too
        worker.client.close()
    except BaseException as exc:
        worker.journal.write("fail", repr(exc)[:500].replace("\n", " "))
        raise
    worker.journal.write("done")


if __name__ == "__main__":
    main()
