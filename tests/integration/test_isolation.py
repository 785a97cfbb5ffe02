"""Per-session quotas and the admin socket: one client cannot hold the whole cache, and only
operators evict, clear or pin when the configuration says so."""

from __future__ import annotations

import grp
import os
import stat
import subprocess
import sys

import pytest
import torch

from loracache.client import ErrorCode, LoraCacheClient, LoraCacheError
from loracache.shared.protocol import DropResult
from tests.support import write_lora


def test_lease_count_quota_per_session(start_daemon, lora_dir):
    for name in "abc":
        write_lora(lora_dir / f"{name}.safetensors", {"w": torch.ones(16)})
    daemon = start_daemon("--session-max-leases", "2")
    with daemon.client() as greedy, daemon.client() as other:
        held = [greedy.acquire("a.safetensors"), greedy.acquire("b.safetensors")]
        with pytest.raises(LoraCacheError) as refused:
            greedy.acquire("c.safetensors")
        assert refused.value.code is ErrorCode.NOT_ALLOWED
        assert "session_max_leases = 2" in refused.value.message
        other.acquire("c.safetensors").release()  # other sessions are not affected
        cpu = daemon.cpu_stats()
        assert cpu.hits + cpu.misses == 3  # the refused acquire is not counted
        held.pop().release()
        greedy.acquire("c.safetensors").release()
    assert daemon.stats().leases == 0


def test_leased_bytes_quota_counts_each_entry_once(start_daemon, lora_dir):
    for name in "ab":
        write_lora(lora_dir / f"{name}.safetensors", {"w": torch.ones(192 * 1024)})  # 768 KiB
    daemon = start_daemon("--session-max-bytes", "1MiB")
    with daemon.client() as client:
        first = client.acquire("a.safetensors")
        client.acquire("a.safetensors").release()  # the same entry costs nothing more
        with pytest.raises(LoraCacheError) as refused:
            client.acquire("b.safetensors")
        assert refused.value.code is ErrorCode.NOT_ALLOWED
        assert "session_max_bytes" in refused.value.message
        first.release()
        client.acquire("b.safetensors").release()
    assert daemon.stats().leases == 0


def test_admin_operations_only_on_the_admin_socket(start_daemon, lora_dir, tmp_path):
    write_lora(lora_dir / "a.safetensors", {"w": torch.ones(16)})
    admin_path = tmp_path / "admin.sock"
    group = grp.getgrgid(os.getgid()).gr_name
    daemon = start_daemon("--admin-socket", str(admin_path), "--admin-group", group)
    mode = os.stat(admin_path)
    assert stat.S_IMODE(mode.st_mode) == 0o660 and mode.st_gid == os.getgid()
    with daemon.client() as worker:
        worker.preload("a.safetensors")  # unpinned preloads stay open to workers
        for attempt in (lambda: worker.evict("a.safetensors"), worker.clear,
                        lambda: worker.preload("a.safetensors", pin=True)):
            with pytest.raises(LoraCacheError) as refused:
                attempt()
            assert refused.value.code is ErrorCode.NOT_ALLOWED
            assert str(admin_path) in refused.value.message
        worker.acquire("a.safetensors").release()  # the rest works as before
    with LoraCacheClient(admin_path) as operator:
        assert operator.preload("a.safetensors", pin=True).pinned
        assert operator.evict("a.safetensors") == DropResult(evicted=1, busy=0)
    cli = subprocess.run([sys.executable, "-m", "loracache.client.cli", "--socket",
                          str(admin_path), "evict", "--all"], capture_output=True, text=True,
                         timeout=60)
    assert cli.returncode == 0, cli.stderr
    assert daemon.stop() == 0
    assert not admin_path.exists()
