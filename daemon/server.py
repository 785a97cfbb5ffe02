"""The daemon process: the socket, the request loop and the lifecycle around the service.

``serve()`` = startup (devices, shm directory, socket bound, metrics, READY=1 to systemd), run
until SIGINT/SIGTERM asks to stop, shutdown (STOPPING=1; socket and shared-memory files
removed). SIGHUP reloads the configuration in place.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import inspect
import logging
import os
import signal
import socket
from pathlib import Path
from typing import Any, Callable, Coroutine

import zmq

from loracache.shared.device_names import selects
from loracache.shared.endpoints import endpoint
from loracache.shared.errors import BadRequest, ErrorCode, LoraCacheError
from loracache.shared.humanize import human_bytes
from loracache.shared.protocol import decode_request, encode_error, encode_reply
from loracache.shared.transport import Transport
from loracache.shared.transport.shm import ShmTransport

from .config import ConfigError, DaemonConfig, reloaded
from .logs import RateLimitedLog, set_level
from .notify import SystemdNotifier
from .service import CacheService
from .sessions import pid_alive

log = logging.getLogger("loracache.daemon")

SOCKET_DIR_MODE = 0o750
SOCKET_MODE = 0o660
ZMQ_MAX_MESSAGE = 16 << 20  # beyond this ZeroMQ drops the peer; smaller oversize gets BAD_REQUEST
STATUS_INTERVAL = 5.0  # seconds between STATUS= updates to systemd


def make_transports(config: DaemonConfig, shm_dir: Path) -> list[Transport]:
    """The transports for the configured devices (CUDA devices by index or UUID), and always
    the CPU's, first: it also holds the host tier's copies (served as a device only where
    the devices select ``cpu``)."""
    gpu_selectors = [s for s in config.devices if s not in ("all", "cpu")]
    transports: list[Transport] = []
    if gpu_selectors or "all" in config.devices:
        from loracache.shared.transport.cuda_ipc import CudaIpcTransport, visible_devices

        for index in visible_devices():
            try:
                transport = CudaIpcTransport(index)
            except LoraCacheError as exc:  # a GPU whose memory cannot be shared
                raise ConfigError(exc.message) from exc
            if any(selects(s, transport.device, index) for s in config.devices if s != "cpu"):
                transports.append(transport)
        unmatched = [s for s in gpu_selectors
                     if not any(selects(s, t.device, getattr(t, "index", None))
                                for t in transports)]
        if unmatched:
            why = (f"devices {unmatched} select no CUDA device this process sees (it sees "
                   f"{', '.join(t.device for t in transports) or 'none'}); check nvidia-smi -L "
                   "and CUDA_VISIBLE_DEVICES")
            if not transports and "cpu" not in config.devices and "all" not in config.devices:
                raise ConfigError(why)  # nothing left to serve
            log.warning("%s; serving the others", why)  # a fleet-wide list on a smaller host
        if not transports and os.path.exists("/dev/nvidiactl"):  # GPUs here, none usable
            log.warning("devices = all, but no CUDA device is usable although this host has "
                        "NVIDIA devices (is /dev/nvidia-uvm there? see systemd/README.md); "
                        "serving the CPU only")
    transports.insert(0, ShmTransport(shm_dir))  # last: a refused GPU leaves no directory behind
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
    try:
        path.parent.mkdir(mode=SOCKET_DIR_MODE, parents=True, exist_ok=True)
        if not path.exists():
            return
    except PermissionError:
        raise ConfigError(f"the socket {path}: this user may not create or enter "
                          f"{path.parent} (the system service's socket is its own); choose "
                          "another --socket, or run as the service's user") from None
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

    def __init__(self, config: DaemonConfig,
                 load_config: Callable[[], DaemonConfig] | None = None) -> None:
        """``load_config`` reads the configuration again (file, environment, flags) on SIGHUP."""
        self.config = config
        self._load_config = load_config or (lambda: config)
        self.notifier = SystemdNotifier()
        self.should_exit = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reload_failed = False
        self._error_log = RateLimitedLog(log)  # error replies, per client and code

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.should_exit.set)
        with contextlib.ExitStack() as cleanup:  # undone in reverse, also when startup fails
            shm_dir = instance_shm_dir(self.config.shm_dir)
            self.service = CacheService(self.config, make_transports(self.config, shm_dir))
            cleanup.callback(self.service.close)
            loop.add_signal_handler(signal.SIGHUP, self.reload)
            context = zmq.Context()
            cleanup.callback(context.term)
            # socket -> whether it serves admin ops (all of them unless there is an admin socket)
            sockets = {self._bind(context, cleanup, self.config.socket):
                       self.config.admin_socket is None}
            if self.config.admin_socket is not None:
                sockets[self._bind(context, cleanup, self.config.admin_socket,
                                   self.config.admin_group)] = True
            metrics = self._start_metrics(loop)
            if metrics is not None:
                cleanup.callback(metrics.close)
            cleanup.callback(self.notifier.close)
            for device in self.service.devices.values():
                cache = device.cache
                log.info("device %s: budget %s (%d bytes), cache size %d", device.name,
                         human_bytes(cache.budget), cache.budget, cache.cache_size)
            log.info("loracache daemon %s serving on %s (pid %d, configuration %s)",
                     self.service.instance, self.config.socket, os.getpid(),
                     self.config.file or "from flags and environment")
            for sock, admin in sockets.items():
                descriptor = int(sock.getsockopt(zmq.FD))
                loop.add_reader(descriptor, self._drain, sock, admin)
                cleanup.callback(loop.remove_reader, descriptor)
                self._drain(sock, admin)  # requests that arrived before the reader was added
            self._spawn(self._expire())
            self._spawn(self.service.preload(self.config.preload))
            if self.notifier.enabled:
                self._spawn(self._report_to_systemd())
            self.notifier.ready(self._status())
            try:
                await self.should_exit.wait()
            finally:
                log.info("shutting down")
                self.notifier.stopping()
                for task in self._tasks:
                    task.cancel()
                await asyncio.gather(*self._tasks, return_exceptions=True)
        log.info("stopped")

    @staticmethod
    def _bind(context: zmq.Context, cleanup: contextlib.ExitStack, path: Path,
              group: str | None = None) -> zmq.Socket:
        """A ROUTER socket on ``path``, mode 0660 (and owned by ``group`` if given)."""
        _claim_socket_path(path)
        sock = context.socket(zmq.ROUTER)
        cleanup.callback(sock.close, 0)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, ZMQ_MAX_MESSAGE)
        old_umask = os.umask(0o117)
        try:
            sock.bind(endpoint(path))
        finally:
            os.umask(old_umask)
        cleanup.callback(path.unlink, missing_ok=True)
        os.chmod(path, SOCKET_MODE)
        if group is not None:
            os.chown(path, -1, grp.getgrnam(group).gr_gid)
        return sock

    def reload(self) -> None:
        """SIGHUP: read the configuration again and apply it; a bad one keeps the old."""
        self.notifier.reloading()
        try:
            config, kept = reloaded(self.config, self._load_config())
        except ConfigError as exc:
            self._reload_failed = True
            log.error("reload failed, keeping the previous configuration: %s", exc)
            self.notifier.ready(self._status())
            return
        for name in kept:
            log.warning("%s changed in the configuration; it applies after a restart", name)
        self.config = config
        self._reload_failed = False
        set_level(config.log_level)
        self.service.reconfigure(config)
        self._spawn(self.service.preload(config.preload))
        log.info("configuration reloaded (%s)", config.file or "flags and environment")
        self.notifier.ready(self._status())

    def _status(self) -> str:
        suffix = "; last reload failed, see the log" if self._reload_failed else ""
        return self.service.summary() + suffix

    async def _report_to_systemd(self) -> None:
        """STATUS= every few seconds, and WATCHDOG=1 when systemd watches us: both are sent from
        this loop, so a loop that stops turning stops them and systemd restarts the daemon."""
        interval = min(STATUS_INTERVAL, self.notifier.watchdog_interval or STATUS_INTERVAL)
        while True:
            if self.notifier.watchdog_interval:
                self.notifier.watchdog(self._status())
            else:
                self.notifier.status(self._status())
            await asyncio.sleep(interval)

    def _start_metrics(self, loop: asyncio.AbstractEventLoop) -> Any:
        if self.config.metrics_addr is None:
            return None
        from .metrics import MetricsServer, loop_snapshot

        host, port = self.config.metrics_addr
        try:
            metrics = MetricsServer(host, port, loop_snapshot(loop, self.service.stats))
        except OSError as exc:
            raise ConfigError(f"metrics_addr = \"{host}:{port}\": cannot listen there "
                              f"({exc.strerror}); choose another address or port") from None
        self.service.metrics_address = metrics.address
        log.info("Prometheus metrics on http://%s/metrics", metrics.address)
        return metrics

    def _spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _drain(self, sock: zmq.Socket, admin: bool) -> None:
        # ZeroMQ's descriptor is edge-triggered: read until the socket says nothing is left.
        while not sock.closed and int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            frames = sock.recv_multipart(zmq.NOBLOCK)
            if len(frames) >= 2:
                self._answer(sock, admin, frames[:-1], frames[-1])

    def _answer(self, sock: zmq.Socket, admin: bool, route: list[bytes], payload: bytes) -> None:
        request_id, op = 0, "request"
        try:
            request = decode_request(payload)
            request_id, op = request.id, request.op
            outcome = self.service.handle(request, admin=admin)
            if inspect.isawaitable(outcome):
                self._spawn(self._finish(sock, admin, route, request_id, op, outcome))
                return
            reply = encode_reply(request_id, outcome)
        except Exception as exc:
            reply = self._error_reply(route[0], request_id, op, exc)
        self._send(sock, route, reply)

    async def _finish(self, sock: zmq.Socket, admin: bool, route: list[bytes], request_id: int,
                      op: str, outcome: Any) -> None:
        try:
            reply = encode_reply(request_id, await outcome)
        except Exception as exc:
            reply = self._error_reply(route[0], request_id, op, exc)
        self._send(sock, route, reply)
        # Sending may have consumed the descriptor's edge for requests queued meanwhile.
        asyncio.get_running_loop().call_soon(self._drain, sock, admin)

    @staticmethod
    def _send(sock: zmq.Socket, route: list[bytes], reply: bytes) -> None:
        # ROUTER never blocks: a reply to a client that is gone (or far behind) is dropped.
        sock.send_multipart([*route, reply], zmq.NOBLOCK)

    def _error_reply(self, peer: bytes, request_id: int, op: str, exc: Exception) -> bytes:
        if not isinstance(exc, LoraCacheError):
            log.error("%s %d failed with an internal error", op, request_id, exc_info=exc)
            exc = LoraCacheError(ErrorCode.INTERNAL,
                                 f"internal error ({type(exc).__name__}: {exc}); the daemon "
                                 "carries on, and its log has the details")
        else:
            if isinstance(exc, BadRequest):  # the id it could read, if the frame was not
                request_id = exc.request_id or request_id
            self._error_log.info((peer.hex(), exc.code.value), "%s %d failed: %s", op,
                                 request_id, exc)
        self.service.record_error(exc.code)
        return encode_error(request_id, exc)

    async def _expire(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.config.session_ttl / 4))
            try:
                self.service.expire_sessions()
                self.service.collect_memory()
                self._error_log.flush()
            except Exception:  # a bug here must not stop every later expiry
                log.exception("expiring sessions failed; retrying at the next tick")


def run(config: DaemonConfig, load_config: Callable[[], DaemonConfig] | None = None) -> None:
    """Run the daemon in this process until SIGINT or SIGTERM; SIGHUP calls ``load_config``."""
    asyncio.run(DaemonServer(config, load_config).serve())
