"""What the tests share: LoRA files, a real daemon process, and real client processes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import socketserver
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors.torch import save_file

from loracache.client import LoraCacheError
from loracache.shared.protocol import DeviceStats
from examples.daemon_process import PrivateDaemon

REPO = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "client_worker.py"
# ``python -c CLI_AS_USER UID:GID ARGS...``: the ``loracache`` command as another user; what it
# imports is imported first, as root (see become()).
CLI_AS_USER = """
import sys
import loracache.client.cli, loracache.client.doctor, loracache.client.lease, loracache.daemon.cli
import loracache.daemon.server
from tests.support import become
become(sys.argv[1])
sys.exit(loracache.client.cli.main(sys.argv[2:]))
"""


def write_lora(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def sized_lora(path: Path, nbytes: int, seed: int = 0) -> Path:
    """A rank-16 fp16 LoRA of about ``nbytes`` (pairs of down/up matrices)."""
    generator = torch.Generator().manual_seed(seed)
    tensors, total, i = {}, 0, 0
    width = 1280
    while total < nbytes:
        tensors[f"layer{i}.lora_down.weight"] = torch.randn(16, width, generator=generator).half()
        tensors[f"layer{i}.lora_up.weight"] = torch.randn(width, 16, generator=generator).half()
        total += 2 * 16 * width * 2
        i += 1
    return write_lora(path, tensors)


@contextlib.contextmanager
def serving(server: socketserver.BaseServer,
            unblock: Callable[[], None] = lambda: None) -> Iterator[None]:
    """Run ``server`` on a thread of its own for the block; at its end ``unblock`` first lets
    go of handlers that wait on purpose, so that shutting down does not wait for them."""
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield
    finally:
        unblock()
        server.shutdown()
        server.server_close()
        thread.join()


def wait_until(condition: Callable[[], Any], timeout: float = 15.0,
               interval: float = 0.05) -> None:
    """Poll ``condition`` until it is true; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout} s")
        time.sleep(interval)


def digest(t: torch.Tensor) -> str:
    """A hash of a tensor's dtype, shape and bytes (works for bf16, which numpy lacks)."""
    t = t.detach().cpu().contiguous()
    raw = t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode() + raw).hexdigest()


class Daemon(PrivateDaemon):
    """A real daemon for a test: CPU device, DEBUG log, LoRAs from ``lora_dir``.

    ``reuse``: take over the socket path and shm directory of an earlier daemon.
    ``config``: a configuration file, which then names the LoRA directories itself.
    """

    def __init__(self, lora_dir: Path, *args: str, env: dict[str, str] | None = None,
                 reuse: Daemon | None = None, config: Path | None = None) -> None:
        self.lora_dir = lora_dir
        where = ["--config", str(config)] if config else ["--lora-dir", str(lora_dir)]
        # Later flags win: a test may pass its own --devices.
        super().__init__(*where, "--devices", "cpu", "--log-level", "DEBUG", *args,
                         reuse=reuse, env=env)

    def cpu_stats(self) -> DeviceStats:
        return self.stats().device("cpu")

    def shm_files(self) -> list[Path]:
        return sorted(self.shm_root.rglob("*.bin"))

    def wait_for_log(self, text: str, count: int = 1, timeout: float = 10.0) -> None:
        """Wait until ``text`` has been logged ``count`` times (a thread writes the log)."""
        try:
            wait_until(lambda: self.read_log().count(text) >= count, timeout=timeout)
        except AssertionError:
            raise AssertionError(f"{text!r} not logged {count} time(s) in {timeout} s:\n"
                                 f"{self.read_log()[-3000:]}") from None


def become(spec: str) -> None:
    """Go on as ``user:group`` (ids). The interpreter may live where only root can read it
    (/root/.pyenv here), so callers import what they need first, as root; from here on the
    daemon's socket, shared-memory files and counter files see another user."""
    import loracache.shared.transport.cuda_ipc  # noqa: F401  (imported lazily otherwise)
    import loracache.shared.transport.shm  # noqa: F401

    if torch.cuda.is_available():
        torch.cuda.init()  # loads the driver's libraries, wherever they are
    uid, gid = (int(part) for part in spec.split(":"))
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)


class Worker:
    """A separate Python process driving a LoraCacheClient, one JSON command per line."""

    def __init__(self, socket: Path | None = None, *, user: int | None = None,
                 group: int = 0, private_shm: bool = False, **env: str) -> None:
        """``user``: run as that user id, in group ``group`` only (the tests run as root), as
        a worker of another account on the daemon's host does. ``private_shm``: with a /dev/shm
        of its own (a mount namespace), as a container that does not share the host's."""
        if user is not None:
            env = {**env, "LORACACHE_TEST_BECOME": f"{user}:{group}", "HOME": "/tmp"}
        command = [sys.executable, str(WORKER)]
        if private_shm:
            command = ["unshare", "--mount", "sh", "-c",
                       'mount -t tmpfs tmpfs /dev/shm && exec "$0" "$@"', *command]
        self.proc = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(REPO), **env})
        if socket is not None:
            self.call("connect", socket=str(socket))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, op: str, **args: Any) -> None:
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()

    def receive(self) -> Any:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker died: {self.proc.stderr.read()}")
        reply = json.loads(line)
        if "error" in reply:
            raise LoraCacheError(reply["error"]["code"], reply["error"]["message"])
        return reply["result"]

    def call(self, op: str, **args: Any) -> Any:
        self.send(op, **args)
        return self.receive()

    def kill(self) -> None:
        """SIGKILL, as the OOM killer or a crash would: the client gets no chance to clean up."""
        self.proc.kill()
        self.proc.wait()
        self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call("exit")
            except (RuntimeError, BrokenPipeError):
                pass
            self.proc.wait(30)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            stream.close()
