"""The ``loracache`` command against a live daemon and against none."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.support import write_lora


def cli(*args: str, socket=None) -> subprocess.CompletedProcess:
    env = {**os.environ}
    if socket is not None:
        env["LORACACHE_SOCKET"] = str(socket)
    return subprocess.run([sys.executable, "-m", "loracache.client.cli", *args],
                          capture_output=True, text=True, timeout=60, env=env)


def test_stats_and_ls_as_tables_and_json(daemon, lora_dir):
    write_lora(lora_dir / "a.safetensors", {"w": torch.ones(1 << 18)})
    with daemon.client() as client, client.acquire("a.safetensors"):
        stats = json.loads(cli("stats", "--json", socket=daemon.socket).stdout)
        (cpu,) = stats["devices"]
        assert cpu["entries"] == 1 and cpu["leases"] == 1 and cpu["used"] == 1 << 20
        table = cli("stats", socket=daemon.socket).stdout
        assert "1.0 MiB" in table and "ENTRIES" in table
        (entry,) = json.loads(cli("ls", "--json", socket=daemon.socket).stdout)
        assert entry["path"] == str(lora_dir / "a.safetensors") and entry["leases"] == 1
        listing = cli("ls", socket=daemon.socket).stdout
        assert str(lora_dir / "a.safetensors") in listing and "1.0 MiB" in listing


def test_preload_pin_evict_clear_and_ping(daemon, lora_dir):
    write_lora(lora_dir / "a.safetensors", {"w": torch.ones(16)})
    write_lora(lora_dir / "b.safetensors", {"w": torch.ones(16)})
    assert "pinned" in cli("preload", "a.safetensors", "--pin", socket=daemon.socket).stdout
    assert cli("preload", "b.safetensors", socket=daemon.socket).returncode == 0
    with daemon.client(heartbeat=False) as client:
        assert [e["pinned"] for e in client.list()] == [True, False]
    assert "evicted 1" in cli("evict", "a.safetensors", socket=daemon.socket).stdout
    assert "evicted 1" in cli("clear", socket=daemon.socket).stdout
    assert daemon.cpu_stats()["entries"] == 0
    assert cli("ping", socket=daemon.socket).returncode == 0
    assert cli("--socket", str(daemon.socket), "ping").returncode == 0


def test_errors_from_the_daemon_exit_1_with_the_code(daemon):
    result = cli("preload", "missing.safetensors", socket=daemon.socket)
    assert result.returncode == 1 and "NOT_FOUND" in result.stderr


@pytest.mark.parametrize("command", [["stats"], ["ls", "--json"], ["ping"], ["clear"]])
def test_no_daemon_exits_2_naming_the_socket(tmp_path, command):
    socket = tmp_path / "absent.sock"
    result = cli(*command, socket=socket)
    assert result.returncode == 2
    assert str(socket) in result.stderr and "DAEMON_UNAVAILABLE" in result.stderr
