"""LoRAs by URL: a real HTTP server in the test process, the real daemon downloading from it
into its disk cache, and real clients leasing what it downloaded."""

from __future__ import annotations

import collections
import hashlib
import http.server
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
import torch
from safetensors.torch import load_file, save

from loracache.client import ErrorCode, LoraCacheError
from tests.support import Daemon, serving, wait_until


class LoraServer(http.server.ThreadingHTTPServer):
    """Serves ``files`` under /files/, and the ways a source fails under other prefixes:
    /moved/ redirects to /files/, /private/ refuses, /cut/ stops half way, /missing/ 404s,
    /hang/ never answers, /stall/ sends half the file and then nothing (both until the server
    shuts down), /chunked/ sends the file in chunks with no length announced."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.files: dict[str, bytes] = {}
        self.gets: collections.Counter[str] = collections.Counter()
        self.heads: collections.Counter[str] = collections.Counter()
        self.headers: list[tuple[str, dict[str, str]]] = []  # (path, headers) of each request
        self.elsewhere = ""  # /away/ redirects to this base URL's /files/
        self.stopping = threading.Event()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"


class Handler(http.server.BaseHTTPRequestHandler):
    server: LoraServer

    def do_HEAD(self) -> None:  # noqa: N802 (http.server's naming)
        self.server.heads[self.path] += 1
        self.answer(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self.server.gets[self.path] += 1
        self.answer(body=True)

    def answer(self, body: bool) -> None:
        self.server.headers.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
        kind, _, name = self.path.lstrip("/").partition("/")
        data = self.server.files.get(name)
        if kind == "hang":
            self.server.stopping.wait()
            return
        if kind == "chunked" and data is not None:
            self.protocol_version = "HTTP/1.1"  # chunked transfer exists from HTTP/1.1 on
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if body:
                for start in range(0, len(data), 1024):
                    piece = data[start:start + 1024]
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.wfile.write(b"0\r\n\r\n")
            self.close_connection = True
            return
        if kind in ("moved", "away"):
            self.send_response(302)
            self.send_header("Location", f"{self.server.elsewhere if kind == 'away' else ''}"
                                         f"/files/{name}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if kind == "private":
            self.send_response(401)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if data is None or kind not in ("files", "cut", "stall"):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()[:16]}"')
        self.end_headers()
        if body:
            self.wfile.write(data if kind == "files" else data[:len(data) // 2])
            if kind == "stall":
                self.wfile.flush()
                self.server.stopping.wait()
            if kind != "files":
                self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[LoraServer]:
    srv = LoraServer()
    with serving(srv, unblock=srv.stopping.set):
        yield srv


def lora_bytes(seed: int) -> bytes:
    generator = torch.Generator().manual_seed(seed)
    return save({"w.lora_down.weight": torch.randn(8, 64, generator=generator),
                 "w.lora_up.weight": torch.randn(64, 8, generator=generator)})


def big_lora_bytes(seed: int) -> bytes:
    """A LoRA file of 1 MiB and more: half of it is more than a few network packets."""
    generator = torch.Generator().manual_seed(seed)
    return save({"w.lora_down.weight": torch.randn(8, 64, generator=generator),
                 "w.lora_up.weight": torch.randn(64, 8, generator=generator),
                 "w.padding": torch.zeros(1 << 18)})


@pytest.fixture
def remote_daemon(start_daemon, server, cache_dir):
    def start(*flags: str, **kwargs) -> Daemon:
        allowed = [arg for kind in ("files", "moved", "cut", "private", "missing", "hang",
                                    "stall", "chunked")
                   for arg in ("--allow-source", f"{server.base}/{kind}/")]
        return start_daemon(*allowed, "--cache-dir", str(cache_dir), *flags, **kwargs)
    return start


def downloads(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.glob("*.safetensors"))


def test_a_url_outside_allow_sources_is_refused_and_never_fetched(remote_daemon, server):
    server.files["a.safetensors"] = lora_bytes(0)
    daemon = remote_daemon()
    with daemon.client() as client, pytest.raises(LoraCacheError) as error:
        client.acquire(f"{server.base}/elsewhere/a.safetensors")
    assert error.value.code is ErrorCode.FORBIDDEN_SOURCE
    assert "allow_sources" in error.value.message
    assert not server.gets and not server.heads


def test_a_url_is_downloaded_once_however_many_ask(remote_daemon, server, cache_dir):
    data = lora_bytes(1)
    server.files["a.safetensors"] = data
    url = f"{server.base}/files/a.safetensors"
    daemon = remote_daemon()
    with daemon.client() as client:
        results: list = [None] * 4

        def acquire(i: int) -> None:
            results[i] = client.acquire(url)

        threads = [threading.Thread(target=acquire, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        expected = load_file(downloads(cache_dir)[0])
        for lease in results:
            assert {k: torch.equal(v, expected[k]) for k, v in lease.tensors.items()} == {
                "w.lora_down.weight": True, "w.lora_up.weight": True}
            lease.release()
        client.acquire(url).release()  # a hit: served from the cache
    assert server.gets["/files/a.safetensors"] == 1
    assert [p.read_bytes() for p in downloads(cache_dir)] == [data]
    assert daemon.cpu_stats().loads == 1


def test_redirects_are_followed(remote_daemon, server, cache_dir):
    server.files["a.safetensors"] = lora_bytes(2)
    daemon = remote_daemon()
    with daemon.client() as client, client.acquire(f"{server.base}/moved/a.safetensors") as lease:
        assert set(lease.tensors) == {"w.lora_down.weight", "w.lora_up.weight"}
    assert server.gets["/files/a.safetensors"] == 1


@pytest.mark.parametrize("kind, content, code", [
    ("missing", b"", ErrorCode.NOT_FOUND),
    ("private", b"", ErrorCode.SOURCE_DENIED),
    ("cut", None, ErrorCode.SOURCE_FAILED),
    ("files", b"\x08" + b"\x00" * 7 + b"not json" * 4, ErrorCode.INVALID_LORA),
])
def test_a_failed_download_leaves_nothing_behind(remote_daemon, server, cache_dir, kind,
                                                 content, code):
    server.files["a.safetensors"] = lora_bytes(3) if content is None else content
    daemon = remote_daemon()
    with daemon.client() as client:
        with pytest.raises(LoraCacheError) as error:
            client.acquire(f"{server.base}/{kind}/a.safetensors")
        assert error.value.code is code, error.value
        assert f"{kind}/a.safetensors" in error.value.message
        assert downloads(cache_dir) == [] and list((cache_dir / ".partial").iterdir()) == []
        server.files["b.safetensors"] = lora_bytes(4)
        client.acquire(f"{server.base}/files/b.safetensors").release()  # still serving


def test_downloads_outlive_the_daemon(remote_daemon, server, cache_dir):
    server.files["a.safetensors"] = lora_bytes(5)
    url = f"{server.base}/files/a.safetensors"
    first = remote_daemon()
    with first.client() as client:
        client.acquire(url).release()
    assert first.stop() == 0
    second = remote_daemon()
    with second.client() as client, client.acquire(url) as lease:
        assert torch.equal(lease.tensors["w.lora_up.weight"],
                           load_file(downloads(cache_dir)[0])["w.lora_up.weight"])
        # served from disk at once, and the source asked in the background whether it changed
        wait_until(lambda: server.heads["/files/a.safetensors"] == 1)
    assert server.gets["/files/a.safetensors"] == 1


def test_a_changed_remote_file_is_a_new_entry_and_old_leases_keep_theirs(remote_daemon, server,
                                                                          cache_dir):
    server.files["a.safetensors"] = lora_bytes(6)
    url = f"{server.base}/files/a.safetensors"
    daemon = remote_daemon("--source-revalidate-s", "0")
    with daemon.client() as client:
        old = client.acquire(url)
        before = old.tensors["w.lora_up.weight"].clone()
        server.files["a.safetensors"] = lora_bytes(7)
        with client.acquire(url) as stale:  # served at once; the source is asked meanwhile
            assert stale.entry.id == old.entry.id
        wait_until(lambda: len(downloads(cache_dir)) == 1 and downloads(cache_dir)[0].read_bytes()
                   == server.files["a.safetensors"])
        with client.acquire(url) as new:
            assert new.entry.id != old.entry.id
            assert not torch.equal(new.tensors["w.lora_up.weight"], before)
        assert torch.equal(old.tensors["w.lora_up.weight"], before)
        old.release()
    assert server.gets["/files/a.safetensors"] == 2
    assert [p.read_bytes() for p in downloads(cache_dir)] == [server.files["a.safetensors"]]


def test_a_file_larger_than_the_disk_cache_is_too_large(remote_daemon, server, cache_dir):
    server.files["a.safetensors"] = lora_bytes(8)
    daemon = remote_daemon("--cache-max-bytes", "1000")
    with daemon.client() as client, pytest.raises(LoraCacheError) as error:
        client.acquire(f"{server.base}/files/a.safetensors")
    assert error.value.code is ErrorCode.TOO_LARGE and "cache_max_bytes" in error.value.message
    assert downloads(cache_dir) == []


def test_the_disk_cache_keeps_the_most_recent_files_within_its_budget(remote_daemon, server,
                                                                       cache_dir):
    for i in range(3):
        server.files[f"{i}.safetensors"] = lora_bytes(10 + i)
    size = len(server.files["0.safetensors"])
    daemon = remote_daemon("--cache-max-bytes", str(2 * size))
    with daemon.client() as client:
        for i in range(3):
            client.acquire(f"{server.base}/files/{i}.safetensors").release()
    assert sorted(p.read_bytes() for p in downloads(cache_dir)) == sorted(
        server.files[f"{i}.safetensors"] for i in (1, 2))


def test_preload_fetches_a_url_too(remote_daemon, server, cache_dir):
    server.files["a.safetensors"] = lora_bytes(9)
    daemon = remote_daemon()
    with daemon.client() as client:
        entry = client.preload(f"{server.base}/files/a.safetensors")
        assert entry.nbytes > 0 and entry.path == str(downloads(cache_dir)[0])
        client.acquire(f"{server.base}/files/a.safetensors").release()
    assert sum(server.gets.values()) == 1 and daemon.cpu_stats().hits == 1


def test_files_being_loaded_are_not_evicted_from_under_the_loads(remote_daemon, server,
                                                                 cache_dir):
    """Six URLs at once into a disk cache with room for one: every acquire gets its file."""
    for i in range(6):
        server.files[f"{i}.safetensors"] = lora_bytes(20 + i)
    daemon = remote_daemon("--cache-max-bytes", str(len(server.files["0.safetensors"])))
    with daemon.client() as client:
        failures: list[BaseException] = []

        def acquire(i: int) -> None:
            try:
                with client.acquire(f"{server.base}/files/{i}.safetensors") as lease:
                    expected = load_file_bytes(server.files[f"{i}.safetensors"])
                    assert torch.equal(lease.tensors["w.lora_up.weight"], expected)
            except BaseException as exc:  # noqa: B036 (reported below)
                failures.append(exc)

        threads = [threading.Thread(target=acquire, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert failures == []
    assert len(downloads(cache_dir)) == 1  # trimmed to the budget once the loads were done


def load_file_bytes(data: bytes) -> torch.Tensor:
    from safetensors.torch import load

    return load(data)["w.lora_up.weight"]


def test_evicting_a_url_evicts_the_entries_made_from_it(remote_daemon, server):
    server.files["a.safetensors"] = lora_bytes(30)
    url = f"{server.base}/files/a.safetensors"
    daemon = remote_daemon()
    with daemon.client() as client:
        client.acquire(url).release()
        assert client.evict(url).evicted == 1
        assert client.list() == []
        assert [e.tier for e in client.list(tiers=True)] == ["disk"]  # the download stays


def test_a_daemon_stops_while_a_download_hangs(remote_daemon, server):
    daemon = remote_daemon()
    client = daemon.client()
    failed: list[BaseException] = []

    def acquire() -> None:
        try:
            client.acquire(f"{server.base}/hang/a.safetensors")
        except BaseException as exc:  # noqa: B036 (checked below)
            failed.append(exc)

    waiter = threading.Thread(target=acquire)
    waiter.start()
    wait_until(lambda: server.gets["/hang/a.safetensors"] == 1)
    assert daemon.stop(timeout=20) == 0  # SIGTERM: no waiting for the download
    waiter.join(30)
    assert [type(e) for e in failed] == [LoraCacheError]
    client.close()


def test_prefetch_downloads_and_loads_before_the_acquire(remote_daemon, server, cache_dir):
    server.files["a.safetensors"] = lora_bytes(40)
    url = f"{server.base}/files/a.safetensors"
    daemon = remote_daemon()
    with daemon.client() as client:
        with pytest.raises(ValueError, match="a list"):
            client.prefetch(url)  # a str is iterable: it would prefetch each of its characters
        client.prefetch([url])
        wait_until(lambda: any(e.tier == "device" for e in client.list()))
        (entry,) = [e for e in client.list() if e.tier == "device"]
        assert entry.source == url and daemon.cpu_stats().misses == 0
        with client.acquire(url) as lease:
            assert lease.entry.id == entry.id
        assert daemon.cpu_stats().hits == 1
        (download,) = [e for e in client.list(tiers=True) if e.tier == "disk"]
        assert download.source == url and download.nbytes == len(server.files["a.safetensors"])
    assert server.gets["/files/a.safetensors"] == 1


def test_a_response_that_announces_no_length_is_refused_clearly(remote_daemon, server,
                                                                cache_dir):
    """A chunked response (no Content-Length): obstore, which the daemon downloads with,
    needs the length to check the file came whole; the worker is told so."""
    server.files["a.safetensors"] = lora_bytes(50)
    daemon = remote_daemon()
    with daemon.client() as client, pytest.raises(LoraCacheError) as error:
        client.acquire(f"{server.base}/chunked/a.safetensors")
    assert error.value.code is ErrorCode.SOURCE_FAILED
    assert "Content-Length" in error.value.message, error.value.message
    assert downloads(cache_dir) == [] and list((cache_dir / ".partial").iterdir()) == []


def test_a_source_that_stalls_mid_file_fails_after_source_timeout_s(remote_daemon, server,
                                                                    cache_dir):
    server.files["a.safetensors"] = big_lora_bytes(51)
    daemon = remote_daemon("--source-timeout-s", "1")
    with daemon.client() as client:
        started = time.monotonic()
        with pytest.raises(LoraCacheError) as error:
            client.acquire(f"{server.base}/stall/a.safetensors")
        assert error.value.code is ErrorCode.SOURCE_FAILED, error.value
        assert time.monotonic() - started < 20  # not the client's 120 s, nor a hang
        assert downloads(cache_dir) == [] and list((cache_dir / ".partial").iterdir()) == []
        server.files["b.safetensors"] = lora_bytes(52)
        client.acquire(f"{server.base}/files/b.safetensors").release()  # still serving


def test_a_daemon_killed_mid_download_leaves_no_entry_after_restart(remote_daemon, server,
                                                                     cache_dir):
    server.files["a.safetensors"] = big_lora_bytes(53)
    first = remote_daemon()
    client = first.client()
    threading.Thread(target=lambda: _swallow(client.acquire,
                                             f"{server.base}/stall/a.safetensors"),
                     daemon=True).start()
    partial = cache_dir / ".partial"
    # the download's file is open and half the bytes are on their way (the daemon writes in
    # chunks of 8 MiB, so they may still be in its buffer)
    wait_until(lambda: server.gets["/stall/a.safetensors"] == 1 and any(partial.iterdir()))
    first.kill()  # SIGKILL, mid-file
    client.close()
    second = remote_daemon()
    assert list(partial.iterdir()) == [] and downloads(cache_dir) == []
    with second.client() as again:
        assert again.list(tiers=True) == []
        with again.acquire(f"{server.base}/files/a.safetensors") as lease:
            assert torch.equal(lease.tensors["w.lora_up.weight"],
                               load_file_bytes(server.files["a.safetensors"]))


def _swallow(call, *args) -> None:
    try:
        call(*args)
    except LoraCacheError:
        pass


def test_no_room_on_disk_is_cache_full_naming_the_floor(remote_daemon, server, cache_dir):
    server.files["a.safetensors"] = lora_bytes(54)
    daemon = remote_daemon("--cache-min-free-bytes", "100%")
    with daemon.client() as client, pytest.raises(LoraCacheError) as error:
        client.acquire(f"{server.base}/files/a.safetensors")
    assert error.value.code is ErrorCode.CACHE_FULL
    assert "cache_min_free_bytes" in error.value.message, error.value.message
    assert downloads(cache_dir) == [] and list((cache_dir / ".partial").iterdir()) == []


def test_a_preload_table_may_name_a_url(remote_daemon, server, tmp_path):
    """[[preload]] in the configuration file: fetched and loaded at start, pinned."""
    server.files["a.safetensors"] = lora_bytes(55)
    url = f"{server.base}/files/a.safetensors"
    config = tmp_path / "config.toml"
    config.write_text(f'[[preload]]\npath = "{url}"\npin = true\n')
    daemon = remote_daemon("--config", str(config))
    with daemon.client() as client:
        wait_until(lambda: any(e.tier == "device" for e in client.list()))
        (entry,) = [e for e in client.list() if e.tier == "device"]
        assert entry.source == url and entry.pinned


def test_a_worker_fuses_a_lora_by_url(remote_daemon, server, tmp_path):
    """load_and_fuse_lora(pipe, URL): the daemon fetches, the worker fuses what it lends, and
    the weights are those the same file gives when fused from this process's own copy."""
    from examples.tiny_models import save, sd_lora_peft, tiny_sd_pipeline
    from loracache.client import load_and_fuse_lora

    pipe, expected = tiny_sd_pipeline(smallest=True), tiny_sd_pipeline(smallest=True)
    path = save(sd_lora_peft(pipe), tmp_path / "style.safetensors")
    server.files["style.safetensors"] = path.read_bytes()
    load_and_fuse_lora(expected, load_file(path), "style")  # fused from a state dict, here
    before = {name: p.detach().clone() for name, p in pipe.unet.named_parameters()}
    daemon = remote_daemon()
    with daemon.client() as client:
        load_and_fuse_lora(pipe, f"{server.base}/files/style.safetensors", "style",
                           client=client, fallback="error")
        fused = {**dict(pipe.unet.named_parameters()),
                 **{f"te.{k}": v for k, v in pipe.text_encoder.named_parameters()}}
        want = {**dict(expected.unet.named_parameters()),
                **{f"te.{k}": v for k, v in expected.text_encoder.named_parameters()}}
        assert all(torch.equal(fused[name], want[name]) for name in want)
        assert any(not torch.equal(fused[name], b) for name, b in before.items())  # it fused
    assert server.gets["/files/style.safetensors"] == 1


def test_credential_headers_reach_their_host_only(start_daemon, server, cache_dir, tmp_path):
    """headers_from_env: sent to the host they are configured for, dropped when a redirect
    leaves it (as a CDN link does)."""
    cdn = LoraServer()
    with serving(cdn, unblock=cdn.stopping.set):
        server.elsewhere = cdn.base
        cdn.files["a.safetensors"] = server.files["a.safetensors"] = lora_bytes(60)
        config = tmp_path / "config.toml"
        config.write_text(f'[source."{server.base}"]\nheaders_from_env = '
                          '{ Authorization = "LC_TEST_TOKEN", Cookie = "LC_TEST_COOKIE" }\n')
        daemon = start_daemon("--config", str(config), "--allow-source", f"{server.base}/away/",
                              "--allow-source", f"{server.base}/files/", "--cache-dir",
                              str(cache_dir), env={"LC_TEST_TOKEN": "Bearer s3cret",
                                                   "LC_TEST_COOKIE": "session=s3cret"})
        with daemon.client() as client:
            client.acquire(f"{server.base}/files/a.safetensors").release()
            client.acquire(f"{server.base}/away/a.safetensors").release()
        sent = [headers for path, headers in server.headers]
        assert sent and all(h.get("authorization") == "Bearer s3cret"
                            and h.get("cookie") == "session=s3cret" for h in sent)
        assert cdn.gets["/files/a.safetensors"] == 1
        assert all("authorization" not in h and "cookie" not in h for _, h in cdn.headers)
