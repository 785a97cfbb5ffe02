"""The synchronous, thread-safe client of the loracache daemon.

Each thread talks over its own DEALER socket (ZeroMQ sockets must not be shared between
threads), all under one session; a background thread heartbeats so the session outlives idle
periods. Requests never hold a lock while waiting, so a thread blocked in ``acquire`` (waiting
for cache space) never stops another from releasing.

When the daemon dies, waiting requests fail within about a second with DAEMON_UNAVAILABLE (the
socket stops accepting connections). When a daemon is back (or the session expired), the first
request that meets UNKNOWN_SESSION opens a new session and leases every file this client still
holds again, checking that it is the same file, so fused weights can still be unfused exactly.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq

from loracache.shared.endpoints import default_socket_path, endpoint
from loracache.shared.errors import ErrorCode, LoraCacheError
from loracache.shared.ipc_compat import torch_release
from loracache.shared.protocol import (
    Acquire,
    AcquireResult,
    Bye,
    Clear,
    Evict,
    Heartbeat,
    Hello,
    HelloResult,
    ListEntries,
    Preload,
    Probe,
    Release,
    Request,
    Stats,
    TensorSpec,
    decode_reply,
    from_map,
    encode_request,
)

if TYPE_CHECKING:
    from types import TracebackType

    import torch

    from .lease import Lease

log = logging.getLogger("loracache.client")

DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_REQUEST_TIMEOUT = 120.0  # above the daemon's default acquire_timeout plus a big load
BYE_TIMEOUT = 1.0  # closing must not hang on a daemon that is gone
RELEASE_TIMEOUT = 5.0  # a release is bookkeeping only: never wait on it as long as on a load
TABLE_CACHE_SIZE = 256  # tensor tables kept per client, so hits need not carry them
PROBE_INTERVAL = 1.0  # seconds without a reply before checking that the daemon still listens
SUSPECT_PROBE = 0.05  # the same, once a probe has found the daemon gone
VERIFY_TIMEOUT = 30.0  # a busy host may be slow to answer; a dead daemon is found in PROBE_INTERVAL


class LoraCacheClient:
    """A connection to the daemon at ``socket_path`` (default: ``$LORACACHE_SOCKET``, then the
    ``socket`` of the configuration file, then the system socket, then the per-user one).

    Raises LoraCacheError(DAEMON_UNAVAILABLE) when no daemon answers within ``connect_timeout``.
    Use it as a context manager, or call :meth:`close`: that releases the leases still held.
    """

    def __init__(self, socket_path: str | Path | None = None, *,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
                 heartbeat: bool = True, session: bool = True) -> None:
        """``session=False``: only look and administer (stats, list, preload, evict, clear):
        no session is opened, so no leases, and the daemon does not count this client."""
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
        self._pid = os.getpid()
        self._context = zmq.Context()
        self._local = threading.local()
        self._sockets: list[zmq.Socket] = []
        self._lock = threading.Lock()  # guards _sockets, _leases, _tables and the session
        self._ids = itertools.count(1)
        self._leases: set[Lease] = set()
        self._tables: OrderedDict[tuple[str, str], list[TensorSpec]] = OrderedDict()
        self._hints: dict[tuple[str, str, str], str] = {}  # (path, device, layout) -> entry id
        self.instance = self.session = self.daemon_torch = ""  # set by hello
        self.unmappable: set[str] = set()  # devices whose memory this process failed to map
        self._wants_session = session
        self._closed = threading.Event()
        self._recovering = threading.Lock()
        self._down_reported = False  # log one warning per outage, not one per heartbeat
        self._suspect_down = False  # the last probe found no daemon: probe again at once
        try:
            self._hello(connect_timeout)
        except BaseException:
            self._close_sockets()
            raise
        self._heartbeat = None
        if heartbeat and session:
            self._heartbeat = threading.Thread(target=self._heartbeat_loop, daemon=True,
                                               name="loracache-heartbeat")
            self._heartbeat.start()

    # ---------------------------------------------------------------------------- public API

    def acquire(self, path: str | os.PathLike[str], device: str | torch.device = "cpu",
                layout: str = "raw") -> Lease:
        """Lease the LoRA file at ``path`` (absolute, or relative to a daemon LoRA directory)
        on ``device``, loading it into the daemon's cache on a miss. The lease's ``tensors``
        are zero-copy views of the shared copy."""
        self._require_session()
        path, device = os.fspath(path), device_name(device)
        while True:
            known = self._known_entry(path, device, layout)
            result = AcquireResult.from_wire(self._request(
                Acquire(path=path, device=device, layout=layout, known_entry=known)))
            instance = self._local.instance  # of the daemon that answered, even if restarted
            key = (instance, result.entry.id)
            with self._lock:
                if result.tensors is not None:
                    self._tables[key] = result.tensors
                    self._hints[(path, device, layout)] = result.entry.id
                table = self._tables.get(key)
                if table is not None:
                    self._tables.move_to_end(key)
                    while len(self._tables) > TABLE_CACHE_SIZE:
                        self._tables.popitem(last=False)
                    break
                # The table was dropped between asking and the reply: ask again, with no hint.
                self._hints.pop((path, device, layout), None)
            self._give_back(result.lease, opened=False)
        from .lease import Lease  # torch loads with the first lease, not with the CLI

        tensors = self._attach(instance, result, table)
        lease = Lease(result.lease, result.entry, tensors, self._release, instance=instance,
                      request=(path, device, layout))
        with self._lock:
            self._leases.add(lease)
        return lease

    def probe(self, device: str | torch.device = "cpu") -> Lease:
        """Lease a small test buffer on ``device`` (no LoRA file needed): its one tensor,
        ``probe``, holds :func:`loracache.shared.transport.probe_pattern` when this process maps
        the daemon's memory correctly. What ``loracache doctor`` checks with."""
        from .lease import Lease

        self._require_session()
        result = AcquireResult.from_wire(self._request(Probe(device=device_name(device))))
        instance = self._local.instance
        tensors = self._attach(instance, result, result.tensors or [])
        lease = Lease(result.lease, result.entry, tensors, self._release, instance=instance,
                      request=("", result.entry.device, "raw"))
        with self._lock:
            self._leases.add(lease)
        return lease

    def stats(self) -> dict[str, Any]:
        """The daemon's counters: per device budget, used bytes, entries, leases, hits, ..."""
        return self._request(Stats())

    def list(self) -> list[dict[str, Any]]:
        """Every cached entry: path, device, layout, size, leases, pinned, idle seconds."""
        return self._request(ListEntries())["entries"]

    def preload(self, path: str | os.PathLike[str], device: str | torch.device = "cpu",
                layout: str = "raw", pin: bool = False) -> dict[str, Any]:
        """Load an entry without leasing it; ``pin`` keeps it from eviction until evicted."""
        return self._request(Preload(path=os.fspath(path), device=device_name(device),
                                     layout=layout, pin=pin))

    def evict(self, path: str | os.PathLike[str], device: str = "") -> dict[str, int]:
        """Evict the unleased entries of ``path``; returns counts ``evicted`` and ``busy``."""
        return self._request(Evict(path=os.fspath(path), device=device_name(device) if device
                                   else ""))

    def clear(self, device: str = "") -> dict[str, int]:
        """Evict every unleased entry, pinned ones included."""
        return self._request(Clear(device=device_name(device) if device else ""))

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def verify_session(self) -> bool:
        """Check that the daemon still knows this session; if it restarted, renew the session
        and the leases now (not at the next heartbeat). False when no daemon answers."""
        try:
            self._request(Heartbeat(), timeout=VERIFY_TIMEOUT)
        except LoraCacheError as exc:
            if exc.code not in (ErrorCode.DAEMON_UNAVAILABLE, ErrorCode.TIMEOUT):
                raise
            log.warning("the loracache daemon on %s does not answer: %s", self.socket_path, exc)
            return False
        return True

    def close(self) -> None:
        """Release the leases still held, stop heartbeating and close the sockets."""
        if self._closed.is_set():
            return
        if os.getpid() == self._pid:
            with self._lock:
                leases = list(self._leases)
            for lease in leases:
                try:
                    lease.release()
                except LoraCacheError as exc:
                    log.debug("releasing %s at close failed: %s", lease, exc)
            try:
                if self.session:
                    self._request(Bye(), timeout=BYE_TIMEOUT, recover=False)
            except LoraCacheError as exc:  # the daemon expires the session after its TTL
                log.debug("ending the session at close failed: %s", exc)
        self._closed.set()
        if self._heartbeat is not None and self._heartbeat is not threading.current_thread():
            self._heartbeat.join()
        self._close_sockets()

    def __enter__(self) -> "LoraCacheClient":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: "TracebackType | None") -> None:
        self.close()

    # ------------------------------------------------------------------------------ internals

    def _hello(self, timeout: float) -> None:
        if not self.socket_path.exists():
            raise self._unavailable(f"the socket {self.socket_path} does not exist")
        reply = self._request(Hello(pid=os.getpid(), client="loracache.client",
                                    open_session=self._wants_session, torch=torch_release()),
                              timeout=timeout, session="")
        hello = from_map(HelloResult, reply)
        with self._lock:
            self.instance, self.session = hello.instance, hello.session
            self.session_ttl, self.devices = hello.session_ttl, hello.devices
            self.daemon_torch = hello.torch

    def _require_session(self) -> None:
        if not self._wants_session:
            raise ValueError("this client was made with session=False, which cannot hold "
                             "leases; make it with session=True (the default)")

    def _known_entry(self, path: str, device: str, layout: str) -> str:
        with self._lock:
            entry_id = self._hints.get((path, device, layout), "")
            return entry_id if (self.instance, entry_id) in self._tables else ""

    def _release(self, lease: Lease) -> None:
        with self._lock:
            self._leases.discard(lease)
            current = lease.instance == self.instance and not lease.orphaned
        from .lease import MAPPINGS

        MAPPINGS.detach(lease.instance, lease.entry.id)
        if not current:
            return  # lent by a daemon (or a session) that is gone: nothing to give back
        try:
            self._request(Release(lease=lease.id), timeout=RELEASE_TIMEOUT, recover=False)
        except LoraCacheError as exc:
            if exc.code in (ErrorCode.UNKNOWN_SESSION, ErrorCode.UNKNOWN_LEASE):
                return  # the session expired: the daemon already took the lease back
            if exc.code in (ErrorCode.TIMEOUT, ErrorCode.DAEMON_UNAVAILABLE):
                # The daemon is gone or stuck; it releases the lease itself once this session
                # has been silent for its TTL, so a worker need not fail a request over it.
                log.warning("releasing %s: %s", lease, exc)
                return
            raise

    def _request(self, request: Request, *, timeout: float | None = None,
                 session: str | None = None, recover: bool = True) -> Any:
        """Send ``request`` and return its result. With ``recover``, a reply of UNKNOWN_SESSION
        (the daemon restarted, or forgot this silent client) renews the session and the leases
        held, then sends the request once more."""
        if os.getpid() != self._pid:
            raise LoraCacheError(ErrorCode.CLIENT_CLOSED,
                                 f"this LoraCacheClient was created in process {self._pid}; "
                                 "create a new one in each process after fork()")
        if self._closed.is_set():
            raise LoraCacheError(ErrorCode.CLIENT_CLOSED, "this LoraCacheClient is closed; "
                                 "make a new one")
        with self._lock:
            sent_session, instance = self.session if session is None else session, self.instance
        try:
            result = self._round_trip(request, sent_session, timeout)
        except LoraCacheError as exc:
            if not (recover and session is None and exc.code is ErrorCode.UNKNOWN_SESSION):
                raise
            self._recover(sent_session)
            with self._lock:
                sent_session, instance = self.session, self.instance
            result = self._round_trip(request, sent_session, timeout)
        self._local.instance = instance  # who answered, for acquire to tag its lease
        return result

    def _round_trip(self, request: Request, session: str, timeout: float | None) -> Any:
        timeout = self.request_timeout if timeout is None else timeout
        sock = self._socket()
        request_id = next(self._ids)
        sock.send(encode_request(request_id, session, request))
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._drop_socket()  # a late reply must not be read as the next one's
                if isinstance(request, Hello):
                    raise self._unavailable(f"nobody answered within {timeout:g} s")
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
                    raise self._unavailable("the socket accepts no connections (the daemon "
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
            return result

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

    def _recover(self, stale_session: str) -> None:
        """Open a new session and lease again every file this client holds (once per outage,
        whichever thread meets UNKNOWN_SESSION first)."""
        with self._recovering:
            if self.session != stale_session:
                return  # another thread has recovered already
            old_instance = self.instance
            self._hello(self.request_timeout)
            with self._lock:
                leases = list(self._leases)
            if self.instance != old_instance:
                log.warning("the loracache daemon on %s restarted (instance %s, was %s); "
                            "leasing %d file(s) again", self.socket_path, self.instance,
                            old_instance, len(leases))
            for lease in leases:
                try:
                    self._renew(lease)
                except Exception:  # one lease must not keep the others from renewing
                    log.exception("renewing %s failed; keeping its old mapping", lease)
                    lease.orphan()

    def _renew(self, lease: Lease) -> None:
        """Lease ``lease``'s file again under the new session, if it is still the same file;
        otherwise keep the old mapping and let the lease end locally (``orphan``)."""
        from .lease import MAPPINGS

        if lease.released:
            return
        path, device, layout = lease.request
        try:
            result = AcquireResult.from_wire(self._round_trip(
                Acquire(path=path, device=device, layout=layout), self.session, None))
        except LoraCacheError as exc:
            log.warning("could not lease %s again from the daemon: %s; keeping the old "
                        "mapping", path, exc)
            lease.orphan()
            return
        if result.entry.file != lease.entry.file:
            log.warning("%s changed on disk (%s, was %s); keeping the copy leased before, so "
                        "unfusing stays exact", path, result.entry.file, lease.entry.file)
            lease.orphan()
            self._give_back(result.lease, opened=False)
            return
        table = result.tensors or []  # asked without a known entry: the table is there
        with self._lock:
            self._tables[(self.instance, result.entry.id)] = table
        tensors = self._attach(self.instance, result, table)
        old = lease.renewed(result.lease, result.entry, tensors, self.instance)
        if old is None:  # released while this renewal was under way
            MAPPINGS.detach(self.instance, result.entry.id)
            self._give_back(result.lease)
        else:
            MAPPINGS.detach(*old)

    def _attach(self, instance: str, result: AcquireResult,
                table: Sequence[TensorSpec]) -> Mapping[str, torch.Tensor]:
        """Map the entry of ``result`` (once per process) and return its views. A handle this
        process cannot open goes back to the daemon, which undoes its export."""
        from .lease import MAPPINGS

        try:
            return MAPPINGS.attach(instance, result, table)
        except LoraCacheError as exc:  # refused before anything was mapped
            if exc.code is ErrorCode.MAPPING_FAILED:
                with self._lock:
                    self.unmappable.add(result.entry.device)
            self._give_back(result.lease, opened=False)
            raise
        except BaseException:  # whether torch mapped it is unknown: never release a slot twice
            self._give_back(result.lease)
            raise

    def _give_back(self, lease_id: str, opened: bool = True) -> None:
        try:
            self._round_trip(Release(lease=lease_id, opened=opened), self.session,
                             RELEASE_TIMEOUT)
        except LoraCacheError as exc:  # the daemon expires the session's leases anyway
            log.debug("giving back lease %s failed: %s", lease_id, exc)

    def _socket(self) -> zmq.Socket:
        sock = getattr(self._local, "socket", None)
        if sock is None:
            sock = self._context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self._endpoint)
            self._local.socket = sock
            with self._lock:
                self._sockets.append(sock)
        return sock

    def _drop_socket(self) -> None:
        sock = self._local.__dict__.pop("socket", None)
        if sock is not None:
            with self._lock:
                self._sockets.remove(sock)
            sock.close(linger=0)

    def _close_sockets(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            sock.close(linger=0)
        self._context.term()

    def _heartbeat_loop(self) -> None:
        while not self._closed.wait(max(0.05, self.session_ttl / 3)):
            try:
                self._request(Heartbeat(), timeout=max(0.05, self.session_ttl / 3))
            except Exception as exc:  # the heartbeat must outlive any one failure
                if self._closed.is_set():
                    break
                level = logging.DEBUG if self._down_reported else logging.WARNING
                log.log(level, "heartbeat to %s failed: %s", self.socket_path, exc)
                self._down_reported = True
            else:
                self._down_reported = False
        self._drop_socket()

    def _unavailable(self, why: str) -> LoraCacheError:
        return LoraCacheError(
            ErrorCode.DAEMON_UNAVAILABLE,
            f"no loracache daemon at {self.socket_path}: {why}. Is it running (`loracache serve`, "
            "or `systemctl status loracache`), and may this user open the socket (group "
            "loracache)? Point LORACACHE_SOCKET or socket_path at the right socket.")


def device_name(device: str | torch.device) -> str:
    """The daemon's name for ``device``: ``cpu``, or ``cuda:<uuid>`` for a CUDA device (the
    UUID as nvidia-smi -L prints it: ``GPU-...``, or ``MIG-...`` for a MIG instance)."""
    if str(device) == "cpu" or str(device).startswith(("cuda:GPU-", "cuda:MIG-")):
        return str(device)
    import torch

    try:
        device = torch.device(device)
    except RuntimeError:
        raise LoraCacheError(ErrorCode.UNKNOWN_DEVICE,
                             f"{device!r} is not a device name; use cpu, cuda:<index> or "
                             "cuda:<GPU-uuid>") from None
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda":
        from loracache.shared.transport.cuda_ipc import device_uuid

        if not torch.cuda.is_available():
            raise LoraCacheError(ErrorCode.UNKNOWN_DEVICE,
                                 f"{device} asked for, but this process sees no CUDA device; "
                                 "name it by UUID (cuda:GPU-...) or check CUDA_VISIBLE_DEVICES")
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{device_uuid(index)}"
    raise LoraCacheError(ErrorCode.UNKNOWN_DEVICE, f"loracache serves cpu and cuda devices, "
                                                   f"not {device}")
