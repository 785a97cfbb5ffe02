"""A real ``loracache serve`` process started from Python: what `make demo`, the tests and the
benchmarks all run their daemon with.

:class:`DaemonProcess` starts the daemon with the flags given, returns once it answers a hello,
and stops it with a signal. :class:`PrivateDaemon` gives it a socket and a shared-memory
directory of its own (under /tmp and /dev/shm) and its log in a file, and removes all three in
:meth:`PrivateDaemon.cleanup`, so that many daemons run side by side without meeting.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from loracache.client import LoraCacheClient, LoraCacheError
from loracache.shared.protocol import StatsResult

CLI = [sys.executable, "-m", "loracache.client.cli"]


class DaemonProcess:
    """``loracache serve --socket SOCKET FLAGS``; later flags win over earlier ones.

    ``log``: an open file for its output (default: this process's stdout and stderr).
    ``env``: variables to set on top of this process's environment.
    """

    def __init__(self, socket: Path, *flags: str, log: IO[str] | None = None,
                 env: dict[str, str] | None = None, ready_timeout: float = 60.0) -> None:
        self.socket = socket
        self.proc = subprocess.Popen(
            [*CLI, "serve", "--socket", str(socket), *flags], stdout=log,
            stderr=subprocess.STDOUT if log else None, env={**os.environ, **(env or {})})
        try:
            self.wait_ready(ready_timeout)
        except BaseException:  # the caller never gets this object to stop it
            self.kill()
            raise

    def wait_ready(self, timeout: float) -> None:
        """Return once this daemon answers on the socket; RuntimeError if it exits or stays
        silent (another daemon answering there does not count)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited with {self.proc.returncode}"
                                   f"{self.describe()}")
            if self.socket.exists():
                try:
                    with LoraCacheClient(self.socket, heartbeat=False, session=False,
                                         connect_timeout=2) as client:
                        if client.stats().pid == self.proc.pid:
                            return
                except LoraCacheError:
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"the daemon did not answer on {self.socket} within {timeout} s"
                           f"{self.describe()}")

    def describe(self) -> str:
        """What to add to an error about this daemon (its log, where there is one)."""
        return ""

    def client(self, **kwargs: Any) -> LoraCacheClient:
        return LoraCacheClient(self.socket, **kwargs)

    def stats(self) -> StatsResult:
        with self.client(heartbeat=False) as client:
            return client.stats()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig`` and wait for the exit code (TimeoutExpired after ``timeout`` s)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self.stop()
        except subprocess.TimeoutExpired:
            pass  # killed below: what ran in the block is what counts
        finally:
            self.kill()


class PrivateDaemon(DaemonProcess):
    """A daemon with its own socket (under /tmp), shm directory (under /dev/shm) and log file.

    ``reuse``: take over the socket path and shm directory of an earlier daemon (a restart).
    Both directories are 0755, as /run and /dev/shm are: the daemon's own modes decide who gets
    in, as for workers of other users on a real host.
    """

    def __init__(self, *flags: str, reuse: PrivateDaemon | None = None,
                 env: dict[str, str] | None = None, ready_timeout: float = 60.0) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="lc-", dir="/tmp"))
        self.owns_shm_root = reuse is None  # else the first daemon's cleanup removes it
        self.shm_root = (reuse.shm_root if reuse
                         else Path(tempfile.mkdtemp(prefix="lc-", dir="/dev/shm")))
        for directory in (self.home, self.shm_root):
            directory.chmod(0o755)
        self.log_path = self.home / "daemon.log"
        self.log = open(self.log_path, "w")
        try:
            super().__init__(reuse.socket if reuse else self.home / "d.sock",
                             "--shm-dir", str(self.shm_root), *flags, log=self.log, env=env,
                             ready_timeout=ready_timeout)
        except BaseException:
            self.cleanup()
            raise

    def describe(self) -> str:
        return f":\n{self.read_log()[-5000:]}"

    def read_log(self) -> str:
        return self.log_path.read_text()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        code = super().stop(sig, timeout)
        self.log.close()
        return code

    def cleanup(self) -> None:
        """Kill the daemon if it still runs and remove its directories (the shm directory
        only if it made it)."""
        if hasattr(self, "proc"):
            self.kill()
        self.log.close()
        if self.owns_shm_root:
            shutil.rmtree(self.shm_root, ignore_errors=True)
        shutil.rmtree(self.home, ignore_errors=True)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            super().__exit__(kind, exc, tb)
        finally:
            self.cleanup()
