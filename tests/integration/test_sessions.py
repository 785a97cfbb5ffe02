"""Sessions and files changing under the cache, with real client processes."""

from __future__ import annotations

import gc
import os
import threading
import time

import pytest
import torch

from loracache.client import ErrorCode, LoraCacheClient, LoraCacheError
from loracache.shared.protocol import Release
from tests.support import Worker, wait_until, write_lora


def test_killed_client_loses_its_leases_after_the_ttl(start_daemon, lora_dir):
    daemon = start_daemon("--max-bytes", "1MiB", "--session-ttl", "3", "--acquire-timeout", "0")
    write_lora(lora_dir / "a.safetensors", {"w": torch.ones(300_000, dtype=torch.float16)})
    write_lora(lora_dir / "b.safetensors", {"w": torch.ones(300_000, dtype=torch.float16)})
    worker = Worker(daemon.socket)
    worker.call("acquire", path="a.safetensors")
    assert daemon.stats().leases == 1
    worker.kill()
    with daemon.client() as client:
        with pytest.raises(LoraCacheError) as full:  # a is still leased: b does not fit
            client.acquire("b.safetensors")
        assert full.value.code is ErrorCode.CACHE_FULL
        wait_until(lambda: daemon.stats().leases == 0, timeout=10)
        client.acquire("b.safetensors").release()  # a was evictable, so b fits now
        assert [e.path.endswith("b.safetensors") for e in client.list()] == [True]
    daemon.wait_for_log("expired")


def test_heartbeats_keep_an_idle_client_alive(start_daemon, lora_dir):
    daemon = start_daemon("--session-ttl", "0.5")
    write_lora(lora_dir / "a.safetensors", {"w": torch.ones(16)})
    with daemon.client() as client:
        lease = client.acquire("a.safetensors")
        time.sleep(2)  # four TTLs
        assert daemon.stats().leases == 1
        lease.release()


def test_rewritten_file_is_a_new_entry_and_old_leases_keep_working(daemon, lora_dir):
    path = write_lora(lora_dir / "a.safetensors", {"w": torch.zeros(1000)})
    with daemon.client() as client:
        old = client.acquire("a.safetensors")
        path.unlink()  # replace the file, as a trainer writing a new version does
        write_lora(path, {"w": torch.ones(1000), "extra": torch.ones(3)})
        new = client.acquire("a.safetensors")
        assert new.entry.id != old.entry.id
        assert torch.all(old.tensors["w"] == 0) and "extra" not in old.tensors
        assert torch.all(new.tensors["w"] == 1) and "extra" in new.tensors
        assert daemon.cpu_stats().entries == 2
        old.release()
        new.release()


def test_release_is_idempotent_and_foreign_leases_are_refused(daemon, lora_dir):
    write_lora(lora_dir / "a.safetensors", {"w": torch.ones(16)})
    with daemon.client() as mine, daemon.client() as theirs:
        lease = theirs.acquire("a.safetensors")
        with pytest.raises(LoraCacheError) as error:
            mine._request(Release(lease=lease.id))  # a lease id of another session
        assert error.value.code is ErrorCode.UNKNOWN_LEASE
        lease.release()
        lease.release()
        assert daemon.stats().leases == 0


def test_closing_a_client_releases_its_leases(daemon, lora_dir):
    write_lora(lora_dir / "a.safetensors", {"w": torch.ones(16)})
    client = daemon.client()
    client.acquire("a.safetensors")
    client.acquire("a.safetensors")
    stats = daemon.stats()
    assert stats.leases == 2 and stats.sessions == 2  # the client's and stats' own
    client.close()
    stats = daemon.stats()
    assert stats.leases == 0 and stats.sessions == 1  # the session ended with the client
    with pytest.raises(LoraCacheError) as error:
        client.acquire("a.safetensors")
    assert error.value.code is ErrorCode.CLIENT_CLOSED


def test_an_expired_session_is_renewed_with_its_leases(start_daemon, lora_dir):
    """A client silent past the TTL (no heartbeat thread here) finds its session gone: it opens
    a new one and leases its files again; a file that is gone by then leaves the lease to end
    locally, and releasing it is no error."""
    daemon = start_daemon("--session-ttl", "1")
    write_lora(lora_dir / "kept.safetensors", {"w": torch.arange(8.0)})
    gone = write_lora(lora_dir / "gone.safetensors", {"w": torch.arange(8.0)})
    with daemon.client(heartbeat=False) as client:
        kept, lost = client.acquire("kept.safetensors"), client.acquire("gone.safetensors")
        gone.unlink()
        wait_until(lambda: daemon.stats().leases == 0, timeout=10)
        assert client.verify_session()
        assert (kept.generation, kept.orphaned, lost.generation, lost.orphaned) == (
            1, False, 0, True)
        assert torch.equal(kept.tensors["w"], torch.arange(8.0))
        assert torch.equal(lost.tensors["w"], torch.arange(8.0))  # the old mapping stays
        assert daemon.cpu_stats().leases == 1
        lost.release()
        kept.release()
        assert daemon.cpu_stats().leases == 0


def test_a_lease_orphaned_once_and_renewed_later_is_given_back(start_daemon, lora_dir):
    """A renewal that fails (the file was away) orphans the lease; a later one that succeeds
    makes the daemon know it again, so releasing it gives it back there."""
    daemon = start_daemon("--session-ttl", "0.5")
    path = write_lora(lora_dir / "a.safetensors", {"w": torch.ones(16)})
    away = path.with_suffix(".away")
    with daemon.client(heartbeat=False) as client:
        lease = client.acquire("a.safetensors")
        for source, target, orphaned, generation in ((path, away, True, 0),
                                                     (away, path, False, 1)):
            source.rename(target)
            time.sleep(1.5)  # three TTLs without a message: the session expires
            assert client.verify_session()
            assert (lease.orphaned, lease.generation) == (orphaned, generation)
        assert daemon.cpu_stats().leases == 1
        lease.release()
        assert daemon.cpu_stats().leases == 0


def test_closing_a_client_ends_a_request_waiting_in_another_thread(start_daemon, lora_dir):
    """close() while another thread waits for cache space: that thread gets a LoraCacheError
    at once (not a ZeroMQ error, not the end of its timeout)."""
    daemon = start_daemon("--max-bytes", "1MiB", "--acquire-timeout", "20")
    for name in "ab":
        write_lora(lora_dir / f"{name}.safetensors",
                   {"w": torch.ones(300_000, dtype=torch.float16)})
    with daemon.client() as holder, holder.acquire("a.safetensors"):
        client = daemon.client()
        outcome: list[BaseException] = []

        def wait_for_room() -> None:
            try:
                client.acquire("b.safetensors")
            except BaseException as exc:  # recorded for the assertion below
                outcome.append(exc)

        waiter = threading.Thread(target=wait_for_room)
        waiter.start()
        time.sleep(1.0)
        started = time.monotonic()
        client.close()
        waiter.join(10)
        assert not waiter.is_alive() and time.monotonic() - started < 5
        (error,) = outcome
        assert isinstance(error, LoraCacheError) and error.code is ErrorCode.CLIENT_CLOSED
    assert daemon.stats().leases == 0


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_client_side_misuse_has_client_side_errors(daemon, lora_dir, tmp_path):
    """A socket path the kernel cannot take, a lease asked of a look-only client, and a client
    used after fork() fail with their own codes (or ValueError), not with daemon policy codes."""
    with pytest.raises(LoraCacheError) as too_long:
        LoraCacheClient(tmp_path / ("x" * 200) / "d.sock")
    assert too_long.value.code is ErrorCode.BAD_SOCKET_PATH
    write_lora(lora_dir / "a.safetensors", {"w": torch.ones(4)})
    with daemon.client(session=False) as looker, pytest.raises(ValueError):
        looker.acquire("a.safetensors")
    with daemon.client() as client:
        read, write = os.pipe()
        child = os.fork()
        if child == 0:  # the child reports the code it got, and exits at once
            try:
                client.stats()
                code = b"no error"
            except LoraCacheError as exc:
                code = exc.code.value.encode()
            os.write(write, code)
            os._exit(0)
        os.close(write)
        os.waitpid(child, 0)
        assert os.read(read, 64) == b"CLIENT_CLOSED"
        os.close(read)


def test_a_client_dropped_without_close_ends_its_session(daemon, lora_dir):
    """Its heartbeat thread holds the connection, not the client: once the client is garbage,
    its session ends (the lease it released stays released), rather than heartbeating on."""
    write_lora(lora_dir / "a.safetensors", {"w": torch.ones(4)})
    client = daemon.client()
    client.acquire("a.safetensors").release()
    assert daemon.stats().sessions == 2  # the client's and stats' own
    del client
    gc.collect()
    wait_until(lambda: daemon.stats().sessions == 1, timeout=5)


def heartbeats() -> int:
    return sum(t.name == "loracache-heartbeat" and t.is_alive() for t in threading.enumerate())


def test_a_client_dropped_with_the_leases_it_holds_ends_its_session(daemon, lora_dir):
    """The book holds leases weakly: a client and leases nobody holds are garbage together,
    the session ends at once (Bye releases the leases) and the mapping goes."""
    from loracache.client.lease import MAPPINGS

    write_lora(lora_dir / "a.safetensors", {"w": torch.ones(4)})
    before = heartbeats()
    client = daemon.client()
    lease = client.acquire("a.safetensors")
    key = (lease.instance, lease.entry.id)
    assert key in MAPPINGS._mappings and daemon.stats().leases == 1
    del client, lease
    gc.collect()
    wait_until(lambda: daemon.stats().sessions == 1 and daemon.stats().leases == 0, timeout=5)
    wait_until(lambda: heartbeats() == before, timeout=5)
    assert key not in MAPPINGS._mappings


def test_a_lease_still_held_keeps_its_client_and_session_alive(start_daemon, lora_dir):
    write_lora(lora_dir / "a.safetensors", {"w": torch.arange(4.0)})
    daemon = start_daemon("--session-ttl", "1")
    client = daemon.client()
    lease = client.acquire("a.safetensors")
    del client
    gc.collect()
    time.sleep(2.5)  # past the TTL: only heartbeats keep the session
    assert daemon.stats().leases == 1
    assert torch.equal(lease.tensors["w"], torch.arange(4.0))
    lease.release()
    assert daemon.stats().leases == 0


def test_a_process_that_exits_without_close_leaves_its_leases_to_expire(start_daemon, lora_dir):
    """At interpreter exit the client says nothing: its session lapses by the TTL, and the
    daemon, finding the process gone, undoes the exports its leases left (a Bye would have
    released them while the dying process might still map them)."""
    import subprocess
    import sys

    from tests.support import REPO

    write_lora(lora_dir / "a.safetensors", {"w": torch.ones(4)})
    daemon = start_daemon("--session-ttl", "1")
    script = ("import sys; from loracache.client import LoraCacheClient; "
              "lease = LoraCacheClient(sys.argv[1]).acquire('a.safetensors')")
    subprocess.run([sys.executable, "-c", script, str(daemon.socket)], check=True, timeout=60,
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    # No Bye at exit: the session ends by expiry (a Bye would log no expiry).
    daemon.wait_for_log("expired", timeout=15)
    wait_until(lambda: daemon.stats().leases == 0, timeout=10)
