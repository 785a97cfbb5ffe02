"""Cache policy, quotas, sessions and counters of the service, proven in-process.

What tests/integration/test_cache_policy.py, test_sessions.py and test_faults.py prove with
real daemons and clients in seconds, proven here in milliseconds: a CacheService over the real
shared-memory transport, fed requests through ``handle`` on one event loop. Time past a session
TTL is a fake clock in the sessions module, never a sleep.
"""

from __future__ import annotations

import asyncio
import dataclasses
import grp
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from loracache.daemon import sessions as sessions_module
from loracache.shared.errors import ErrorCode, LoraCacheError
from loracache.shared.protocol import (
    Acquire,
    Bye,
    Clear,
    Done,
    DropResult,
    EntryInfo,
    Evict,
    Heartbeat,
    Preload,
    Probe,
    Release,
    Stats,
    StatsResult,
)
from tests.daemon.service_node import ENTRY, TTL, in_loop, stem

class Clock:
    def __init__(self) -> None:
        self.now = time.monotonic()

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """The sessions module's clock, moved by hand (the event loop keeps the real one)."""
    fake = Clock()
    monkeypatch.setattr(sessions_module, "time", fake)
    return fake


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


# ------------------------------------------------------------------------ waiting for room


@pytest.mark.parametrize("freed_by", ["release", "bye", "expiry"])
@in_loop
async def test_an_acquire_that_does_not_fit_waits_until_the_lease_ends(make_node, clock,
                                                                        freed_by):
    """It neither fails nor evicts the leased entry: it completes, as a miss, once the lease
    ends by release, Bye or expiry (the service wakes waiters on each)."""
    node = make_node(max_bytes=ENTRY, acquire_timeout=30)
    holder, waiter = await node.hello(), await node.hello()
    held = await node.lease("a", holder)
    waiting = asyncio.ensure_future(node.lease("b", waiter))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    assert await node.names() == {"a"} and node.stats().reserved == 0
    if freed_by == "release":
        await node.release(held, holder)
    elif freed_by == "bye":
        await node.ask(Bye(), holder)
    else:
        clock.advance(TTL + 1)
        await node.ask(Heartbeat(), waiter)  # the waiter's client heartbeats meanwhile
        node.service.expire_sessions()
    got = await asyncio.wait_for(waiting, 10)
    assert stem(got.entry) == "b" and await node.names() == {"b"}
    stats = node.stats()
    assert (stats.misses, stats.hits, stats.loads, stats.evictions) == (2, 0, 2, 1)
    assert (stats.leases, stats.used, stats.leased_bytes) == (1, ENTRY, ENTRY)


@in_loop
async def test_cache_full_after_the_acquire_timeout_says_what_to_do(make_node):
    node = make_node(max_bytes=ENTRY, acquire_timeout=0.2)
    session = await node.hello()
    held = await node.lease("a", session)
    started = time.monotonic()
    full = await node.refused(Acquire(path=node.lora("b")), session)
    assert time.monotonic() - started >= 0.2  # it waited for a release first
    assert full.code is ErrorCode.CACHE_FULL
    for part in (f"budget {ENTRY}", f"used {ENTRY}", f"leased {ENTRY}", "pinned 0",
                 "loading 0", "release leases", "--max-bytes", "acquire_timeout"):
        assert part in full.message
    stats = node.stats()
    assert (stats.entries, stats.reserved, stats.loads, stats.misses) == (1, 0, 1, 1)
    await node.release(held, session)
    await node.release(await node.lease("b", session), session)  # room again once released
    assert await node.names() == {"b"}


@in_loop
async def test_too_large_fails_at_once_without_waiting_for_room(make_node):
    node = make_node(max_bytes=ENTRY - 1, acquire_timeout=30)
    session = await node.hello()
    too_large = await asyncio.wait_for(node.refused(Acquire(path=node.lora("a")), session), 10)
    assert too_large.code is ErrorCode.TOO_LARGE
    assert f"needs {ENTRY} bytes" in too_large.message and f"is {ENTRY - 1}" in too_large.message
    assert "raise --max-bytes" in too_large.message
    stats = node.stats()
    assert (stats.used, stats.reserved, stats.entries, stats.loads) == (0, 0, 0, 0)


@in_loop
async def test_least_recently_used_idle_entry_is_evicted_first(make_node):
    node = make_node(max_bytes=3 * ENTRY)
    session = await node.hello()
    for name in "abc":
        await node.release(await node.lease(name, session), session)
    await node.release(await node.lease("a", session), session)  # a is newer than b now
    await node.release(await node.lease("d", session), session)
    assert await node.names() == {"a", "c", "d"}
    await node.ask(Preload(path="c.safetensors"))  # a preload that finds c uses it too
    await node.release(await node.lease("e", session), session)
    assert await node.names() == {"c", "d", "e"}
    stats = node.stats()
    assert (stats.evictions, stats.hits, stats.misses, stats.loads) == (2, 1, 5, 5)
    assert stats.used == 3 * ENTRY == stats.budget


@in_loop
async def test_the_budget_holds_and_a_leased_entry_is_never_evicted(make_node):
    node = make_node(max_bytes=3 * ENTRY, acquire_timeout=0)
    session = await node.hello()
    held = await node.lease("held", session)
    for i in range(8):
        await node.release(await node.lease(f"f{i}", session), session)
        stats = node.stats()
        assert stats.used <= stats.budget
        assert "held" in await node.names()
    assert node.stats().evictions == 6  # two idle slots beside the leased entry
    assert Path(held.handle["path"]).exists()
    await node.release(held, session)


@in_loop
async def test_a_pinned_entry_stays_until_evicted_by_name(make_node):
    """Pinned plus leased fill the budget: CACHE_FULL, not eviction; an admin evict of the
    pinned entry makes room, and wakes an acquire waiting for it."""
    node = make_node(max_bytes=2 * ENTRY, acquire_timeout=0)
    session = await node.hello()
    pinned = await node.ask(Preload(path=node.lora("pinned"), pin=True))
    assert isinstance(pinned, EntryInfo) and pinned.pinned and pinned.leases == 0
    for i in range(3):
        await node.release(await node.lease(f"f{i}", session), session)
    assert await node.names() == {"pinned", "f2"}
    assert node.stats().pinned_bytes == ENTRY
    held = await node.lease("f2", session)
    full = await node.refused(Acquire(path=node.lora("f9")), session)
    assert full.code is ErrorCode.CACHE_FULL and f"pinned {ENTRY}" in full.message
    node.service.reconfigure(dataclasses.replace(node.service.config, acquire_timeout=30))
    waiting = asyncio.ensure_future(node.lease("f9", session))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    assert await node.ask(Evict(path="pinned.safetensors")) == DropResult(evicted=1, busy=0)
    assert stem((await asyncio.wait_for(waiting, 10)).entry) == "f9"
    assert await node.names() == {"f2", "f9"} and node.stats().pinned_bytes == 0
    await node.release(held, session)


@in_loop
async def test_storage_that_runs_out_first_evicts_idle_entries_and_retries(make_node):
    """A tmpfs smaller than the budget: the load evicts idle entries one by one and retries;
    with none idle, CACHE_FULL names the storage, and no partial entry stays."""
    node = make_node(max_bytes=64 * ENTRY, acquire_timeout=0, capacity=4 * ENTRY)
    session = await node.hello()
    for name, seed in zip("abcd", range(1, 5)):
        node.lora(name, units=1.5, seed=seed)
    await node.release(await node.lease("a", session), session)  # idle: the one to evict
    b = await node.lease("b", session)
    c = await node.lease("c", session)  # 4.5 units would not fit: a goes, c loads
    assert await node.names() == {"b", "c"} and node.stats().evictions == 1
    full = await node.refused(Acquire(path="d.safetensors"), session)
    assert full.code is ErrorCode.CACHE_FULL
    assert "no space left" in full.message and str(node.transport.directory) in full.message
    stats = node.stats()
    assert (stats.entries, stats.used, stats.reserved) == (2, 3 * ENTRY, 0)
    await node.release(b, session)
    d = await node.lease("d", session)  # b is idle now: evicted, d fits
    assert await node.names() == {"c", "d"} and node.stats().evictions == 2
    assert Path(c.handle["path"]).read_bytes() == bytes(torch.full((1536,), 3.0).numpy())
    await node.release(c, session)
    await node.release(d, session)


@in_loop
async def test_cache_size_caps_idle_entries_and_zero_shares_only_while_leased(make_node):
    capped = make_node(max_bytes=64 * ENTRY, cache_size=2)
    session = await capped.hello()
    for name in "abcd":
        await capped.release(await capped.lease(name, session), session)
    assert await capped.names() == {"c", "d"} and capped.stats().cache_size == 2

    none_kept = make_node(max_bytes=64 * ENTRY, cache_size=0)
    session = await none_kept.hello()
    first, second = await none_kept.lease("a", session), await none_kept.lease("a", session)
    assert first.entry.id == second.entry.id and none_kept.stats().loads == 1
    await none_kept.release(first, session)
    assert await none_kept.names() == {"a"}
    await none_kept.release(second, session)
    assert await none_kept.names() == set() and none_kept.stats().used == 0


# ----------------------------------------------------------------------------------- quotas


@in_loop
async def test_session_max_leases_refuses_one_lease_too_many(make_node):
    node = make_node(max_bytes=64 * ENTRY, session_max_leases=2)
    greedy, other = await node.hello(), await node.hello()
    first = await node.lease("a", greedy)
    await node.lease("a", greedy)  # the same entry twice is two leases
    refused = await node.refused(Acquire(path="a.safetensors"), greedy)
    assert refused.code is ErrorCode.NOT_ALLOWED
    assert refused.message == ("this session holds 2 leases, the most one session may hold "
                               "(session_max_leases = 2); release some first")
    await node.lease("a", other)  # per session: the others are not limited by it
    await node.release(first, greedy)
    await node.lease("a", greedy)
    stats = node.stats()
    assert (stats.leases, stats.hits, stats.misses) == (3, 3, 1)  # a refusal is no hit


@in_loop
async def test_session_max_bytes_counts_distinct_entries_a_session_holds(make_node):
    node = make_node(max_bytes=64 * ENTRY, session_max_bytes=ENTRY * 3 // 2)
    session, other = await node.hello(), await node.hello()
    a = await node.lease("a", session)
    again = await node.lease("a", session)  # one entry twice costs no more memory
    refused = await node.refused(Acquire(path=node.lora("b")), session)
    assert refused.code is ErrorCode.NOT_ALLOWED
    assert f"would make this session hold {2 * ENTRY} bytes on cpu" in refused.message
    assert f"over session_max_bytes ({ENTRY * 3 // 2})" in refused.message
    assert "release leases first" in refused.message
    await node.lease("b", other)
    await node.release(a, session)
    await node.release(again, session)
    await node.lease("b", session)  # released bytes no longer count
    stats = node.stats()
    assert (stats.leases, stats.loads, stats.misses, stats.hits) == (2, 2, 1, 3)


@in_loop
async def test_a_session_at_its_lease_quota_makes_the_daemon_load_nothing(make_node):
    node = make_node(max_bytes=64 * ENTRY, cache_size=0, session_max_leases=1)
    session = await node.hello()
    await node.lease("a", session)
    refused = await node.refused(Acquire(path=node.lora("b")), session)
    assert refused.code is ErrorCode.NOT_ALLOWED
    assert await node.names() == {"a"} and node.stats().loads == 1


@in_loop
async def test_a_load_refused_by_the_lease_quota_stays_within_cache_size(make_node):
    """Two acquires of one session race past the up-front check: the second, refused once
    loaded, leaves no idle entry beyond cache_size."""
    node = make_node(max_bytes=64 * ENTRY, cache_size=0, session_max_leases=1)
    session = await node.hello()
    paths = [node.lora("a"), node.lora("b")]
    outcomes = await asyncio.gather(*(node.ask(Acquire(path=p), session) for p in paths),
                                    return_exceptions=True)
    refused = [o for o in outcomes if isinstance(o, LoraCacheError)]
    assert len(refused) == 1 and refused[0].code is ErrorCode.NOT_ALLOWED
    assert node.stats().loads == 2 and len(await node.names()) == 1


@pytest.fixture
def admin_settings(tmp_path: Path) -> dict[str, Any]:
    """An admin socket owned by this process's group: the main socket serves no admin ops."""
    return {"admin_socket": str(tmp_path / "admin.sock"),
            "admin_group": grp.getgrgid(os.getgid()).gr_name}


@in_loop
async def test_admin_operations_are_refused_off_the_admin_socket(make_node, admin_settings,
                                                                 tmp_path):
    node = make_node(max_bytes=64 * ENTRY, **admin_settings)
    node.lora("a")
    for request in (Evict(path="a.safetensors"), Clear(),
                    Preload(path="a.safetensors", pin=True)):
        refused = await node.refused(request, admin=False)
        assert refused.code is ErrorCode.NOT_ALLOWED
        assert f"{request.op}{' --pin' if isinstance(request, Preload) else ''} is served on " \
               f"the admin socket {tmp_path / 'admin.sock'} only" in refused.message
    assert node.stats().loads == 0  # refused before anything was loaded
    preloaded = await node.ask(Preload(path="a.safetensors"), admin=False)  # unpinned: anyone
    assert not preloaded.pinned
    pinned = await node.ask(Preload(path="a.safetensors", pin=True), admin=True)
    assert pinned.pinned and pinned.id == preloaded.id
    assert await node.ask(Evict(path="a.safetensors"), admin=True) == DropResult(1, 0)
    assert await node.ask(Clear(), admin=True) == DropResult(0, 0)


# ------------------------------------------------------------------------ sessions, expiry


@in_loop
async def test_session_ops_with_an_unknown_session_are_refused(make_node):
    node = make_node()
    node.lora("a")
    for token in ("not-a-session", ""):
        for request in (Acquire(path="a.safetensors"), Release(lease="x"), Heartbeat(), Bye(),
                        Probe()):
            refused = await node.refused(request, token)
            assert refused.code is ErrorCode.UNKNOWN_SESSION, request
            assert "send hello again" in refused.message
        assert isinstance(await node.ask(Stats(), token), StatsResult)  # needs no session
    assert node.stats().loads == 0


@in_loop
async def test_unknown_foreign_or_released_leases_are_unknown(make_node):
    node = make_node()
    mine, theirs = await node.hello(), await node.hello()
    lease = await node.lease("a", theirs)
    for session, lease_id in ((mine, "no-such-lease"), (mine, lease.lease)):
        refused = await node.refused(Release(lease=lease_id), session)
        assert refused.code is ErrorCode.UNKNOWN_LEASE
        assert "released already or belongs to another session" in refused.message
    assert node.stats().leases == 1  # another session cannot release it
    await node.release(lease, theirs)
    again = await node.refused(Release(lease=lease.lease), theirs)
    assert again.code is ErrorCode.UNKNOWN_LEASE and node.stats().leases == 0


@in_loop
async def test_bye_releases_every_lease_of_the_session_at_once(make_node):
    node = make_node(max_bytes=64 * ENTRY)
    session, bystander = await node.hello(), await node.hello()
    for name in "aab":
        await node.lease(name, session)
    kept = await node.lease("a", bystander)
    service_stats = node.service.stats()
    assert (service_stats.sessions, service_stats.leases) == (2, 4)
    assert node.stats().sessions == 2  # both hold leases on cpu
    assert await node.ask(Bye(), session) == Done()
    service_stats = node.service.stats()
    assert (service_stats.sessions, service_stats.leases) == (1, 1)
    assert node.stats().leased_bytes == ENTRY and node.stats().sessions == 1
    assert (await node.refused(Heartbeat(), session)).code is ErrorCode.UNKNOWN_SESSION
    assert await node.ask(Clear()) == DropResult(evicted=1, busy=1)  # b idle, a still lent
    await node.release(kept, bystander)


@in_loop
async def test_expiry_releases_silent_sessions_and_their_entries_become_evictable(make_node,
                                                                                  clock):
    """Only sessions silent for their TTL expire; any message, a stats one included, keeps a
    session alive. The process being alive means its exports are left to it."""
    node = make_node(max_bytes=2 * ENTRY, acquire_timeout=0)
    silent, chatty, stats_only = [await node.hello(pid=os.getpid()) for _ in range(3)]
    await node.lease("a", silent)
    await node.lease("b", chatty)
    for silent_for in (0.6, 1.2):  # TTLs since the silent session's last message
        clock.advance(TTL * 0.6)
        await node.ask(Heartbeat(), chatty)
        await node.ask(Stats(), stats_only)
        node.service.expire_sessions()
        if silent_for < 1:
            assert node.service.stats().sessions == 3 and node.stats().leases == 2
    assert set(node.service.sessions.sessions) == {chatty, stats_only}
    assert (await node.refused(Heartbeat(), silent)).code is ErrorCode.UNKNOWN_SESSION
    assert node.stats().leases == 1 and node.transport.forgotten == []
    c = await node.lease("c", chatty)  # a is idle now: evicted to make room
    assert await node.names() == {"b", "c"} and c.entry.leases == 1


@in_loop
async def test_a_dead_clients_leases_end_with_its_ttl_and_its_exports_are_undone(make_node,
                                                                                 clock):
    """A killed worker's leases stay until its TTL (it might be slow, not dead); then they
    are released and, its process being gone, their exports are undone by the daemon."""
    node = make_node(max_bytes=ENTRY, acquire_timeout=0)
    dead, alive = await node.hello(pid=dead_pid()), await node.hello()
    first = await node.lease("a", dead)
    second = await node.lease("a", dead)
    full = await node.refused(Acquire(path=node.lora("b")), alive)  # a is leased still
    assert full.code is ErrorCode.CACHE_FULL
    node.service.expire_sessions()
    assert node.stats().leases == 2  # dead, but not silent for its TTL yet
    clock.advance(TTL + 1)
    await node.ask(Heartbeat(), alive)
    node.service.expire_sessions()
    assert node.stats().leases == 0 and node.service.stats().sessions == 1
    assert node.transport.forgotten == [first.handle, second.handle]
    await node.release(await node.lease("b", alive), alive)  # a was evictable
    assert await node.names() == {"b"}


@in_loop
async def test_a_session_that_expires_while_its_entry_loads_gets_no_lease(make_node, clock):
    node = make_node()
    session = await node.hello()
    loading = asyncio.ensure_future(node.lease("a", session))
    await asyncio.sleep(0)  # the acquire is under way: its load runs on a thread
    clock.advance(TTL + 1)
    node.service.expire_sessions()
    expired = await asyncio.wait_for(asyncio.gather(loading, return_exceptions=True), 10)
    assert isinstance(expired[0], LoraCacheError)
    assert expired[0].code is ErrorCode.UNKNOWN_SESSION
    stats = node.stats()
    assert (stats.leases, stats.leased_bytes, stats.entries, stats.loads) == (0, 0, 1, 1)
    assert (stats.hits, stats.misses) == (0, 0)  # no acquire succeeded


# ---------------------------------------------------------------- counters and drop results


@in_loop
async def test_stats_follow_hits_misses_loads_evictions_leases_and_bytes(make_node):
    node = make_node(max_bytes=2 * ENTRY)
    session = await node.hello()
    before = node.stats()
    assert (before.hits, before.misses, before.loads, before.evictions, before.used,
            before.hit_rate) == (0, 0, 0, 0, 0, None)
    a = await node.lease("a", session)  # miss
    a2 = await node.lease("a", session)  # hit
    assert a.entry.id == a2.entry.id and a2.entry.leases == 2
    stats = node.stats()
    assert (stats.hits, stats.misses, stats.loads, stats.leases, stats.entries) == (1, 1, 1, 2, 1)
    assert (stats.used, stats.leased_bytes, stats.hit_rate) == (ENTRY, ENTRY, 0.5)
    assert stats.load_seconds.count == 1
    info = await node.ask(Preload(path=node.lora("b")))  # a load, but no acquire
    assert (info.nbytes, info.leases, info.pinned) == (ENTRY, 0, False)
    assert (await node.ask(Preload(path="b.safetensors"))).id == info.id  # cached: no load
    stats = node.stats()
    assert (stats.hits, stats.misses, stats.loads, stats.used) == (1, 1, 2, 2 * ENTRY)
    await node.release(a, session)
    await node.release(a2, session)
    await node.lease("c", session)  # evicts a: the least recently used
    stats = node.stats()
    assert (stats.misses, stats.loads, stats.evictions, stats.leases) == (2, 3, 1, 1)
    assert (stats.used, stats.leased_bytes, stats.entries) == (2 * ENTRY, ENTRY, 2)
    assert node.service.stats().leases == 1


@in_loop
async def test_preload_evict_and_clear_report_what_they_did(make_node):
    node = make_node(max_bytes=64 * ENTRY)
    session = await node.hello()
    info = await node.ask(Preload(path=node.lora("a"), pin=True))
    assert isinstance(info, EntryInfo)
    assert (stem(info), info.device, info.layout, info.nbytes, info.pinned) == (
        "a", "cpu", "raw", ENTRY, True)
    b = await node.lease("b", session)
    await node.release(await node.lease("c", session), session)
    assert await node.ask(Evict(path="b.safetensors")) == DropResult(evicted=0, busy=1)
    assert await node.ask(Evict(path="gone.safetensors")) == DropResult(evicted=0, busy=0)
    outside = await node.refused(Evict(path="/etc/passwd"))
    assert outside.code is ErrorCode.FORBIDDEN_PATH
    assert await node.ask(Clear()) == DropResult(evicted=2, busy=1)  # the pinned one too
    assert await node.names() == {"b"}
    stats = node.stats()
    assert (stats.pinned_bytes, stats.used, stats.evictions) == (0, ENTRY, 2)
    await node.release(b, session)
    assert await node.ask(Clear(device="cpu")) == DropResult(evicted=1, busy=0)
    assert node.stats().used == 0
    unknown = await node.refused(Clear(device="cuda:1"))
    assert unknown.code is ErrorCode.UNKNOWN_DEVICE
