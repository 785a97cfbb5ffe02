"""Cache policy as a client process meets it: waiting for room while another thread releases,
CACHE_FULL after the timeout, cache_size from the environment, no file left behind. The policy
itself (LRU, budget, pins, TOO_LARGE, quotas, expiry) is proven in-process in
tests/daemon/test_service_policy.py."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from loracache.client import ErrorCode, LoraCacheError
from tests.support import write_lora

KiB = 1 << 10
ENTRY = 256 * KiB  # every file below packs to exactly this many bytes


def lora(lora_dir, name: str, seed: int = 0) -> str:
    write_lora(lora_dir / f"{name}.safetensors",
               {"w": torch.full((ENTRY // 2,), float(seed), dtype=torch.float16)})
    return f"{name}.safetensors"


def cached_names(daemon) -> set[str]:
    with daemon.client(heartbeat=False) as client:
        return {e.path.rsplit("/", 1)[1].removesuffix(".safetensors") for e in client.list()}


def test_cache_full_after_waiting_for_the_timeout(start_daemon, lora_dir):
    daemon = start_daemon("--max-bytes", str(ENTRY), "--acquire-timeout", "1")
    with daemon.client() as client:
        held = client.acquire(lora(lora_dir, "a"))
        started = time.monotonic()
        with pytest.raises(LoraCacheError) as error:
            client.acquire(lora(lora_dir, "b"))
        waited = time.monotonic() - started
        assert error.value.code is ErrorCode.CACHE_FULL
        assert waited >= 0.9
        assert f"budget {ENTRY}" in error.value.message and "leased" in error.value.message
        held.release()
        client.acquire("b.safetensors").release()  # room again once released


def test_acquire_waits_for_a_release_instead_of_failing(start_daemon, lora_dir):
    daemon = start_daemon("--max-bytes", str(ENTRY), "--acquire-timeout", "30")
    with daemon.client() as client:
        held = client.acquire(lora(lora_dir, "a"))
        lora(lora_dir, "b")
        releaser = threading.Timer(0.5, held.release)
        releaser.start()
        with client.acquire("b.safetensors") as lease:  # blocks until the timer releases a
            assert lease.entry.path.endswith("b.safetensors")
        releaser.join()
        assert cached_names(daemon) == {"b"}


def test_cache_size_zero_keeps_nothing_unleased_but_shares_while_leased(start_daemon, lora_dir):
    daemon = start_daemon("--max-bytes", "64MiB", "--cache-size", "0", "--host-max-bytes", "0")
    with daemon.client() as client:
        first = client.acquire(lora(lora_dir, "a"))
        second = client.acquire("a.safetensors")
        assert first.entry.id == second.entry.id and daemon.cpu_stats().loads == 1
        first.release()
        assert cached_names(daemon) == {"a"}
        second.release()
        assert cached_names(daemon) == set() and daemon.shm_files() == []


def test_cache_size_caps_idle_entries(start_daemon, lora_dir):
    daemon = start_daemon("--max-bytes", "64MiB", env={"LORACACHE_CACHE_SIZE": "2"})
    with daemon.client() as client:
        for name in "abcd":
            client.acquire(lora(lora_dir, name)).release()
        assert cached_names(daemon) == {"c", "d"}
        assert daemon.cpu_stats().cache_size == 2
