"""Sessions and their leases. A lease pins one entry for one session until released.

A session is refreshed by every message it sends; one silent for its TTL expires and gives
its leases back. Lease ids are random, so a client cannot name another session's lease. Each
session counts what it holds, so quotas cost nothing per request.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import secrets
import time
from typing import Any

from loracache.shared.errors import ErrorCode, LoraCacheError

from .cache import Entry


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (in this PID namespace)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False  # OverflowError: beyond any pid the kernel hands out
    except PermissionError:
        return True  # it exists, it is just not ours
    return True


@dataclasses.dataclass(eq=False)
class Lease:
    """One session's loan of one entry; the entry's cache counts it until it is given back."""

    id: str
    entry: Entry
    handle: dict[str, Any]  # the export given to the client, kept to undo it if the client dies


@dataclasses.dataclass(eq=False)
class Session:
    token: str
    pid: int
    last_seen: float
    ttl: float  # as told to the client at hello: it heartbeats by it, so a reload keeps it
    torch: str = ""  # the client's torch release, if it said (CUDA IPC handle formats differ)
    leases: dict[str, Lease] = dataclasses.field(default_factory=dict)
    # Distinct entries leased (leasing one entry twice costs no more memory) and their bytes.
    entry_leases: collections.Counter[str] = dataclasses.field(
        default_factory=collections.Counter)
    leased_bytes: collections.Counter[str] = dataclasses.field(
        default_factory=collections.Counter)  # by device

    def holds(self, entry: Entry) -> bool:
        return self.entry_leases[entry.id] > 0

    def process_alive(self) -> bool:
        """Whether the client's process still exists (same PID namespace as the daemon)."""
        # An unknown pid counts as alive: assume the worst for memory safety, i.e. still mapped.
        return self.pid <= 0 or pid_alive(self.pid)


class SessionTable:
    def __init__(self, ttl: float) -> None:
        self.ttl = ttl  # for sessions opened from now on
        self.sessions: dict[str, Session] = {}

    def open(self, pid: int, torch: str = "") -> Session:
        session = Session(token=secrets.token_urlsafe(16), pid=pid, last_seen=time.monotonic(),
                          ttl=self.ttl, torch=torch)
        self.sessions[session.token] = session
        return session

    def get(self, token: str) -> Session:
        """The session for ``token``, refreshed; UNKNOWN_SESSION once the expiry sweep closed
        it (a session past its TTL that the sweep has not reached yet lives on), or if it never
        was."""
        session = self.sessions.get(token)
        if session is None:
            raise LoraCacheError(ErrorCode.UNKNOWN_SESSION,
                                 "unknown or expired session; send hello again (the daemon may "
                                 "have restarted, or this client was silent past the session TTL)")
        session.last_seen = time.monotonic()
        return session

    def add_lease(self, session: Session, entry: Entry, handle: dict[str, Any]) -> Lease:
        lease = Lease(id=secrets.token_urlsafe(16), entry=entry, handle=handle)
        session.leases[lease.id] = lease
        if session.entry_leases[entry.id] == 0:
            session.leased_bytes[entry.device] += entry.nbytes
        session.entry_leases[entry.id] += 1
        return lease

    def release(self, session: Session, lease_id: str) -> Lease:
        lease = session.leases.pop(lease_id, None)
        if lease is None:
            raise LoraCacheError(ErrorCode.UNKNOWN_LEASE,
                                 f"this session holds no lease {lease_id!r:.40}; it was released "
                                 "already or belongs to another session")
        entry = lease.entry
        session.entry_leases[entry.id] -= 1
        if session.entry_leases[entry.id] == 0:
            del session.entry_leases[entry.id]
            session.leased_bytes[entry.device] -= entry.nbytes
        return lease

    def expired(self) -> list[Session]:
        now = time.monotonic()
        return [s for s in self.sessions.values() if s.last_seen < now - s.ttl]

    def close(self, session: Session) -> list[Lease]:
        """Forget ``session`` and return the leases it still held."""
        del self.sessions[session.token]
        leases = list(session.leases.values())
        session.leases.clear()
        session.entry_leases.clear()
        session.leased_bytes.clear()
        return leases
