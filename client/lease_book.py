"""The client's book of leases: the leases it holds, the tensor tables it keeps so hits need not
carry them, the devices whose memory this process could not map, and the renewal of every lease
after the daemon restarts (or forgot a silent session)."""

from __future__ import annotations

import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from loracache.shared.errors import ErrorCode, LoraCacheError
from loracache.shared.protocol import Acquire, AcquireResult, Release, TensorSpec

from .connection import RELEASE_TIMEOUT, Connection

if TYPE_CHECKING:
    import torch

    from .lease import Lease

log = logging.getLogger("loracache.client")

TABLE_CACHE_SIZE = 256  # tensor tables kept per client, so hits need not carry them

Asked = tuple[str, str, str]  # (path, device, layout) as acquired


class LeaseBook:
    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._lock = threading.Lock()  # guards everything below
        # Weakly: a lease nothing else holds is garbage, and so is a client none of its
        # leases hold (a lease's release is bound to its client).
        self._leases: weakref.WeakSet[Lease] = weakref.WeakSet()
        self._tables: OrderedDict[tuple[str, str], list[TensorSpec]] = OrderedDict()
        self._hints: dict[Asked, str] = {}  # (path, device, layout) -> entry id
        self.unmappable: set[str] = set()  # devices whose memory this process failed to map

    def known_entry(self, asked: Asked) -> str:
        """The entry id whose tensor table this client holds for ``asked``, or ""."""
        with self._lock:
            entry_id = self._hints.get(asked, "")
            return entry_id if (self._connection.instance, entry_id) in self._tables else ""

    def table(self, instance: str, asked: Asked,
              result: AcquireResult) -> list[TensorSpec] | None:
        """The tensor table of ``result``'s entry: the one it carries (kept for later hits) or
        the one kept; None when it was dropped between asking and the reply."""
        key = (instance, result.entry.id)
        with self._lock:
            if result.tensors is not None:
                self._tables[key] = result.tensors
                self._hints[asked] = result.entry.id
            table = self._tables.get(key)
            if table is None:
                self._hints.pop(asked, None)  # ask again without the hint
                return None
            self._tables.move_to_end(key)
            while len(self._tables) > TABLE_CACHE_SIZE:
                self._tables.popitem(last=False)
            return table

    def attach(self, instance: str, result: AcquireResult,
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
            self._connection.give_back(result.lease, opened=False)
            raise
        except BaseException:  # whether torch mapped it is unknown: never release a slot twice
            self._connection.give_back(result.lease)
            raise

    @property
    def empty(self) -> bool:
        with self._lock:
            return not self._leases

    def add(self, lease: Lease) -> None:
        with self._lock:
            self._leases.add(lease)

    def release(self, lease: Lease) -> None:
        """Let go of ``lease``'s mapping and give it back to the daemon that lent it."""
        connection = self._connection
        with self._lock:
            self._leases.discard(lease)
        with connection.lock:
            current = lease.instance == connection.instance and not lease.orphaned
        from .lease import MAPPINGS

        MAPPINGS.detach(lease.instance, lease.entry.id)
        if not current:
            return  # lent by a daemon (or a session) that is gone: nothing to give back
        try:
            connection.request(Release(lease=lease.id), timeout=RELEASE_TIMEOUT, recover=False)
        except LoraCacheError as exc:
            if exc.code in (ErrorCode.UNKNOWN_SESSION, ErrorCode.UNKNOWN_LEASE):
                return  # the session expired: the daemon already took the lease back
            if exc.code in (ErrorCode.TIMEOUT, ErrorCode.DAEMON_UNAVAILABLE):
                # The daemon is gone or stuck; it releases the lease itself once this session
                # has been silent for its TTL, so a worker need not fail a request over it.
                log.warning("releasing %s: %s", lease, exc)
                return
            raise

    def release_all(self) -> None:
        with self._lock:
            leases = list(self._leases)
        for lease in leases:
            try:
                lease.release()
            except LoraCacheError as exc:
                log.debug("releasing %s at close failed: %s", lease, exc)

    def renew_all(self, old_instance: str) -> None:
        """Lease every held file again under the connection's new session (it calls this)."""
        connection = self._connection
        with self._lock:
            leases = list(self._leases)
        if connection.instance != old_instance:
            log.warning("the loracache daemon on %s restarted (instance %s, was %s); leasing "
                        "%d file(s) again", connection.socket_path, connection.instance,
                        old_instance, len(leases))
            with self._lock:
                self.unmappable.clear()  # a new daemon may be mappable from here: try again
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
        connection = self._connection
        path, device, layout = lease.request
        if not path:  # a probe: the daemon that lent it is gone, and so is the test
            lease.orphan()
            return
        try:
            result: AcquireResult = connection.round_trip(
                Acquire(path=path, device=device, layout=layout), connection.session, None)
        except LoraCacheError as exc:
            log.warning("could not lease %s again from the daemon: %s; keeping the old "
                        "mapping", path, exc)
            lease.orphan()
            return
        if result.entry.file != lease.entry.file:
            log.warning("%s changed on disk (%s, was %s); keeping the copy leased before, so "
                        "unfusing stays exact", path, result.entry.file, lease.entry.file)
            lease.orphan()
            connection.give_back(result.lease, opened=False)
            return
        instance = connection.instance
        table = result.tensors or []  # asked without a known entry: the table is there
        with self._lock:
            self._tables[(instance, result.entry.id)] = table
        tensors = self.attach(instance, result, table)
        old = lease.renewed(result.lease, result.entry, tensors, instance)
        if old is None:  # released while this renewal was under way
            MAPPINGS.detach(instance, result.entry.id)
            connection.give_back(result.lease)
        else:
            MAPPINGS.detach(*old)
