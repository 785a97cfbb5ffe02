"""The connection to the daemon: sockets, round trips, hello, heartbeat, liveness and session
recovery. It never imports torch (the CLI uses it alone).

Each thread talks over its own DEALER socket (ZeroMQ sockets must not be shared between
threads), all under one session; a background thread heartbeats so the session outlives idle
periods. Requests never hold a lock while waiting, so a thread blocked in a request (waiting for
cache space) never stops another from releasing.

When the daemon dies, waiting requests fail within about a second with DAEMON_UNAVAILABLE (the
socket stops accepting connections). When a daemon is back (or the session expired), the first
request that meets UNKNOWN_SESSION opens a new session, lets ``on_recover`` lease again what the
client holds, and sends the request once more.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

import zmq

from loracache.shared.endpoints import default_socket_path, endpoint
from loracache.shared.errors import ErrorCode, LoraCacheError
from loracache.shared.ipc_compat import torch_release
from loracache.shared.protocol import (
    Bye,
    Heartbeat,
    Hello,
    HelloResult,
    Release,
    Request,
    decode_reply,
    decode_result,
    encode_request,
)

from .socket_access import unreachable

log = logging.getLogger("loracache.client")

DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_REQUEST_TIMEOUT = 120.0  # above the daemon's default acquire_timeout plus a big load
BYE_TIMEOUT = 1.0  # closing must not hang on a daemon that is gone
RELEASE_TIMEOUT = 5.0  # a release is bookkeeping only: never wait on it as long as on a load
PROBE_INTERVAL = 1.0  # seconds without a reply before checking that the daemon still listens
SUSPECT_PROBE = 0.05  # the same, once a probe has found the daemon gone


class Connection:
    """Sockets to the daemon at ``socket_path`` under one session (``session=False``: none).

    ``on_recover(old_instance)`` runs after a new session was opened, with the recovering
    thread holding the recovery lock: the lease book leases its files again there.
    """

    def __init__(self, socket_path: str | Path | None, *, connect_timeout: float,
                 request_timeout: float, heartbeat: bool, session: bool) -> None:
        try:
            self.socket_path = Path(socket_path) if socket_path else default_socket_path()
        except ValueError as exc:
            raise LoraCacheError(ErrorCode.DAEMON_UNAVAILABLE,
                                 f"cannot tell where the daemon listens: {exc}; fix the file or "
                                 "set LORACACHE_SOCKET") from None
        try:
            self._endpoint = endpoint(self.socket_path)
        except ValueError as exc:
            raise LoraCacheError(ErrorCode.BAD_SOCKET_PATH, str(exc)) from None
        self.request_timeout = request_timeout
        self.wants_session = session
        self.on_recover: Callable[[str], None] = lambda old_instance: None
        self.pid = os.getpid()
        self._context = zmq.Context()
        self._local = threading.local()
        self._sockets: list[zmq.Socket] = []
        self.lock = threading.RLock()  # guards the sockets and the session's fields
        self._ids = itertools.count(1)
        self.instance = self.session = self.daemon_torch = ""  # set by hello
        self.session_ttl = 0.0
        self.devices: list[str] = []
        self._closed = threading.Event()
        self._abandoned = False  # set by abandon(): the heartbeat thread ends the connection
        self._bye_when_abandoned = False  # ... and says Bye first
        self._recovering = threading.Lock()
        self._down_reported = False  # log one warning per outage, not one per heartbeat
        self._suspect_down = False  # the last probe found no daemon: probe again at once
        try:
            self.hello(connect_timeout)
        except BaseException:
            self._close_sockets()
            raise
        self._heartbeat = None
        if heartbeat and session:
            self._heartbeat = threading.Thread(target=self._heartbeat_loop, daemon=True,
                                               name="loracache-heartbeat")
            self._heartbeat.start()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    @property
    def answered_by(self) -> str:
        """The daemon instance that answered this thread's last request."""
        return self._local.instance

    def hello(self, timeout: float) -> None:
        if (problem := unreachable(self.socket_path)) is not None:
            raise self.unavailable(problem.why, problem.fix)
        hello: HelloResult = self.request(
            Hello(pid=os.getpid(), client="loracache.client", open_session=self.wants_session,
                  torch=torch_release()), timeout=timeout, session="")
        with self.lock:
            self.instance, self.session = hello.instance, hello.session
            self.session_ttl, self.devices = hello.session_ttl, hello.devices
            self.daemon_torch = hello.torch

    def request(self, request: Request, *, timeout: float | None = None,
                session: str | None = None, recover: bool = True) -> Any:
        """Send ``request`` and return its result. With ``recover``, a reply of UNKNOWN_SESSION
        (the daemon restarted, or forgot this silent client) renews the session and the leases
        held, then sends the request once more."""
        if os.getpid() != self.pid:
            raise LoraCacheError(ErrorCode.CLIENT_CLOSED,
                                 f"this LoraCacheClient was created in process {self.pid}; "
                                 "create a new one in each process after fork()")
        if self._closed.is_set():
            raise LoraCacheError(ErrorCode.CLIENT_CLOSED, "this LoraCacheClient is closed; "
                                 "make a new one")
        with self.lock:
            sent_session, instance = self.session if session is None else session, self.instance
        try:
            result = self.round_trip(request, sent_session, timeout)
        except LoraCacheError as exc:
            if not (recover and session is None and exc.code is ErrorCode.UNKNOWN_SESSION):
                raise
            self._recover(sent_session)
            with self.lock:
                sent_session, instance = self.session, self.instance
            result = self.round_trip(request, sent_session, timeout)
        self._local.instance = instance  # who answered, for acquire to tag its lease
        return result

    def round_trip(self, request: Request, session: str, timeout: float | None) -> Any:
        """One request and its reply on this thread's socket, with no recovery."""
        timeout = self.request_timeout if timeout is None else timeout
        request_id = next(self._ids)
        try:
            sock = self._socket()
            sock.send(encode_request(request_id, session, request))
        except zmq.ZMQError:
            if not self._closed.is_set():
                raise
            raise LoraCacheError(ErrorCode.CLIENT_CLOSED,
                                 "this LoraCacheClient was closed meanwhile") from None
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._drop_socket()  # a late reply must not be read as the next one's
                if isinstance(request, Hello):
                    raise self.unavailable(f"nobody answered within {timeout:g} s")
                raise LoraCacheError(
                    ErrorCode.TIMEOUT,
                    f"the daemon on {self.socket_path} did not answer {request.op} within "
                    f"{timeout:g} s; raise request_timeout if loads are this slow, or check the "
                    "daemon's log")
            # Probe soon when the daemon was found gone lately, else after a quiet second.
            wait = min(remaining, SUSPECT_PROBE if self._suspect_down else PROBE_INTERVAL)
            try:
                raw = sock.recv() if sock.poll(int(wait * 1000) + 1) else None
            except zmq.ZMQError:  # close() from another thread closed this socket
                raise LoraCacheError(ErrorCode.CLIENT_CLOSED,
                                     "this LoraCacheClient was closed while waiting") from None
            if raw is None:
                if not self._daemon_listening():
                    self._suspect_down = True
                    self._drop_socket()  # the request must not reach a daemon started later
                    raise self.unavailable("the socket accepts no connections (the daemon "
                                           "stopped)")
                continue
            self._suspect_down = False
            reply_id, result = decode_reply(raw)
            if reply_id not in (request_id, 0):
                continue  # a late reply to an earlier request of this thread
            # Id 0: the daemon could not read the request's id (e.g. a field over the size
            # limits); with one request in flight per socket, the reply is this request's.
            if isinstance(result, LoraCacheError):
                raise result
            return decode_result(result, request.result_type)

    def give_back(self, lease_id: str, opened: bool = True) -> None:
        """Release a lease the client never handed out (best effort: the daemon expires the
        session's leases anyway). ``opened=False``: the client did not map its handle."""
        try:
            self.round_trip(Release(lease=lease_id, opened=opened), self.session,
                            RELEASE_TIMEOUT)
        except (LoraCacheError, zmq.ZMQError) as exc:  # ZMQError: closed meanwhile
            log.debug("giving back lease %s failed: %s", lease_id, exc)

    def close(self) -> None:
        """End the session (Bye), stop heartbeating and close the sockets. Idempotent; in a
        forked child it only lets go of the sockets."""
        if self._closed.is_set():
            return
        self._closed.set()  # first: a heartbeat must not renew the session being ended
        if self._heartbeat is not None and self._heartbeat is not threading.current_thread():
            self._heartbeat.join()
        if os.getpid() == self.pid:
            self._bye()
        self._close_sockets()

    def abandon(self, bye: bool) -> None:
        """End the connection of a client that nothing holds, from whatever thread collected
        it: with a heartbeat thread, only tell it to end (it says Bye if ``bye`` and closes
        the sockets itself), since this thread may be it, holding the lock, mid-request."""
        if self._closed.is_set() or os.getpid() != self.pid:
            return
        if self._heartbeat is None:  # no thread of ours uses the sockets any more
            self._closed.set()
            if bye:
                self._bye()
            self._close_sockets()
            return
        self._abandoned, self._bye_when_abandoned = True, bye
        self._closed.set()  # wakes the heartbeat thread, which finishes the job

    def unavailable(self, why: str, fix: str | None = None) -> LoraCacheError:
        return LoraCacheError(
            ErrorCode.DAEMON_UNAVAILABLE,
            f"no loracache daemon at {self.socket_path}: {why}. " + (
                f"To use it: {fix}." if fix else
                "Is it running (`loracache serve`, or `systemctl status loracache`), and may "
                "this user open the socket (group loracache)? Point LORACACHE_SOCKET or "
                "socket_path at the right socket."))

    # ------------------------------------------------------------------------------ internals

    def _recover(self, stale_session: str) -> None:
        """Open a new session and let ``on_recover`` lease again what the client holds (once
        per outage, whichever thread meets UNKNOWN_SESSION first)."""
        with self._recovering:
            if self.session != stale_session:
                return  # another thread has recovered already
            old_instance = self.instance
            self.hello(self.request_timeout)
            self.on_recover(old_instance)

    def _daemon_listening(self) -> bool:
        """Whether a process accepts connections on the socket (cheap: one connect())."""
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(0.5)  # a stopped daemon's full backlog must not block the probe
        try:
            probe.connect(str(self.socket_path))
        except TimeoutError:
            return True  # there, but not accepting yet: busy or stopped, not gone
        except OSError as exc:
            return exc.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK)
        finally:
            probe.close()
        return True

    def _socket(self) -> zmq.Socket:
        sock = getattr(self._local, "socket", None)
        if sock is None:
            sock = self._context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self._endpoint)
            self._local.socket = sock
            with self.lock:
                self._sockets.append(sock)
        return sock

    def _drop_socket(self) -> None:
        sock = self._local.__dict__.pop("socket", None)
        if sock is not None:
            with self.lock:
                if sock in self._sockets:  # not when the sockets were all closed already
                    self._sockets.remove(sock)
            sock.close(linger=0)

    def _close_sockets(self) -> None:
        with self.lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            sock.close(linger=0)
        self._context.term()

    def _heartbeat_loop(self) -> None:
        while not self._closed.wait(max(0.05, self.session_ttl / 3)):
            try:
                self.request(Heartbeat(), timeout=max(0.05, self.session_ttl / 3))
            except Exception as exc:  # the heartbeat must outlive any one failure
                if self._closed.is_set():
                    break
                level = logging.DEBUG if self._down_reported else logging.WARNING
                log.log(level, "heartbeat to %s failed: %s", self.socket_path, exc)
                self._down_reported = True
            else:
                self._down_reported = False
        if self._abandoned:  # abandon() left the ending to this thread
            if self._bye_when_abandoned:
                self._bye()
            self._close_sockets()
        else:
            self._drop_socket()

    def _bye(self) -> None:
        """Tell the daemon the session is over (best effort: else it lapses by its TTL). The
        connection is marked closed already, so no heartbeat renews the session meanwhile."""
        if not self.session:
            return
        try:
            self.round_trip(Bye(), self.session, BYE_TIMEOUT)
        except LoraCacheError as exc:
            log.debug("ending the session failed: %s", exc)
