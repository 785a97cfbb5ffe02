"""The synchronous, thread-safe client of the loracache daemon: a :class:`~.connection.Connection`
(sockets, session, recovery; no torch) and a :class:`~.lease_book.LeaseBook` (leases, tables,
renewal), behind the public API."""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from loracache.shared import device_names
from loracache.shared.errors import ErrorCode, LoraCacheError
from loracache.shared.protocol import (
    Acquire,
    AcquireResult,
    Clear,
    DropResult,
    EntriesResult,
    EntryInfo,
    Evict,
    Heartbeat,
    ListEntries,
    Prefetch,
    Preload,
    Probe,
    Stats,
    StatsResult,
    TensorSpec,
)

from .connection import DEFAULT_CONNECT_TIMEOUT, DEFAULT_REQUEST_TIMEOUT, Connection
from .lease_book import LeaseBook

if TYPE_CHECKING:
    from types import TracebackType

    import torch

    from .lease import Lease

log = logging.getLogger("loracache.client")

VERIFY_TIMEOUT = 30.0  # a busy host may be slow to answer; a dead daemon is found in a second


class LoraCacheClient:
    """A connection to the daemon at ``socket_path`` (default: ``$LORACACHE_SOCKET``, then the
    ``socket`` of the configuration file, then the system socket, then the per-user one).

    Raises LoraCacheError(DAEMON_UNAVAILABLE) when no daemon answers within ``connect_timeout``.
    Use it as a context manager, or call :meth:`close`: that releases the leases still held. A
    client dropped without :meth:`close` ends its session when it is garbage-collected, which
    is once neither it nor any lease it lent is held (a lease in use keeps its session alive).
    """

    def __init__(self, socket_path: str | Path | None = None, *,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
                 heartbeat: bool = True, session: bool = True) -> None:
        """``session=False``: only look and administer (stats, list, preload, evict, clear):
        no session is opened, so no leases, and the daemon does not count this client."""
        self._connection = Connection(socket_path, connect_timeout=connect_timeout,
                                      request_timeout=request_timeout, heartbeat=heartbeat,
                                      session=session)
        self._book = LeaseBook(self._connection)
        self._connection.on_recover = self._book.renew_all
        # The heartbeat thread holds the connection, not this object: once nothing holds the
        # client, its session ends rather than heartbeating forever. Not at interpreter exit:
        # there the session lapses by its TTL, and the daemon, finding the process gone,
        # undoes the exports of leases it never released.
        self._finalizer = weakref.finalize(self, _abandon, self._connection, self._book)
        self._finalizer.atexit = False

    # ---------------------------------------------------------------------------- public API

    def acquire(self, path: str | os.PathLike[str], device: str | torch.device = "cpu",
                layout: str = "raw") -> Lease:
        """Lease the LoRA file at ``path`` (absolute, or relative to a daemon LoRA directory)
        on ``device``, loading it into the daemon's cache on a miss. The lease's ``tensors``
        are zero-copy views of the shared copy."""
        self._require_session()
        asked = (os.fspath(path), device_name(device), layout)
        while True:
            result: AcquireResult = self._connection.request(Acquire(
                path=asked[0], device=asked[1], layout=layout,
                known_entry=self._book.known_entry(asked)))
            instance = self._connection.answered_by  # even if a daemon restarted meanwhile
            table = self._book.table(instance, asked, result)
            if table is not None:
                break
            self._connection.give_back(result.lease, opened=False)  # dropped: ask again
        return self._lend(instance, result, table, asked)

    def probe(self, device: str | torch.device = "cpu") -> Lease:
        """Lease a small test buffer on ``device`` (no LoRA file needed): its one tensor,
        ``probe``, holds :func:`loracache.shared.transport.probe_pattern` when this process maps
        the daemon's memory correctly. What ``loracache doctor`` checks with."""
        self._require_session()
        result: AcquireResult = self._connection.request(Probe(device=device_name(device)))
        return self._lend(self._connection.answered_by, result, result.tensors or [],
                          ("", result.entry.device, "raw"))

    def stats(self) -> StatsResult:
        """The daemon's counters: per device budget, used bytes, entries, leases, hits, ..."""
        stats: StatsResult = self._request(Stats())
        return stats

    def list(self, tiers: bool = False) -> list[EntryInfo]:
        """Every entry on the daemon's devices: path, device, layout, size, leases, pinned,
        idle seconds, source; with ``tiers``, host copies and downloads too (``tier``)."""
        entries: EntriesResult = self._request(ListEntries(tiers=tiers))
        return entries.entries

    def preload(self, path: str | os.PathLike[str], device: str | torch.device = "cpu",
                layout: str = "raw", pin: bool = False) -> EntryInfo:
        """Load an entry without leasing it; ``pin`` keeps it from eviction until evicted."""
        entry: EntryInfo = self._request(Preload(
            path=os.fspath(path), device=device_name(device), layout=layout, pin=pin))
        return entry

    def prefetch(self, sources: Iterable[str | os.PathLike[str]],
                 device: str | torch.device = "cpu", layout: str = "raw") -> None:
        """Warm the daemon's tiers for ``sources`` (paths or URLs) down to ``device``, and
        return at once: a scheduler that knows the next requests' LoRAs calls this so their
        acquires are hits. Refusals of the request itself (a URL not allowed, an unknown
        device) raise here; a failed fetch or load shows in the daemon's log and at acquire."""
        if isinstance(sources, (str, os.PathLike)):
            raise ValueError("prefetch takes a list of LoRAs: prefetch([source])")
        self._request(Prefetch(paths=[os.fspath(s) for s in sources], device=device_name(device),
                               layout=layout))

    def evict(self, path: str | os.PathLike[str], device: str = "") -> DropResult:
        """Evict the unleased entries of ``path``: how many were, and how many are leased."""
        dropped: DropResult = self._request(Evict(
            path=os.fspath(path), device=device_name(device) if device else ""))
        return dropped

    def clear(self, device: str = "") -> DropResult:
        """Evict every unleased entry, pinned ones included."""
        dropped: DropResult = self._request(Clear(device=device_name(device) if device else ""))
        return dropped

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
        """Release the leases still held, end the session, stop heartbeating, close sockets."""
        if self._connection.closed:
            return
        if os.getpid() == self._connection.pid:
            self._book.release_all()
        self._finalizer.detach()
        self._connection.close()

    @property
    def closed(self) -> bool:
        return self._connection.closed

    @property
    def socket_path(self) -> Path:
        return self._connection.socket_path

    @property
    def instance(self) -> str:
        """The daemon instance of the current session (it changes when the daemon restarts)."""
        return self._connection.instance

    @property
    def session(self) -> str:
        return self._connection.session

    @property
    def session_ttl(self) -> float:
        return self._connection.session_ttl

    @property
    def devices(self) -> Sequence[str]:
        """The devices the daemon serves, by name (``cpu``, ``cuda:GPU-...``)."""
        return self._connection.devices

    @property
    def daemon_torch(self) -> str:
        return self._connection.daemon_torch

    @property
    def unmappable(self) -> set[str]:
        """Devices whose memory this process failed to map (fusing loads elsewhere)."""
        return self._book.unmappable

    def __enter__(self) -> "LoraCacheClient":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: "TracebackType | None") -> None:
        self.close()

    # ------------------------------------------------------------------------------ internals

    def _request(self, request: Any, **kwargs: Any) -> Any:
        return self._connection.request(request, **kwargs)

    def _require_session(self) -> None:
        if not self._connection.wants_session:
            raise ValueError("this client was made with session=False, which cannot hold "
                             "leases; make it with session=True (the default)")

    def _lend(self, instance: str, result: AcquireResult, table: Sequence[TensorSpec],
              asked: tuple[str, str, str]) -> Lease:
        from .lease import Lease  # torch loads with the first lease, not with the CLI

        tensors = self._book.attach(instance, result, table)
        lease = Lease(result.lease, result.entry, tensors, self._release, instance=instance,
                      request=asked)
        self._book.add(lease)
        return lease

    def _release(self, lease: Lease) -> None:
        # Bound to this client, so a lease still held keeps the client (and session) alive.
        self._book.release(lease)


def _abandon(connection: Connection, book: LeaseBook) -> None:
    """A client that nothing holds any more, nor any of its leases (each holds its client).
    This may run in any thread (the garbage collector's), so the connection is only told to
    end; it says Bye when the book has no lease left, as it should not at this point."""
    connection.abandon(bye=book.empty)


def device_name(device: str | torch.device) -> str:
    """The daemon's name for ``device``: ``cpu``, or ``cuda:<uuid>`` for a CUDA device (the
    UUID as nvidia-smi -L prints it: ``GPU-...``, or ``MIG-...`` for a MIG instance)."""
    if device_names.is_name(str(device)):
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
