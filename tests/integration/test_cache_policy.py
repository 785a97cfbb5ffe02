"""Cache policy against the real daemon: LRU, budget, leases, pins, CACHE_FULL, TOO_LARGE."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from loracache.client import ErrorCode, LoraCacheError
from loracache.shared.protocol import DropResult
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


def test_least_recently_used_entry_is_evicted_first(start_daemon, lora_dir):
    daemon = start_daemon("--max-bytes", str(3 * ENTRY))
    with daemon.client() as client:
        for name in "abc":
            client.acquire(lora(lora_dir, name)).release()
        client.acquire("a.safetensors").release()  # a is now more recent than b
        client.acquire(lora(lora_dir, "d")).release()
        assert cached_names(daemon) == {"a", "c", "d"}
        client.acquire(lora(lora_dir, "e")).release()
        assert cached_names(daemon) == {"a", "d", "e"}
        assert daemon.cpu_stats().evictions == 2


def test_budget_is_never_exceeded_and_leased_entries_stay(start_daemon, lora_dir):
    daemon = start_daemon("--max-bytes", str(3 * ENTRY), "--acquire-timeout", "0")
    with daemon.client() as client:
        held = client.acquire(lora(lora_dir, "held"))
        for i in range(8):
            client.acquire(lora(lora_dir, f"f{i}", seed=i)).release()
            stats = daemon.cpu_stats()
            assert stats.used <= stats.budget
            assert "held" in cached_names(daemon)
        assert torch.all(held.tensors["w"] == 0)
        held.release()


def test_pinned_entries_are_not_evicted_until_evicted_by_name(start_daemon, lora_dir):
    daemon = start_daemon("--max-bytes", str(2 * ENTRY), "--acquire-timeout", "0")
    with daemon.client() as client:
        client.preload(lora(lora_dir, "pinned"), pin=True)
        for i in range(3):
            client.acquire(lora(lora_dir, f"f{i}")).release()
        assert "pinned" in cached_names(daemon)
        with client.acquire("f0.safetensors"):
            with pytest.raises(LoraCacheError) as full:
                client.acquire(lora(lora_dir, "f9"))
            assert full.value.code is ErrorCode.CACHE_FULL
        assert client.evict("pinned.safetensors") == DropResult(evicted=1, busy=0)
        client.acquire("f9.safetensors").release()


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


def test_too_large_fails_at_once(start_daemon, lora_dir):
    daemon = start_daemon("--max-bytes", str(ENTRY - 1), "--acquire-timeout", "30")
    with daemon.client() as client:
        started = time.monotonic()
        with pytest.raises(LoraCacheError) as error:
            client.acquire(lora(lora_dir, "a"))
        assert error.value.code is ErrorCode.TOO_LARGE
        assert time.monotonic() - started < 10
        assert daemon.cpu_stats().used == 0


def test_cache_size_zero_keeps_nothing_unleased_but_shares_while_leased(start_daemon, lora_dir):
    daemon = start_daemon("--max-bytes", "64MiB", "--cache-size", "0")
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
