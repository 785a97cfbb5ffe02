"""SessionTable alone: sessions, their leases and per-session counters, expiry by silence,
and the liveness check of a client's process. Entries are real, over shared-memory buffers.
"""

from __future__ import annotations

import os
import subprocess
import types

import pytest

from loracache.daemon import sessions as sessions_module
from loracache.daemon.cache import Entry
from loracache.daemon.sessions import Lease, Session, SessionTable, pid_alive
from loracache.shared.errors import ErrorCode, LoraCacheError
from loracache.shared.transport.shm import ShmTransport

GPU = "cuda:GPU-00000000-1111-2222-3333-444444444444"


class Clock:
    """The monotonic clock the sessions module reads, moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """Replace ``time`` inside loracache.daemon.sessions only (the module calls
    ``time.monotonic()``), so other modules and pytest keep the real clock."""
    clock = Clock()
    monkeypatch.setattr(sessions_module, "time", types.SimpleNamespace(monotonic=clock.monotonic))
    return clock


@pytest.fixture
def make_entry(transport: ShmTransport):
    """Real entries: a shared-memory buffer of ``nbytes`` each, on ``device`` (a name only)."""

    def make(name: str, nbytes: int = 1000, device: str = "cpu") -> Entry:
        buffer = transport.allocate(nbytes, name)
        return Entry(id=name, key=(name, device), path=f"/loras/{name}.safetensors",
                     device=device, layout="raw", buffer=buffer, tensors=[])

    return make


@pytest.fixture
def dead_pid() -> int:
    """The pid of a child that has exited and been reaped: no process has it (barring reuse)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def lease(table: SessionTable, session: Session, entry: Entry) -> Lease:
    return table.add_lease(session, entry, entry.buffer.export())


def code_of(excinfo: pytest.ExceptionInfo[LoraCacheError]) -> ErrorCode:
    return excinfo.value.code


# ----------------------------------------------------------------------------- sessions


def test_open_registers_a_session_with_the_hello_fields(clock):
    table = SessionTable(ttl=30.0)
    session = table.open(pid=4242, torch="2.5.1")
    assert table.sessions == {session.token: session}
    assert (session.pid, session.torch, session.ttl, session.last_seen) == (4242, "2.5.1", 30.0,
                                                                            1000.0)
    assert session.leases == {} and not session.entry_leases and not session.leased_bytes


def test_tokens_are_unguessable_and_distinct():
    """Tokens are the only credential of a session: 128 random bits, URL-safe, never reused,
    even for sessions of the same process."""
    table = SessionTable(ttl=30.0)
    tokens = [table.open(pid=1).token for _ in range(200)]
    assert len(set(tokens)) == 200
    assert all(len(token) >= 22 for token in tokens)  # 16 bytes in base64
    assert all(set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                                 "0123456789-_") for token in tokens)


def test_get_returns_the_session_and_refreshes_it(clock):
    table = SessionTable(ttl=30.0)
    session = table.open(pid=1)
    clock.now += 25.0
    assert table.get(session.token) is session
    assert session.last_seen == 1025.0


@pytest.mark.parametrize("token", ["", "not-a-token", "x" * 10_000])
def test_get_of_an_unknown_token_is_unknown_session(token):
    table = SessionTable(ttl=30.0)
    table.open(pid=1)
    with pytest.raises(LoraCacheError) as caught:
        table.get(token)
    assert code_of(caught) is ErrorCode.UNKNOWN_SESSION
    assert "hello" in caught.value.message  # says what to do
    assert len(caught.value.message) < 300  # the token is not echoed back


def test_get_after_close_is_unknown_session():
    table = SessionTable(ttl=30.0)
    session = table.open(pid=1)
    table.close(session)
    with pytest.raises(LoraCacheError) as caught:
        table.get(session.token)
    assert code_of(caught) is ErrorCode.UNKNOWN_SESSION


def test_ttl_change_applies_to_sessions_opened_afterwards(clock):
    """A reload may change the TTL; sessions keep the one they were told at hello, because the
    client heartbeats by it."""
    table = SessionTable(ttl=30.0)
    old = table.open(pid=1)
    table.ttl = 5.0
    new = table.open(pid=2)
    assert (old.ttl, new.ttl) == (30.0, 5.0)
    clock.now += 10.0
    assert table.expired() == [new]


# ------------------------------------------------------------------------------- expiry


def test_a_session_expires_only_after_a_full_ttl_of_silence(clock):
    table = SessionTable(ttl=30.0)
    session = table.open(pid=os.getpid())
    clock.now += 30.0
    assert table.expired() == []  # exactly the TTL: not yet
    clock.now += 0.001
    assert table.expired() == [session]


def test_every_message_postpones_expiry(clock):
    table = SessionTable(ttl=30.0)
    session = table.open(pid=1)
    for _ in range(5):
        clock.now += 20.0
        table.get(session.token)
        assert table.expired() == []
    clock.now += 30.5
    assert table.expired() == [session]


def test_expired_lists_only_the_silent_sessions(clock):
    table = SessionTable(ttl=30.0)
    quiet, chatty = table.open(pid=1), table.open(pid=2)
    clock.now += 20.0
    table.get(chatty.token)
    clock.now += 20.0
    assert table.expired() == [quiet]


def test_expired_does_not_close(clock, make_entry):
    """expired() only reports; the caller closes (and so gets the leases back)."""
    table = SessionTable(ttl=30.0)
    session = table.open(pid=1)
    held = lease(table, session, make_entry("a"))
    clock.now += 31.0
    assert table.expired() == [session]
    assert table.expired() == [session]
    assert table.sessions == {session.token: session}
    assert table.close(session) == [held]
    assert table.expired() == []


def test_expiry_is_by_silence_not_by_process_death(clock, dead_pid):
    """A client that died stops heartbeating and expires by its TTL like any other; a dead
    process alone does not end a session early (the sweep asks about the process only to
    decide who undoes the exports)."""
    table = SessionTable(ttl=30.0)
    dead = table.open(pid=dead_pid)
    alive = table.open(pid=os.getpid())
    assert not dead.process_alive()
    assert table.expired() == []
    clock.now += 31.0
    assert table.expired() == [dead, alive]


# -------------------------------------------------------------------- process liveness


def test_pid_alive_for_this_process_and_init():
    """Our own pid exists; pid 1 exists in every namespace (ours or not, it is there)."""
    assert pid_alive(os.getpid())
    assert pid_alive(1)


def test_pid_alive_is_false_for_a_reaped_child(dead_pid):
    assert not pid_alive(dead_pid)


def test_pid_alive_is_true_for_a_running_child():
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert pid_alive(child.pid)
    finally:
        child.kill()
        child.wait()
    assert not pid_alive(child.pid)


@pytest.mark.parametrize("pid", [4_194_304 + 1, 2**31 - 1, 2**31, 2**63, 10**30])
def test_pid_alive_is_false_beyond_any_pid(pid):
    """Beyond pid_max, and beyond what kill(2) can even take (OverflowError): no process."""
    assert not pid_alive(pid)


@pytest.mark.parametrize("pid", [0, -1, -12345])
def test_an_unknown_pid_counts_as_alive(pid):
    """A client that gave no usable pid is assumed alive: the daemon must not undo exports
    a live process may still map (kill(0) or kill(-1) would also signal whole groups)."""
    assert Session(token="t", pid=pid, last_seen=0.0, ttl=30.0).process_alive()


def test_process_alive_follows_the_client_process(dead_pid):
    assert Session(token="t", pid=os.getpid(), last_seen=0.0, ttl=30.0).process_alive()
    assert not Session(token="t", pid=dead_pid, last_seen=0.0, ttl=30.0).process_alive()
    assert not Session(token="t", pid=2**40, last_seen=0.0, ttl=30.0).process_alive()


# ------------------------------------------------------------------------------- leases


def test_add_lease_records_the_lease_and_counts_the_entry(make_entry):
    table = SessionTable(ttl=30.0)
    session = table.open(pid=1)
    entry = make_entry("a", nbytes=4096)
    handle = entry.buffer.export()
    held = table.add_lease(session, entry, handle)
    assert session.leases == {held.id: held}
    assert held.entry is entry and held.handle == handle
    assert session.holds(entry)
    assert session.entry_leases[entry.id] == 1
    assert session.leased_bytes["cpu"] == 4096


def test_lease_ids_are_random_and_distinct(make_entry):
    """A lease id is unguessable, so a client cannot name another session's lease."""
    table = SessionTable(ttl=30.0)
    session = table.open(pid=1)
    entry = make_entry("a")
    ids = [lease(table, session, entry).id for _ in range(200)]
    assert len(set(ids)) == 200 and all(len(i) >= 22 for i in ids)


def test_leasing_one_entry_twice_costs_its_bytes_once(make_entry):
    """Bytes count per distinct entry: a second lease of the same entry maps the same memory."""
    table = SessionTable(ttl=30.0)
    session = table.open(pid=1)
    entry = make_entry("a", nbytes=1000)
    first, second = lease(table, session, entry), lease(table, session, entry)
    assert session.entry_leases[entry.id] == 2
    assert session.leased_bytes["cpu"] == 1000
    assert table.release(session, first.id) is first
    assert session.holds(entry) and session.leased_bytes["cpu"] == 1000
    assert table.release(session, second.id) is second
    assert not session.holds(entry)
    assert entry.id not in session.entry_leases  # no zero counts pile up
    assert session.leased_bytes["cpu"] == 0
    assert session.leases == {}


def test_leased_bytes_are_counted_per_device(make_entry):
    table = SessionTable(ttl=30.0)
    session = table.open(pid=1)
    a, b = make_entry("a", 1000), make_entry("b", 300)
    on_gpu = make_entry("g", 5000, device=GPU)
    for entry in (a, b, on_gpu, on_gpu):
        lease(table, session, entry)
    assert session.leased_bytes == {"cpu": 1300, GPU: 5000}
    assert dict(session.entry_leases) == {"a": 1, "b": 1, "g": 2}


def test_sessions_count_their_leases_independently(make_entry):
    """Two sessions leasing the same entry each count its bytes: quotas are per session."""
    table = SessionTable(ttl=30.0)
    one, two = table.open(pid=1), table.open(pid=2)
    entry = make_entry("a", nbytes=1000)
    lease(table, one, entry)
    held = lease(table, two, entry)
    assert one.leased_bytes["cpu"] == two.leased_bytes["cpu"] == 1000
    table.release(two, held.id)
    assert one.holds(entry) and not two.holds(entry)
    assert one.leased_bytes["cpu"] == 1000


def test_releasing_twice_is_unknown_lease_and_changes_nothing(make_entry):
    table = SessionTable(ttl=30.0)
    session = table.open(pid=1)
    entry = make_entry("a")
    first, kept = lease(table, session, entry), lease(table, session, entry)
    table.release(session, first.id)
    with pytest.raises(LoraCacheError) as caught:
        table.release(session, first.id)
    assert code_of(caught) is ErrorCode.UNKNOWN_LEASE
    assert session.leases == {kept.id: kept}
    assert session.entry_leases[entry.id] == 1
    assert session.leased_bytes["cpu"] == entry.nbytes


def test_a_lease_of_another_session_is_unknown_lease(make_entry):
    """Lease ids are looked up in the caller's session only: naming another session's lease
    neither releases it nor touches either session's counters."""
    table = SessionTable(ttl=30.0)
    owner, other = table.open(pid=1), table.open(pid=2)
    entry = make_entry("a")
    held = lease(table, owner, entry)
    with pytest.raises(LoraCacheError) as caught:
        table.release(other, held.id)
    assert code_of(caught) is ErrorCode.UNKNOWN_LEASE
    assert owner.leases == {held.id: held} and owner.leased_bytes["cpu"] == entry.nbytes
    assert other.leases == {} and not other.holds(entry)
    assert table.release(owner, held.id) is held


def test_an_unknown_lease_id_is_unknown_lease_with_a_bounded_message():
    """The id comes from the client: the message quotes at most a few dozen characters of it."""
    table = SessionTable(ttl=30.0)
    session = table.open(pid=1)
    with pytest.raises(LoraCacheError) as caught:
        table.release(session, "z" * 100_000)
    assert code_of(caught) is ErrorCode.UNKNOWN_LEASE
    assert len(caught.value.message) < 200


# -------------------------------------------------------------------------------- close


def test_close_returns_the_leases_still_held_and_forgets_the_session(make_entry):
    table = SessionTable(ttl=30.0)
    session, other = table.open(pid=1), table.open(pid=2)
    a, b = make_entry("a"), make_entry("b", device=GPU)
    released = lease(table, session, a)
    held = [lease(table, session, a), lease(table, session, b), lease(table, session, b)]
    other_lease = lease(table, other, a)
    table.release(session, released.id)
    returned = table.close(session)
    assert sorted(x.id for x in returned) == sorted(x.id for x in held)
    assert all(isinstance(x, Lease) for x in returned)
    assert session.token not in table.sessions
    assert session.leases == {} and not session.entry_leases and not session.leased_bytes
    assert table.sessions == {other.token: other}
    assert other.leases == {other_lease.id: other_lease}


def test_close_of_a_session_without_leases_returns_none(clock):
    table = SessionTable(ttl=30.0)
    session = table.open(pid=1)
    assert table.close(session) == []
    assert table.sessions == {}
