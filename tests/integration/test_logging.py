"""Logging cannot stop the daemon: a stderr nobody reads (a pipe whose reader hung) used to
block the event loop once the pipe filled, and the daemon stopped answering everyone."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import torch
import zmq

from loracache.client import LoraCacheClient
from loracache.shared.protocol import Hello, encode_request
from tests.support import wait_until, write_lora

BAD_REQUESTS = 10_000
SESSIONS = 2_000  # each is a debug line: far more than a pipe holds (64 KiB)
PEERS = 20


def replies(sock: zmq.Socket, count: int, timeout: float = 120.0) -> list[dict]:
    got, deadline = [], time.monotonic() + timeout
    while len(got) < count:
        if not sock.poll(max(1, int((deadline - time.monotonic()) * 1000))):
            raise AssertionError(f"{len(got)} of {count} replies, then silence")
        got.append(msgpack.unpackb(sock.recv()))
    return got


def test_a_daemon_whose_stderr_nobody_reads_keeps_answering(lora_dir):
    write_lora(lora_dir / "a.safetensors", {"w": torch.ones(16)})
    home = Path(tempfile.mkdtemp(prefix="lc-", dir="/tmp"))
    socket_path = home / "d.sock"
    shm = Path(tempfile.mkdtemp(prefix="lc-test-", dir="/dev/shm"))
    daemon = subprocess.Popen(
        [sys.executable, "-m", "loracache.client.cli", "serve", "--socket", str(socket_path),
         "--lora-dir", str(lora_dir), "--devices", "cpu", "--shm-dir", str(shm),
         "--log-level", "DEBUG", "--session-ttl", "300"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ))  # never read
    context = zmq.Context()
    try:
        wait_until(socket_path.exists, timeout=60)
        peers = [context.socket(zmq.DEALER) for _ in range(PEERS)]
        for sock in peers:
            sock.connect(f"ipc://{socket_path}")
        for i in range(BAD_REQUESTS):
            peers[i % PEERS].send(b"\xc1 not msgpack")
        bad = [reply for sock in peers for reply in replies(sock, BAD_REQUESTS // PEERS)]
        assert len(bad) == BAD_REQUESTS
        assert all(r["error"]["code"] == "BAD_REQUEST" for r in bad)
        hellos = peers[0]
        for i in range(SESSIONS):
            hellos.send(encode_request(i + 1, "", Hello(pid=os.getpid(), client=f"w{i}")))
        assert all(r["ok"] for r in replies(hellos, SESSIONS))
        with LoraCacheClient(socket_path, connect_timeout=10) as client:  # and serves on
            with client.acquire("a.safetensors") as lease:
                assert torch.equal(lease.tensors["w"], torch.ones(16))
            assert client.stats().errors["BAD_REQUEST"] == BAD_REQUESTS
        for sock in peers:
            sock.close(linger=0)
    finally:
        context.term()
        daemon.kill()
        daemon.wait()
        daemon.stdout.close()
        for leftover in sorted(shm.rglob("*"), reverse=True):
            leftover.rmdir() if leftover.is_dir() else leftover.unlink()
        shm.rmdir()
        for leftover in home.iterdir():
            leftover.unlink()
        home.rmdir()
