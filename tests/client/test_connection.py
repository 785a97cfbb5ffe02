"""The client's connection against a scripted daemon: a ROUTER socket in this process that reads
each request with the real protocol and answers as each test scripts it (late replies,
refusals, lost sessions, silence, a daemon that goes away), so every path of the connection
runs in milliseconds, with no daemon process."""

from __future__ import annotations

import gc
import itertools
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import msgspec
import pytest
import zmq

from loracache.client.connection import Connection
from loracache.shared.endpoints import endpoint
from loracache.shared.errors import ErrorCode, LoraCacheError
from loracache.shared.protocol import (
    Bye,
    Done,
    DropResult,
    EntriesResult,
    EntryInfo,
    Heartbeat,
    Hello,
    HelloResult,
    ListEntries,
    Preload,
    Release,
    Request,
    Stats,
    StatsResult,
    decode_request,
    encode_error,
    encode_reply,
)
from tests.support import wait_until

STATS = StatsResult(instance="i1", pid=4242, uptime_s=1.5, sessions=1, leases=0, errors={},
                    metrics=None, devices=[])


def entry(path: str) -> EntryInfo:
    return EntryInfo(id=f"entry-{path}", path=path, device="cpu", layout="raw", nbytes=64)


@dataclass
class Received:
    identity: bytes  # the ROUTER's name for the client socket it came on
    request: Request
    at: float  # time.monotonic() when the peer read it


class Peer:
    """A scripted daemon bound at ``path``. ``script(peer, got)`` runs in the serving thread for
    every request and answers it (or not) with :meth:`reply` / :meth:`fail`; the default,
    :meth:`answer`, is what a healthy daemon says. :meth:`go_away` (from a script) stops
    serving: ``unlink`` as a daemon that stopped cleanly, else as one that was killed."""

    def __init__(self, path: Path, *, instance: str = "i1", ttl: float = 60.0) -> None:
        self.path, self.instance, self.ttl = path, instance, ttl
        self.sessions: set[str] = set()  # the sessions this daemon knows
        self.received: list[Received] = []
        self.script: Callable[[Peer, Received], None] = Peer.answer
        self.error: BaseException | None = None
        self._tokens = itertools.count(1)
        self._timers: list[tuple[float, Callable[[], None]]] = []  # run by the serving thread
        self._gone: bool | None = None  # None: serving; else whether to unlink the socket file
        self._stop = threading.Event()
        self._context = zmq.Context()
        self._router = self._context.socket(zmq.ROUTER)
        self._router.linger = 0
        self._router.bind(endpoint(path))
        self._thread = threading.Thread(target=self._serve, daemon=True, name="scripted-peer")
        self._thread.start()

    # what scripts call (in the serving thread)

    def reply(self, got: Received, result: msgspec.Struct, request_id: int | None = None) -> None:
        rid = got.request.id if request_id is None else request_id
        self._router.send_multipart([got.identity, encode_reply(rid, result)])

    def fail(self, got: Received, code: ErrorCode, request_id: int | None = None) -> None:
        rid = got.request.id if request_id is None else request_id
        error = LoraCacheError(code, f"scripted {code.value}")
        self._router.send_multipart([got.identity, encode_error(rid, error)])

    def answer(self, got: Received) -> None:
        request = got.request
        if isinstance(request, Hello):
            session = f"s{next(self._tokens)}" if request.open_session else ""
            if session:
                self.sessions.add(session)
            self.reply(got, HelloResult(instance=self.instance, session=session,
                                        session_ttl=self.ttl, devices=["cpu", "cuda:GPU-1"],
                                        torch="2.5.1"))
        elif request.session and request.session not in self.sessions:
            self.fail(got, ErrorCode.UNKNOWN_SESSION)
        elif isinstance(request, Bye):
            self.sessions.discard(request.session)
            self.reply(got, Done())
        elif isinstance(request, Stats):
            self.reply(got, STATS)
        elif isinstance(request, Preload):
            self.reply(got, entry(request.path))
        elif request.result_type is Done:
            self.reply(got, Done())
        else:
            raise AssertionError(f"nothing scripted for {request!r}")

    def later(self, delay: float, action: Callable[[], None]) -> None:
        """Run ``action`` in the serving thread ``delay`` seconds from now (a slow answer)."""
        self._timers.append((time.monotonic() + delay, action))

    def go_away(self, unlink: bool) -> None:
        self._gone = unlink

    # what tests call

    def ops(self) -> list[str]:
        return [got.request.op for got in list(self.received)]

    def of(self, kind: type[Request]) -> list[Received]:
        return [got for got in list(self.received) if isinstance(got.request, kind)]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        assert not self._thread.is_alive()
        if self.error is not None:
            raise self.error

    def _serve(self) -> None:
        try:
            while not self._stop.is_set() and self._gone is None:
                for timer in [t for t in self._timers if t[0] <= time.monotonic()]:
                    self._timers.remove(timer)
                    timer[1]()
                if not self._router.poll(10):
                    continue
                identity, data = self._router.recv_multipart()
                got = Received(identity, decode_request(data), time.monotonic())
                self.received.append(got)
                self.script(self, got)
        except BaseException as exc:  # reported by stop(), in the test's thread
            self.error = exc
        finally:
            self._router.close(linger=0)
            self._context.term()
            if self._gone:
                self.path.unlink(missing_ok=True)


# Threads alive when the test started: another module's, in the same pytest worker.
_BEFORE: set[threading.Thread] = set()


def heartbeat_threads() -> list[threading.Thread]:
    """The heartbeat threads this test started."""
    return [t for t in threading.enumerate()
            if t.name == "loracache-heartbeat" and t not in _BEFORE]


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Each test ends its peers' and connections' threads (checked after all teardown)."""
    _BEFORE.clear()
    _BEFORE.update(threading.enumerate())
    yield
    wait_until(lambda: set(threading.enumerate()) <= _BEFORE, timeout=5)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory: pytest's tmp_path can exceed the 107 bytes of a socket address."""
    directory = Path(tempfile.mkdtemp(prefix="lcc-", dir="/tmp"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def peers(sock_dir: Path) -> Iterator[Callable[..., Peer]]:
    """Start scripted daemons at ``sock_dir/d.sock`` (one at a time); stopped after the test."""
    started: list[Peer] = []

    def start(**kwargs: Any) -> Peer:
        started.append(Peer(sock_dir / "d.sock", **kwargs))
        return started[-1]

    yield start
    for peer in started:
        peer.stop()


@pytest.fixture
def peer(peers: Callable[..., Peer]) -> Peer:
    return peers()


@pytest.fixture
def connect(sock_dir: Path, peers: Callable[..., Peer]) -> Iterator[Callable[..., Connection]]:
    """Make Connections (no heartbeat unless asked); closed before the peers stop."""
    made: list[Connection] = []

    def make(**kwargs: Any) -> Connection:
        options = {"connect_timeout": 2.0, "request_timeout": 5.0, "heartbeat": False,
                   "session": True, **kwargs}
        made.append(Connection(sock_dir / "d.sock", **options))
        return made[-1]

    yield make
    for conn in made:
        conn.close()
    assert not heartbeat_threads()


def preload_from_two_threads(conn: Connection) -> dict[str, Any]:
    """Preload "a" and "b" at once from two threads: what each got (a result or an error)."""
    results: dict[str, Any] = {}

    def ask(path: str) -> None:
        try:
            results[path] = conn.request(Preload(path=path))
        except Exception as exc:
            results[path] = exc

    threads = [threading.Thread(target=ask, args=(path,)) for path in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    return results


def raises_code(code: ErrorCode, call: Callable[[], Any]) -> LoraCacheError:
    with pytest.raises(LoraCacheError) as caught:
        call()
    assert caught.value.code is code, caught.value
    return caught.value


# ------------------------------------------------------------------------------------- hello


def test_hello_sets_the_session_fields(peers, connect):
    """What the daemon said at hello is what the client reports (instance, ttl, devices...)."""
    peer = peers(instance="inst-A", ttl=7.5)
    conn = connect()
    assert (conn.instance, conn.session, conn.session_ttl) == ("inst-A", "s1", 7.5)
    assert (conn.devices, conn.daemon_torch) == (["cpu", "cuda:GPU-1"], "2.5.1")
    (hello,) = peer.received
    assert isinstance(hello.request, Hello)
    assert (hello.request.pid, hello.request.open_session, hello.request.session) == (
        os.getpid(), True, "")
    assert not conn.closed


def test_a_look_only_connection_opens_no_session_heartbeats_never_and_says_no_bye(peer, connect):
    """session=False: the daemon is told not to count this client, so nothing keeps or ends a
    session (no heartbeat thread even when asked for one, no Bye at close)."""
    conn = connect(session=False, heartbeat=True)
    assert peer.received[0].request.open_session is False
    assert conn.session == "" and not heartbeat_threads()
    assert conn.request(Stats()) == STATS
    conn.close()
    assert peer.ops() == ["hello", "stats"]


def test_a_missing_socket_is_unavailable_at_once(sock_dir):
    """No socket file: no daemon to wait for, and the message says which file is missing."""
    error = raises_code(ErrorCode.DAEMON_UNAVAILABLE, lambda: Connection(
        sock_dir / "none.sock", connect_timeout=30, request_timeout=30, heartbeat=True,
        session=True))
    assert f"the socket {sock_dir / 'none.sock'} does not exist" in error.message


def test_a_socket_path_too_long_to_bind_is_refused(sock_dir):
    """The kernel cannot take it: BAD_SOCKET_PATH, not a wait for a daemon."""
    raises_code(ErrorCode.BAD_SOCKET_PATH, lambda: Connection(
        sock_dir / ("x" * 120) / "d.sock", connect_timeout=1, request_timeout=1,
        heartbeat=False, session=True))


def test_a_hello_nobody_answers_is_unavailable(peer, connect):
    """A socket that takes the hello but never answers it is no daemon to use."""
    peer.script = lambda peer, got: None
    error = raises_code(ErrorCode.DAEMON_UNAVAILABLE, lambda: connect(connect_timeout=0.2))
    assert "nobody answered" in error.message
    assert peer.ops() == ["hello"]


# ------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("request_, result", [
    (Stats(), STATS),
    (Preload(path="a.safetensors", pin=True), entry("a.safetensors")),
    (ListEntries(), EntriesResult(entries=[entry("a"), entry("b")])),
    (Heartbeat(), Done()),
])
def test_a_request_returns_the_typed_result_of_its_result_type(peer, connect, request_, result):
    """Each request decodes its reply as its own result type, sent under the session."""
    conn = connect()
    peer.script = lambda peer, got: peer.reply(got, result)
    returned = conn.request(request_)
    assert type(returned) is type(result) and returned == result
    got = peer.received[-1].request
    assert got.session == "s1" and msgspec.structs.replace(got, id=0, session="") == request_
    assert conn.answered_by == "i1"


def test_a_result_of_another_type_is_refused(peer, connect):
    """A reply that is not the request's result type is not handed on as if it were."""
    conn = connect()
    peer.script = lambda peer, got: peer.reply(got, DropResult(evicted=1, busy=0))
    raises_code(ErrorCode.BAD_REQUEST, lambda: conn.request(Stats()))


def test_a_late_reply_to_another_request_is_skipped(peer, connect):
    """Replies of other ids (success or error) are a late answer to an earlier request."""
    conn = connect()

    def script(peer: Peer, got: Received) -> None:
        peer.reply(got, DropResult(evicted=9, busy=9), request_id=got.request.id - 1)
        peer.fail(got, ErrorCode.CACHE_FULL, request_id=got.request.id + 100)
        peer.reply(got, STATS)

    peer.script = script
    assert conn.request(Stats()) == STATS


@pytest.mark.parametrize("refused", [True, False])
def test_a_reply_of_id_0_is_this_requests(peer, connect, refused):
    """Id 0: the daemon could not read the id; one request is in flight, so it is this one's."""
    conn = connect()
    if refused:
        peer.script = lambda peer, got: peer.fail(got, ErrorCode.BAD_REQUEST, request_id=0)
        raises_code(ErrorCode.BAD_REQUEST, lambda: conn.request(Stats()))
    else:
        peer.script = lambda peer, got: peer.reply(got, STATS, request_id=0)
        assert conn.request(Stats()) == STATS


@pytest.mark.parametrize("code", [ErrorCode.CACHE_FULL, ErrorCode.NOT_FOUND, ErrorCode.INTERNAL])
def test_an_error_reply_raises_its_code(peer, connect, code):
    """The daemon's error comes out as a LoraCacheError with the daemon's code and message."""
    conn = connect()
    peer.script = lambda peer, got: peer.fail(got, code)
    error = raises_code(code, lambda: conn.request(Preload(path="a")))
    assert error.message == f"scripted {code.value}"


def test_threads_use_their_own_sockets_and_get_their_own_replies(peer, connect):
    """Two threads wait at once (no lock held while waiting), each on its own socket, and each
    gets the reply to its request even when the replies come in the other order."""
    conn = connect()
    held: list[Received] = []

    def script(peer: Peer, got: Received) -> None:
        if not isinstance(got.request, Preload):
            return peer.answer(got)
        held.append(got)
        if len(held) == 2:  # both are waiting: answer the later one first
            for waiting in reversed(held):
                peer.reply(waiting, entry(waiting.request.path))

    peer.script = script
    assert preload_from_two_threads(conn) == {"a": entry("a"), "b": entry("b")}
    hello_identity = peer.received[0].identity
    assert len({got.identity for got in held} | {hello_identity}) == 3


# ---------------------------------------------------------------------------------- recovery


def test_unknown_session_renews_the_session_and_sends_again_once(peer, connect):
    """A daemon that restarted: one new hello, on_recover(old instance) with the new session in
    place, then the same request again under the new session."""
    conn = connect()
    seen: list[tuple[str, str, str]] = []
    conn.on_recover = lambda old: seen.append((old, conn.instance, conn.session))
    peer.instance = "i2"
    peer.sessions.clear()
    assert conn.request(Stats()) == STATS
    assert seen == [("i1", "i2", "s2")]
    assert peer.ops() == ["hello", "stats", "hello", "stats"]
    assert [got.request.session for got in peer.of(Stats)] == ["s1", "s2"]
    assert conn.answered_by == "i2"


def test_a_second_unknown_session_is_raised_not_looped(peer, connect):
    """Recovery is tried once per request: a daemon that keeps refusing gets one new hello."""
    conn = connect()
    recovered: list[str] = []
    conn.on_recover = recovered.append

    def script(peer: Peer, got: Received) -> None:
        if isinstance(got.request, Stats):
            peer.fail(got, ErrorCode.UNKNOWN_SESSION)
        else:
            peer.answer(got)

    peer.script = script
    raises_code(ErrorCode.UNKNOWN_SESSION, lambda: conn.request(Stats()))
    assert peer.ops() == ["hello", "stats", "hello", "stats"]
    assert recovered == ["i1"]


@pytest.mark.parametrize("kwargs", [{"recover": False}, {"session": "other"}])
def test_no_recovery_when_not_asked_for_or_for_another_session(peer, connect, kwargs):
    """recover=False (releases, bye) and an explicit session= leave the session alone."""
    conn = connect()
    recovered: list[str] = []
    conn.on_recover = recovered.append
    peer.sessions.clear()
    raises_code(ErrorCode.UNKNOWN_SESSION, lambda: conn.request(Stats(), **kwargs))
    assert peer.ops() == ["hello", "stats"] and not recovered
    assert peer.of(Stats)[0].request.session == kwargs.get("session", "s1")
    assert conn.session == "s1"


def test_two_threads_meeting_unknown_session_recover_once(peer, connect):
    """Whichever thread meets UNKNOWN_SESSION first renews; the other just sends again."""
    conn = connect()
    recovered: list[str] = []
    conn.on_recover = recovered.append
    stale: list[Received] = []

    def script(peer: Peer, got: Received) -> None:
        if isinstance(got.request, Preload) and got.request.session == "s1":
            stale.append(got)
            if len(stale) == 2:
                for waiting in stale:
                    peer.fail(waiting, ErrorCode.UNKNOWN_SESSION)
        else:
            peer.answer(got)

    peer.script = script
    peer.sessions.clear()
    assert preload_from_two_threads(conn) == {"a": entry("a"), "b": entry("b")}
    assert peer.ops().count("hello") == 2 and recovered == ["i1"]


# ------------------------------------------------------------------------ timeouts, liveness


def test_a_bound_daemon_that_never_answers_times_out(peer, connect):
    """Silence from a daemon that still listens is TIMEOUT; the socket is replaced after it, so
    a late refusal (id 0) to the timed-out request cannot be taken as the next one's."""
    conn = connect()
    silent: list[Received] = []

    def script(peer: Peer, got: Received) -> None:
        if not silent:
            silent.append(got)
            return
        peer.fail(silent[0], ErrorCode.BAD_REQUEST, request_id=0)  # late, and id-less
        peer.reply(got, STATS)

    peer.script = script
    started = time.monotonic()
    error = raises_code(ErrorCode.TIMEOUT, lambda: conn.request(Stats(), timeout=0.3))
    assert time.monotonic() - started >= 0.3
    assert "stats" in error.message
    assert conn.request(Stats()) == STATS
    first, second = peer.of(Stats)
    assert first.identity != second.identity


def test_a_slow_daemon_that_still_listens_is_waited_for(peer, connect):
    """Past the liveness probe (a second of silence), a daemon whose socket still accepts
    connections is busy, not gone: its late reply is taken."""
    conn = connect()

    def script(peer: Peer, got: Received) -> None:
        if isinstance(got.request, Stats):
            peer.later(1.1, lambda: peer.reply(got, STATS))
        else:
            peer.answer(got)

    peer.script = script
    started = time.monotonic()
    assert conn.request(Stats(), timeout=10) == STATS
    assert time.monotonic() - started >= 1.1


@pytest.mark.parametrize("unlink", [True, False], ids=["stopped", "killed"])
def test_a_daemon_gone_mid_request_is_unavailable_fast(peer, connect, unlink):
    """A daemon that stopped (socket file removed) or was killed (file left, nobody listening)
    fails the waiting request within about a second, not at its timeout; once found gone, the
    next request fails without the second's wait."""
    conn = connect()

    def script(peer: Peer, got: Received) -> None:
        peer.go_away(unlink)

    peer.script = script
    started = time.monotonic()
    raises_code(ErrorCode.DAEMON_UNAVAILABLE, lambda: conn.request(Stats(), timeout=30))
    assert time.monotonic() - started < 3
    assert peer.path.exists() is not unlink
    started = time.monotonic()
    raises_code(ErrorCode.DAEMON_UNAVAILABLE, lambda: conn.request(Stats(), timeout=30))
    assert time.monotonic() - started < 0.9  # suspected gone: probes at once, not after 1 s


def test_a_daemon_back_at_the_path_gets_a_new_session(peers, connect):
    """After a restart the old session is unknown: the next request renews it on the new
    daemon, and on_recover hears which instance was lost."""
    first = peers()
    conn = connect()
    recovered: list[tuple[str, str]] = []
    conn.on_recover = lambda old: recovered.append((old, conn.instance))
    first.stop()
    second = peers(instance="i2")
    assert conn.request(Stats()) == STATS
    assert recovered == [("i1", "i2")]
    assert second.ops() == ["stats", "hello", "stats"]


# ------------------------------------------------------------------------------- heartbeat


def test_the_heartbeat_comes_every_third_of_the_ttl_and_stops_at_close(peers, connect):
    """A third of the TTL keeps the session alive through two lost heartbeats; close() ends the
    thread (joined, so no heartbeat can follow the Bye)."""
    peer = peers(ttl=0.3)
    conn = connect(heartbeat=True)
    assert len(heartbeat_threads()) == 1
    wait_until(lambda: len(peer.of(Heartbeat)) >= 4, timeout=5, interval=0.02)
    beats = peer.of(Heartbeat)[:4]
    assert all(got.request.session == "s1" for got in beats)
    assert beats[0].at - peer.received[0].at >= 0.09  # none before the first interval
    assert 0.08 <= (beats[3].at - beats[0].at) / 3 <= 0.2
    conn.close()
    assert not heartbeat_threads()
    assert peer.ops()[-1] == "bye"


def test_the_heartbeat_outlives_failures_and_warns_once_per_outage(peers, connect, caplog):
    """Failed heartbeats do not end the thread; one WARNING per run of failures, DEBUG after."""
    caplog.set_level(logging.DEBUG, logger="loracache.client")
    peer = peers(ttl=0.6)  # a heartbeat may take 0.2 s before it counts as failed
    failing = {1, 2, 4}  # the heartbeats to fail, counted from 1

    def script(peer: Peer, got: Received) -> None:
        if isinstance(got.request, Heartbeat) and len(peer.of(Heartbeat)) in failing:
            peer.fail(got, ErrorCode.INTERNAL)
        else:
            peer.answer(got)

    peer.script = script
    conn = connect(heartbeat=True)
    wait_until(lambda: len(peer.of(Heartbeat)) >= 6, timeout=5, interval=0.02)
    conn.close()
    failures = [r for r in caplog.records if "heartbeat" in r.getMessage()]
    assert [r.levelno for r in failures] == [logging.WARNING, logging.DEBUG, logging.WARNING]


def test_the_heartbeat_renews_a_lost_session(peers, connect):
    """An idle client whose daemon restarted renews its session from the heartbeat thread."""
    peer = peers(ttl=0.15)
    conn = connect(heartbeat=True)
    recovered: list[str] = []
    conn.on_recover = recovered.append
    peer.instance = "i2"
    peer.sessions.clear()
    wait_until(lambda: recovered, timeout=5, interval=0.02)
    assert recovered == ["i1"] and (conn.instance, conn.session) == ("i2", "s2")


# ----------------------------------------------------------------------- give_back, closing


@pytest.mark.parametrize("opened", [True, False])
@pytest.mark.parametrize("code", [None, ErrorCode.UNKNOWN_LEASE, ErrorCode.UNKNOWN_SESSION])
def test_give_back_sends_a_release_and_swallows_errors(peer, connect, opened, code):
    """A lease the client never handed out goes back as best effort: no error escapes, and a
    lost session is not renewed for it."""
    conn = connect()
    if code is not None:
        peer.script = lambda peer, got: peer.fail(got, code)
    conn.give_back("L1", opened=opened)
    assert peer.ops() == ["hello", "release"]
    release = peer.of(Release)[0].request
    assert (release.lease, release.opened, release.session) == ("L1", opened, "s1")


def test_give_back_after_close_swallows_errors(peer, connect):
    """A lease dropped by a thread racing close() must not raise from give_back."""
    conn = connect()
    conn.close()
    conn.give_back("L1")
    assert peer.ops() == ["hello", "bye"]


def test_close_says_bye_once_and_then_refuses(peer, connect):
    """close() ends the session; it is idempotent, and requests afterwards send nothing."""
    conn = connect()
    conn.close()
    conn.close()
    assert conn.closed
    assert peer.ops() == ["hello", "bye"] and peer.of(Bye)[0].request.session == "s1"
    error = raises_code(ErrorCode.CLIENT_CLOSED, lambda: conn.request(Stats()))
    assert "closed" in error.message
    assert peer.ops() == ["hello", "bye"]


def test_close_from_another_thread_ends_a_waiting_request(peer, connect):
    """A request waiting on a silent daemon fails with CLIENT_CLOSED when the client closes."""
    conn = connect()
    peer.script = lambda peer, got: peer.answer(got) if isinstance(got.request, Bye) else None
    outcome: list[Any] = []

    def ask() -> None:
        try:
            outcome.append(conn.request(Stats(), timeout=30))
        except Exception as exc:
            outcome.append(exc)

    asker = threading.Thread(target=ask)
    asker.start()
    wait_until(lambda: peer.of(Stats), timeout=5, interval=0.01)
    conn.close()
    asker.join(5)
    assert not asker.is_alive()
    (error,) = outcome
    assert isinstance(error, LoraCacheError) and error.code is ErrorCode.CLIENT_CLOSED


def test_close_opens_no_new_session(peers, connect):
    """A heartbeat that lands after the daemon took the Bye must not renew the session."""
    peer = peers(ttl=0.15)

    bye: list[Received] = []

    def slow_bye(peer: Peer, got: Received) -> None:
        if isinstance(got.request, Bye):  # the session ends at once; the reply is slow
            peer.sessions.discard(got.request.session)
            bye.append(got)  # answered after a new hello, else never (close waits 1 s)
            return
        peer.answer(got)
        if isinstance(got.request, Hello) and bye:
            peer.reply(bye[0], Done())

    peer.script = slow_bye
    conn = connect(heartbeat=True)
    recovered: list[str] = []
    conn.on_recover = recovered.append
    conn.close()
    assert peer.ops().count("hello") == 1 and not recovered
    assert peer.sessions == set()


def test_abandon_lets_the_heartbeat_thread_say_bye_and_close(peer, connect):
    """abandon() from any thread only tells the heartbeat thread, which ends the session."""
    conn = connect(heartbeat=True)
    conn.abandon(bye=True)
    assert conn.closed
    wait_until(lambda: not heartbeat_threads(), timeout=5, interval=0.01)
    (bye,) = peer.of(Bye)
    assert bye.request.session == "s1" and bye.identity != peer.received[0].identity


@pytest.mark.parametrize("heartbeat", [True, False])
def test_abandon_without_bye_says_nothing(peer, sock_dir, heartbeat):
    """abandon(bye=False): leases are still mapped, so the session must lapse by its TTL."""
    conn = Connection(sock_dir / "d.sock", connect_timeout=2, request_timeout=5,
                      heartbeat=heartbeat, session=True)
    conn.abandon(bye=False)
    wait_until(lambda: not heartbeat_threads(), timeout=5, interval=0.01)
    assert conn.closed and peer.ops() == ["hello"]
    del conn
    gc.collect()


def test_abandon_without_bye_closes_the_sockets(peer, sock_dir):
    """Not saying Bye is about the session; the sockets and context must still be closed."""
    conn = Connection(sock_dir / "d.sock", connect_timeout=2, request_timeout=5,
                      heartbeat=True, session=True)
    conn.abandon(bye=False)
    wait_until(lambda: not heartbeat_threads(), timeout=5, interval=0.01)
    leaked: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        del conn
        for _ in range(3):  # a warning holds its socket, which holds the context: free, again
            gc.collect()
            leaked += [str(w.message) for w in caught]
            caught.clear()
    assert leaked == []


def test_abandon_without_a_heartbeat_thread_says_bye_itself(peer, connect):
    """No thread to hand the job to: abandon() says Bye and closes right away."""
    conn = connect()
    conn.abandon(bye=True)
    assert conn.closed and peer.ops() == ["hello", "bye"]


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_cannot_use_the_connection_and_close_leaves_the_parents(peer, connect):
    """After fork() the child gets CLIENT_CLOSED and its close() sends no Bye; the parent's
    connection and session carry on."""
    conn = connect(heartbeat=True)
    child = os.fork()
    if child == 0:  # report through the exit status only, and exit at once
        status = 1
        try:
            try:
                conn.request(Stats())
                status = 2
            except LoraCacheError as exc:
                status = 0 if exc.code is ErrorCode.CLIENT_CLOSED else 3
            conn.close()
            if not conn.closed:
                status = 4
        finally:
            os._exit(status)
    deadline = time.monotonic() + 10
    while (waited := os.waitpid(child, os.WNOHANG)) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
            pytest.fail("the child hung")
        time.sleep(0.01)
    assert os.waitstatus_to_exitcode(waited[1]) == 0
    assert conn.request(Stats()) == STATS
    assert peer.ops() == ["hello", "stats"]

