"""Starting and stopping the daemon process: clean shutdown, stale files, refusals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from loracache.client import ErrorCode, LoraCacheClient, LoraCacheError
from tests.support import write_lora


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly_and_removes_socket_and_shm_files(start_daemon, lora_dir, sig):
    daemon = start_daemon()
    write_lora(lora_dir / "a.safetensors", {"w": torch.ones(1000)})
    with daemon.client() as client:
        client.acquire("a.safetensors").release()
        client.preload("a.safetensors", pin=True)
    assert daemon.shm_files()
    assert daemon.stop(sig) == 0
    assert not daemon.socket.exists()
    assert list(daemon.shm_root.rglob("*.bin")) == []
    assert [p for p in daemon.shm_root.rglob("*") if p.is_dir()] == [
        daemon.shm_root / f"loracache-{os.getuid()}"]
    assert "stopped" in daemon.read_log()


def test_stopping_while_clients_hold_leases_is_clean(daemon, lora_dir):
    write_lora(lora_dir / "a.safetensors", {"w": torch.arange(1000.0)})
    client = daemon.client(heartbeat=False)
    lease = client.acquire("a.safetensors")
    assert daemon.stop() == 0
    assert not daemon.socket.exists() and daemon.shm_files() == []
    assert torch.equal(lease.tensors["w"], torch.arange(1000.0))  # the mapping outlives the file
    started = time.monotonic()
    lease.release()  # warns instead of failing the worker: the daemon is gone
    assert time.monotonic() - started < 10 and lease.released
    client.close()


def test_socket_and_shm_permissions(daemon, lora_dir):
    write_lora(lora_dir / "a.safetensors", {"w": torch.ones(1000)})
    with daemon.client() as client, client.acquire("a.safetensors"):
        (shm_file,) = daemon.shm_files()
        assert shm_file.stat().st_mode & 0o777 == 0o640
        assert shm_file.parent.stat().st_mode & 0o777 == 0o750
    assert daemon.socket.stat().st_mode & 0o777 == 0o660


def test_second_daemon_on_a_live_socket_is_refused(daemon, lora_dir):
    result = subprocess.run(
        [sys.executable, "-m", "loracache.client.cli", "serve", "--socket", str(daemon.socket),
         "--lora-dir", str(lora_dir), "--devices", "cpu", "--shm-dir", str(daemon.shm_root)],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "already serving" in result.stderr
    daemon.stats()  # the first one is unharmed


def test_the_harness_does_not_take_another_daemon_for_its_own(start_daemon, lora_dir):
    """The harness (examples/daemon_process.py) waits for its own process to answer, and a
    failed start leaves the first daemon's shared memory alone."""
    first = start_daemon()
    write_lora(lora_dir / "a.safetensors", {"w": torch.ones(1000)})
    with pytest.raises(RuntimeError, match="exited with 2"):
        start_daemon(reuse=first)
    with first.client() as client, client.acquire("a.safetensors") as lease:
        assert torch.equal(lease.tensors["w"], torch.ones(1000))


def test_stale_socket_and_shm_dir_of_a_killed_daemon_are_cleaned(start_daemon, lora_dir):
    first = start_daemon()
    write_lora(lora_dir / "a.safetensors", {"w": torch.ones(1000)})
    with first.client() as client:
        client.preload("a.safetensors", pin=True)
    first.stop(signal.SIGKILL)
    assert first.socket.exists() and first.shm_files()  # what a crash leaves behind
    second = start_daemon(reuse=first)
    assert first.shm_files() == []
    with second.client() as client:
        client.acquire("a.safetensors").release()
    assert second.stop() == 0


@pytest.mark.parametrize("flags, message", [
    (["--max-bytes", "lots"], "not a size"),
    (["--max-bytes", "150%"], "percentage"),
    (["--cache-size", "-1"], "cache_size"),
    (["--session-ttl", "0"], "session_ttl"),
    (["--devices", "tpu"], "devices"),
    (["--socket", "/tmp/" + "x" * 120], "longer than"),
    (["--lora-dir", "/nonexistent/loras"], "not a directory"),
])
def test_invalid_configuration_exits_2_with_a_message(lora_dir, tmp_path, flags, message):
    command = [sys.executable, "-m", "loracache.client.cli", "serve", "--devices", "cpu",
               "--socket", str(tmp_path / "s"), "--lora-dir", str(lora_dir), *flags]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


def test_client_without_daemon_names_the_socket(tmp_path):
    socket = tmp_path / "nobody.sock"
    with pytest.raises(LoraCacheError) as error:
        LoraCacheClient(socket)
    assert error.value.code is ErrorCode.DAEMON_UNAVAILABLE
    assert str(socket) in error.value.message and "loracache serve" in error.value.message


def test_client_times_out_when_the_daemon_is_stopped(start_daemon):
    daemon = start_daemon()
    daemon.proc.send_signal(signal.SIGSTOP)  # alive but not answering
    try:
        with pytest.raises(LoraCacheError) as error:
            LoraCacheClient(daemon.socket, connect_timeout=0.5)
        assert error.value.code is ErrorCode.DAEMON_UNAVAILABLE
        assert "within 0.5 s" in error.value.message
    finally:
        daemon.proc.send_signal(signal.SIGCONT)
