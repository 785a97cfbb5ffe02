"""Faults with real processes: clients killed mid-request, files deleted under leases, storage
that runs out before the budget does. Nothing else is affected, and the daemon keeps serving.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest
import torch
from safetensors.torch import load_file

from loracache.client import ErrorCode, LoraCacheError
from tests.support import Worker, sized_lora, wait_until, write_lora

MIB = 1 << 20


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs, so storage runs out long before a 64 MiB budget does."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0755", "tmpfs",
                    str(mount_point)], check=True)
    yield mount_point
    subprocess.run(["umount", "--lazy", str(mount_point)], check=True)


def test_storage_exhausted_evicts_and_retries_then_cache_full(small_tmpfs, start_daemon,
                                                              lora_dir):
    for name, seed in (("a", 1), ("b", 2), ("c", 3), ("d", 4)):
        sized_lora(lora_dir / f"{name}.safetensors", 3 * MIB // 2, seed=seed)
    daemon = start_daemon("--shm-dir", str(small_tmpfs), "--max-bytes", "64MiB",
                          "--acquire-timeout", "0")
    with daemon.client() as client:
        client.acquire("a.safetensors").release()  # idle: the one to evict
        b = client.acquire("b.safetensors")
        c = client.acquire("c.safetensors")  # 4.5 MiB would not fit: a is evicted, c loads
        assert sorted(Path(e.path).name for e in client.list()) == ["b.safetensors",
                                                                       "c.safetensors"]
        assert daemon.cpu_stats().evictions == 1
        with pytest.raises(LoraCacheError) as full:  # nothing idle left to evict
            client.acquire("d.safetensors")
        assert full.value.code is ErrorCode.CACHE_FULL
        assert str(small_tmpfs) in full.value.message and "no space left" in full.value.message
        assert daemon.cpu_stats().entries == 2  # no partial entry
        b.release()
        with client.acquire("d.safetensors") as d:  # b is idle now: evicted, d fits
            assert d.entry.nbytes > 0
        expected = load_file(lora_dir / "c.safetensors")  # c was never disturbed
        assert all(torch.equal(c.tensors[k], v) for k, v in expected.items())
        c.release()
    daemon.wait_for_log("has no room for")


def test_client_killed_in_the_middle_of_an_acquire(start_daemon, lora_dir):
    """The load finishes for a session whose process is gone; the lease it got is released
    within the TTL, the entry stays cached, other clients are not affected."""
    sized_lora(lora_dir / "big.safetensors", 64 * MIB)
    daemon = start_daemon("--max-bytes", "256MiB", "--session-ttl", "1")
    worker = Worker(daemon.socket)
    worker.send("acquire", path="big.safetensors")
    time.sleep(0.05)  # the request is on its way, the load under way
    worker.kill()
    with daemon.client() as client:
        with client.acquire("big.safetensors") as lease:
            assert lease.entry.nbytes >= 64 * MIB
    wait_until(lambda: daemon.stats().leases == 0)
    stats = daemon.stats()
    assert stats.sessions == 1  # the one asking: the killed worker's session expired
    assert stats.devices[0].entries == 1 and stats.devices[0].loads == 1


def test_client_killed_while_holding_leases_of_several_files(start_daemon, lora_dir):
    for name in "abc":
        write_lora(lora_dir / f"{name}.safetensors", {"w": torch.full((1024,), 1.0)})
    daemon = start_daemon("--session-ttl", "1")
    worker = Worker(daemon.socket)
    for name in "abc":
        worker.call("acquire", path=f"{name}.safetensors")
    with daemon.client() as bystander:
        kept = bystander.acquire("a.safetensors")
        worker.kill()
        wait_until(lambda: daemon.cpu_stats().leases == 1)
        assert torch.equal(kept.tensors["w"], torch.ones(1024))  # untouched
        kept.release()
    daemon.wait_for_log("expired")


def test_file_deleted_while_leased_keeps_the_lease_working(daemon, lora_dir):
    path = write_lora(lora_dir / "a.safetensors", {"w": torch.arange(4096.0)})
    with daemon.client() as client:
        lease = client.acquire("a.safetensors")
        path.unlink()
        assert torch.equal(lease.tensors["w"], torch.arange(4096.0))
        with pytest.raises(LoraCacheError) as gone:
            client.acquire("a.safetensors")
        assert gone.value.code is ErrorCode.NOT_FOUND
        lease.release()
        assert client.clear().evicted == 1
