"""The disk tier's bookkeeping when requests, downloads and looks at the source overlap, in
process: a DiskCache with the real obstore client against a real HTTP server in the test, whose
HEAD answers can be held back to order the events."""

from __future__ import annotations

import asyncio
import http.server
import threading
from pathlib import Path
from typing import Awaitable, Callable, Iterator

import pytest
import torch
from safetensors.torch import save

from loracache.daemon.disk_cache import DiskCache
from loracache.daemon.remotes import Remotes
from loracache.daemon.sources import parse_source
from tests.support import serving


class Origin(http.server.ThreadingHTTPServer):
    """``files`` by name, each with the ETag in ``etags``; a HEAD of a name in ``held`` waits
    until its event is set."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), OriginHandler)
        self.files: dict[str, bytes] = {}
        self.etags: dict[str, str] = {}
        self.held: dict[str, threading.Event] = {}
        self.status: dict[str, int] = {}  # a name answered with this status instead

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server_port}/{name}.safetensors"


class OriginHandler(http.server.BaseHTTPRequestHandler):
    server: Origin

    def do_HEAD(self) -> None:  # noqa: N802 (http.server's naming)
        name = self.name
        if name in self.server.held:
            self.server.held[name].wait(10)
        self.reply(name, body=False)

    def do_GET(self) -> None:  # noqa: N802
        self.reply(self.name, body=True)

    @property
    def name(self) -> str:
        return self.path.lstrip("/").removesuffix(".safetensors")

    def reply(self, name: str, body: bool) -> None:
        status = self.server.status.get(name, 200 if name in self.server.files else 404)
        data = self.server.files.get(name, b"") if status == 200 else b""
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        if status == 200:
            self.send_header("ETag", f'"{self.server.etags[name]}"')
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def origin() -> Iterator[Origin]:
    server = Origin()
    with serving(server, unblock=lambda: [event.set() for event in server.held.values()]):
        yield server


def lora(seed: int) -> bytes:
    return save({"w": torch.full((1000,), float(seed))})


def open_cache(directory: Path, origin: Origin, budget: int) -> DiskCache:
    directory.mkdir()
    return DiskCache(directory, budget=budget, min_free=0, revalidate_s=0.0,
                     remotes=Remotes({}, timeout_s=10))


async def fetched(cache: DiskCache, url: str) -> Path:
    """Fetch and give back at once (as an acquire that loaded from it would)."""
    path = await cache.fetch(parse_source(url))
    cache.done(path)
    return path


def run_closing(cache: DiskCache, scenario: Callable[[], Awaitable[None]]) -> None:
    """Run ``scenario`` on an event loop of its own, then close the cache whatever happened."""
    try:
        asyncio.run(scenario())
    finally:
        cache.close()


async def settled(cache: DiskCache) -> None:
    """Once nothing is downloaded or asked any more: no room is held for downloads."""
    while cache._inflight:
        await asyncio.sleep(0.01)
    assert cache._reserved == 0


def test_a_look_at_the_source_does_not_bring_back_a_file_evicted_meanwhile(origin, tmp_path):
    origin.files.update(a=lora(1), b=lora(2))
    origin.etags.update(a="1", b="2")
    cache = open_cache(tmp_path / "cache", origin, budget=len(lora(1)) * 3 // 2)  # one file

    async def scenario() -> None:
        first = await fetched(cache, origin.url("a"))
        origin.held["a"] = threading.Event()
        await fetched(cache, origin.url("a"))  # due: the HEAD starts, and is held
        await fetched(cache, origin.url("b"))  # room for b evicts a (and deletes its file)
        assert not first.exists() and list(cache.files) == [origin.url("b")]
        origin.held["a"].set()  # "same version": the evicted copy must stay evicted
        await settled(cache)
        assert list(cache.files) == [origin.url("b")]
        assert cache.files[origin.url("b")].path.exists()
        again = await fetched(cache, origin.url("a"))  # downloaded again, whole
        assert again.read_bytes() == origin.files["a"]

    run_closing(cache, scenario)


def test_a_version_that_comes_back_is_a_file_of_its_own(origin, tmp_path):
    """v1, v2, then v1 again while a holder still loads from the first v1: every download has
    a name of its own, so the holder's done() removes its file and nothing that is served."""
    origin.files["a"], origin.etags["a"] = lora(1), "1"
    cache = open_cache(tmp_path / "cache", origin, budget=1 << 20)

    async def scenario() -> None:
        held = await cache.fetch(parse_source(origin.url("a")))  # v1, still being loaded from
        origin.etags["a"] = "2"
        await fetched(cache, origin.url("a"))  # due: v2 is downloaded; v1 waits for its holder
        await settled(cache)
        origin.etags["a"] = "1"
        await fetched(cache, origin.url("a"))  # v1 again
        await settled(cache)
        served = cache.files[origin.url("a")].path
        assert served != held and held.exists()
        cache.done(held)  # the first holder is done: its file goes, the served one stays
        assert not held.exists()
        assert served.exists() and served.with_suffix(".json").exists()
        assert sorted(p.name for p in (tmp_path / "cache").glob("*.safetensors")) == [served.name]

    run_closing(cache, scenario)


@pytest.mark.parametrize("status, refusal", [(404, True), (403, True), (503, False)])
def test_a_copy_goes_when_its_source_says_twice_it_is_gone_and_stays_when_it_is_away(
        origin, tmp_path, status, refusal):
    """404: deleted at the source; 403: access revoked (twice in a row: once may be a
    credential being renewed); 503: the source is away for now."""
    origin.files["a"], origin.etags["a"] = lora(1), "1"
    cache = open_cache(tmp_path / "cache", origin, budget=1 << 20)

    async def scenario() -> None:
        path = await fetched(cache, origin.url("a"))
        origin.status["a"] = status
        for look in (1, 2):
            await fetched(cache, origin.url("a"))  # served while the source is asked
            await settled(cache)
            gone = refusal and look == 2
            assert (origin.url("a") in cache.files, path.exists()) == (not gone, not gone)
        origin.status.pop("a")
        if not refusal:  # a source back after being away: the copy was served all along
            await fetched(cache, origin.url("a"))
            await settled(cache)
            assert cache.files[origin.url("a")].path == path

    run_closing(cache, scenario)


def test_a_refusal_then_an_answer_starts_the_count_again(origin, tmp_path):
    origin.files["a"], origin.etags["a"] = lora(1), "1"
    cache = open_cache(tmp_path / "cache", origin, budget=1 << 20)

    async def scenario() -> None:
        path = await fetched(cache, origin.url("a"))
        for status in (403, None, 403):  # refused, answered, refused: never twice in a row
            if status is None:
                origin.status.pop("a")
            else:
                origin.status["a"] = status
            await fetched(cache, origin.url("a"))
            await settled(cache)
        assert cache.files[origin.url("a")].path == path and path.exists()

    run_closing(cache, scenario)


def test_a_copy_removed_behind_the_daemon_is_downloaded_again(origin, tmp_path):
    origin.files["a"], origin.etags["a"] = lora(1), "1"
    cache = open_cache(tmp_path / "cache", origin, budget=1 << 20)
    cache.revalidate_s = 300

    async def scenario() -> None:
        first = await fetched(cache, origin.url("a"))
        first.unlink()  # an operator, or a cleaner of old files
        again = await fetched(cache, origin.url("a"))
        assert again != first and again.read_bytes() == origin.files["a"]

    run_closing(cache, scenario)


def test_a_file_replaced_while_in_use_does_not_outlive_a_restart(origin, tmp_path):
    """v1 is held while v2 is downloaded; the daemon stops before v1's holder is done: at the
    next start only v2 is there."""
    origin.files["a"], origin.etags["a"] = lora(1), "1"
    directory = tmp_path / "cache"
    cache = open_cache(directory, origin, budget=1 << 20)

    async def scenario() -> Path:
        held = await cache.fetch(parse_source(origin.url("a")))
        origin.etags["a"], origin.files["a"] = "2", lora(2)
        await fetched(cache, origin.url("a"))
        await settled(cache)
        return held

    try:
        held = asyncio.run(scenario())
    finally:
        cache.close()
    assert not held.exists()
    again = DiskCache(directory, budget=1 << 20, min_free=0, revalidate_s=300,
                      remotes=Remotes({}, timeout_s=10))
    try:
        (only,) = again.files.values()
        assert only.path.read_bytes() == lora(2) and len(list(directory.glob("*.json"))) == 1
    finally:
        again.close()


def test_the_order_of_use_survives_a_restart(origin, tmp_path):
    origin.files.update(a=lora(1), b=lora(2))
    origin.etags.update(a="1", b="2")
    directory = tmp_path / "cache"
    cache = open_cache(directory, origin, budget=1 << 20)
    cache.revalidate_s = 300

    async def scenario() -> None:
        for name in "aba":  # a is fetched, b, then a is served again from disk
            await fetched(cache, origin.url(name))
            await asyncio.sleep(0.01)

    run_closing(cache, scenario)
    again = DiskCache(directory, budget=1 << 20, min_free=0, revalidate_s=300,
                      remotes=Remotes({}, timeout_s=10))
    try:
        assert list(again.files) == [origin.url("b"), origin.url("a")]  # least recent first
    finally:
        again.close()
