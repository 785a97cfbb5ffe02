"""The daemon process: the socket, the request loop and the lifecycle around the service.

``serve()`` = startup (devices, shm directory, socket bound and announced), run until a signal
asks to stop, shutdown (socket and shared-memory files removed). Signal handlers only set an
event.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import inspect
import logging
import os
import signal
import socket
from pathlib import Path
from typing import Any

import zmq

from loracache.shared.endpoints import endpoint
from loracache.shared.errors import ErrorCode, LoraCacheError
from loracache.shared.protocol import decode_request, encode_error, encode_reply
from loracache.shared.transport import Transport
from loracache.shared.transport.shm import ShmTransport

from .config import ConfigError, DaemonConfig
from .service import CacheService
from .sessions import pid_alive

log = logging.getLogger("loracache.daemon")

SOCKET_DIR_MODE = 0o750
SOCKET_MODE = 0o660
ZMQ_MAX_MESSAGE = 16 << 20  # beyond this ZeroMQ drops the peer; smaller oversize gets BAD_REQUEST


def make_transports(config: DaemonConfig, shm_dir: Path) -> list[Transport]:
    """The transports for the configured devices: ``cpu`` and/or CUDA devices by index or UUID."""
    wanted = set(config.devices)
    transports: list[Transport] = []
    if wanted & {"all", "cpu"}:
        transports.append(ShmTransport(shm_dir))
    cuda_wanted = {d for d in wanted if d.startswith("cuda") or d == "all"}
    if cuda_wanted:
        from loracache.shared.transport.cuda_ipc import CudaIpcTransport, visible_devices

        for index in visible_devices():
            transport = CudaIpcTransport(index)
            if cuda_wanted & {"all", "cuda", f"cuda:{index}", transport.device}:
                transports.append(transport)
        if not any(t.device != "cpu" for t in transports) and wanted - {"all", "cpu"}:
            raise ConfigError(f"devices {sorted(cuda_wanted)} asked for CUDA, but this process "
                              "sees no CUDA device")
    return transports


def instance_shm_dir(root: Path) -> Path:
    """A fresh directory for this daemon's files; removes those of daemons that are gone."""
    base = root / f"loracache-{os.getuid()}"
    base.mkdir(mode=SOCKET_DIR_MODE, exist_ok=True)
    for stale in base.iterdir():
        pid = stale.name.split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            for leftover in stale.glob("*"):
                leftover.unlink()
            stale.rmdir()
            log.info("removed stale shared-memory directory %s", stale)
    return base / f"{os.getpid()}-{os.urandom(4).hex()}"


def _claim_socket_path(path: Path) -> None:
    """Create the socket's directory; remove a stale socket, refuse a live one."""
    path.parent.mkdir(mode=SOCKET_DIR_MODE, parents=True, exist_ok=True)
    if not path.exists():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK):
            raise
        path.unlink(missing_ok=True)  # left by a daemon that died
    else:
        raise ConfigError(f"another daemon is already serving on {path}; stop it or choose "
                          "another --socket")
    finally:
        probe.close()


class DaemonServer:
    """The socket and the lifecycle around :class:`CacheService`.

    The ROUTER socket is a plain (blocking-API) ZeroMQ socket watched through its file
    descriptor: a readable event drains every queued request at once, and requests the service
    answers at once (every hit) are replied to in the same pass, without a task or a queue.
    Only requests that wait (loads, room in the cache) become tasks. All replies go through
    :meth:`_send`.
    """

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.should_exit = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.should_exit.set)
        _claim_socket_path(self.config.socket_path)
        shm_dir = instance_shm_dir(self.config.shm_root)
        self.service = CacheService(self.config, make_transports(self.config, shm_dir))
        context = zmq.Context()
        self._sock = sock = context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, ZMQ_MAX_MESSAGE)
        old_umask = os.umask(0o117)
        try:
            sock.bind(endpoint(self.config.socket_path))
        finally:
            os.umask(old_umask)
        os.chmod(self.config.socket_path, SOCKET_MODE)
        for cache in self.service.caches.values():
            log.info("device %s: budget %d bytes, cache size %d", cache.device, cache.budget,
                     cache.cache_size)
        log.info("loracache daemon %s serving on %s (pid %d)", self.service.instance,
                 self.config.socket_path, os.getpid())
        loop.add_reader(sock.getsockopt(zmq.FD), self._drain)
        self._drain()  # requests that arrived before the reader was registered
        expiry = asyncio.create_task(self._expire())
        try:
            await self.should_exit.wait()
        finally:
            log.info("shutting down")
            loop.remove_reader(sock.getsockopt(zmq.FD))
            for task in [expiry, *self._tasks]:
                task.cancel()
            await asyncio.gather(expiry, *self._tasks, return_exceptions=True)
            sock.close(linger=0)
            context.term()
            with contextlib.suppress(FileNotFoundError):
                self.config.socket_path.unlink()
            self.service.close()
            log.info("stopped")

    def _drain(self) -> None:
        # ZeroMQ's descriptor is edge-triggered: read until the socket says nothing is left.
        while self._sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            frames = self._sock.recv_multipart(zmq.NOBLOCK)
            if len(frames) >= 2:
                self._answer(frames[:-1], frames[-1])

    def _answer(self, route: list[bytes], payload: bytes) -> None:
        request_id = 0
        try:
            frame = decode_request(payload)
            request_id = frame.id
            outcome = self.service.handle(frame)
        except Exception as exc:
            self._send(route, self._error_reply(request_id, exc))
            return
        if inspect.isawaitable(outcome):
            task = asyncio.create_task(self._finish(route, request_id, outcome))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            self._send(route, encode_reply(request_id, outcome))

    async def _finish(self, route: list[bytes], request_id: int, outcome: Any) -> None:
        try:
            reply = encode_reply(request_id, await outcome)
        except Exception as exc:
            reply = self._error_reply(request_id, exc)
        self._send(route, reply)
        # Sending may have consumed the descriptor's edge for requests queued meanwhile.
        asyncio.get_running_loop().call_soon(self._drain)

    def _send(self, route: list[bytes], reply: bytes) -> None:
        # ROUTER never blocks: a reply to a client that is gone (or far behind) is dropped.
        self._sock.send_multipart([*route, reply], zmq.NOBLOCK)

    @staticmethod
    def _error_reply(request_id: int, exc: Exception) -> bytes:
        if isinstance(exc, LoraCacheError):
            request_id = getattr(exc, "request_id", request_id)
            log.debug("request %d failed: %s", request_id, exc)
            return encode_error(request_id, exc)
        log.error("request %d failed with an internal error", request_id, exc_info=exc)
        return encode_error(request_id, LoraCacheError(
            ErrorCode.INTERNAL, f"internal error ({type(exc).__name__}: {exc}); the daemon "
                                "carries on, and its log has the details"))

    async def _expire(self) -> None:
        interval = min(1.0, self.config.session_ttl / 4)
        while True:
            await asyncio.sleep(interval)
            self.service.expire_sessions()


def run(config: DaemonConfig) -> None:
    """Run the daemon in this process until SIGINT or SIGTERM."""
    asyncio.run(DaemonServer(config).serve())
