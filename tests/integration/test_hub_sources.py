"""LoRAs from the Hugging Face Hub: a fake Hub in the test process (the resolve route, its
headers and error codes, LFS files redirected to a CDN) reached by the real daemon through
huggingface_hub, with HF_ENDPOINT, HF_HOME, HF_TOKEN and HF_HUB_OFFLINE in its environment as
an operator sets them."""

from __future__ import annotations

import hashlib
import http.server
import re
import threading
import urllib.parse
from pathlib import Path
from typing import Iterator

import pytest
import torch
from safetensors.torch import load, save

from loracache.client import ErrorCode, LoraCacheError
from tests.support import Daemon, serving

RESOLVE = re.compile(r"/([^/]+)/([^/]+)/resolve/([^/]+)/(.+)")


class Request:
    def __init__(self, method: str, path: str, authorization: str | None) -> None:
        self.method, self.path, self.authorization = method, path, authorization


class Hub(http.server.ThreadingHTTPServer):
    """The Hub's ``/{org}/{repo}/resolve/{revision}/{path}``, HEAD and GET, as huggingface.co
    answers it for LFS files: a 302 to a CDN (another origin: ``localhost`` for ``127.0.0.1``)
    carrying X-Repo-Commit, X-Linked-Etag (the file's sha256) and X-Linked-Size; errors with
    X-Error-Code. Every request is logged."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.files: dict[tuple[str, str, str], bytes] = {}  # (repo id, revision, path)
        self.gated: set[str] = set()
        self.private: dict[str, str] = {}  # repo id: the token that gets in
        self.lying: set[str] = set()  # paths whose X-Linked-Etag is not their sha256
        self.requests: list[Request] = []
        self.lock = threading.Lock()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"

    def add(self, repo_id: str, path: str, data: bytes, revision: str = "main") -> bytes:
        self.files[repo_id, revision, path] = data
        return data

    def resolves(self, method: str | None = None) -> list[str]:
        return [r.path for r in self.requests if "/resolve/" in r.path
                and method in (None, r.method)]

    def cdn_gets(self) -> list[Request]:
        return [r for r in self.requests if r.path.startswith("/cdn/")]


def commit_of(repo_id: str, revision: str) -> str:
    """The fake Hub's commit hash of a revision."""
    return hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()


class HubHandler(http.server.BaseHTTPRequestHandler):
    server: Hub

    def do_HEAD(self) -> None:  # noqa: N802 (http.server's naming)
        self.answer(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self.answer(body=True)

    def answer(self, body: bool) -> None:
        hub = self.server
        with hub.lock:
            hub.requests.append(Request(self.command, self.path,
                                        self.headers.get("Authorization")))
        if self.path.startswith("/cdn/"):
            blobs = {hashlib.sha256(d).hexdigest(): d for d in hub.files.values()}
            data = blobs.get(self.path.removeprefix("/cdn/"))
            if data is None:
                return self.reply(404)
            return self.reply(200, data if body else b"", {"Content-Length": str(len(data))})
        match = RESOLVE.fullmatch(self.path)
        if match is None:
            return self.reply(404)
        repo_id = f"{match[1]}/{match[2]}"
        revision, path = urllib.parse.unquote(match[3]), urllib.parse.unquote(match[4])
        revisions = {rev for repo, rev, _ in hub.files if repo == repo_id}
        commits = {commit_of(repo_id, rev): rev for rev in revisions}
        revision = commits.get(revision, revision)  # a commit names its revision's files
        token = hub.private.get(repo_id)
        if not revisions or (token and self.headers.get("Authorization") != f"Bearer {token}"):
            # the Hub's answer for a private repository too, so as not to tell it exists
            return self.reply(401, headers={"X-Error-Code": "RepoNotFound"})
        if repo_id in hub.gated:
            return self.reply(401, headers={"X-Error-Code": "GatedRepo",
                                            "X-Error-Message": "Access to this repo is gated"})
        if revision not in revisions:
            return self.reply(404, headers={"X-Error-Code": "RevisionNotFound"})
        commit = commit_of(repo_id, revision)
        data = hub.files.get((repo_id, revision, path))
        if data is None:
            return self.reply(404, headers={"X-Error-Code": "EntryNotFound",
                                            "X-Repo-Commit": commit})
        sha256 = hashlib.sha256(data).hexdigest()
        claimed = hashlib.sha256(b"not " + data).hexdigest() if path in hub.lying else sha256
        self.reply(302, headers={
            "Location": f"http://localhost:{hub.server_port}/cdn/{sha256}",
            "X-Repo-Commit": commit, "X-Linked-Etag": f'"{claimed}"',
            "X-Linked-Size": str(len(data)),
            "ETag": f'"{hashlib.sha1(data).hexdigest()}"'})  # the LFS pointer's git hash

    def reply(self, status: int, data: bytes = b"", headers: dict[str, str] | None = None
              ) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hub() -> Iterator[Hub]:
    server = Hub()
    with serving(server):
        yield server


@pytest.fixture
def hf_home(tmp_path: Path) -> Path:
    return tmp_path / "hf-home"


@pytest.fixture
def hub_daemon(start_daemon, hub, cache_dir, hf_home):
    """A daemon allowed ``hf://org/`` (or ``allow``) that reaches the fake Hub; ``env`` on top
    (HF_TOKEN, HF_HUB_OFFLINE)."""
    def start(*allow: str, **env: str) -> Daemon:
        flags = [arg for prefix in allow or ("hf://org/",) for arg in ("--allow-source", prefix)]
        return start_daemon(*flags, "--cache-dir", str(cache_dir), env={
            "HF_ENDPOINT": hub.base, "HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hf_home / "hub"),
            "HF_TOKEN": "", "HUGGING_FACE_HUB_TOKEN": "", "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_TELEMETRY": "1", **env})
    return start


def lora_bytes(seed: int) -> bytes:
    generator = torch.Generator().manual_seed(seed)
    return save({"w.lora_down.weight": torch.randn(8, 64, generator=generator),
                 "w.lora_up.weight": torch.randn(64, 8, generator=generator)})


def same_tensors(got: dict[str, torch.Tensor], data: bytes) -> bool:
    expected = load(data)
    return got.keys() == expected.keys() and all(
        got[k].dtype == v.dtype and torch.equal(got[k], v) for k, v in expected.items())


def downloads(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.glob("*.safetensors"))


def nothing_left(cache_dir: Path) -> bool:
    return downloads(cache_dir) == [] and list((cache_dir / ".partial").iterdir()) == []


def test_files_revisions_and_subfolders_reach_the_hub_as_named(hub_daemon, hub, cache_dir):
    main = hub.add("org/repo", "a.safetensors", lora_bytes(1))
    tagged = hub.add("org/repo", "sub/b.safetensors", lora_bytes(2), revision="v1")
    pr = hub.add("org/repo", "c.safetensors", lora_bytes(3), revision="refs/pr/1")
    daemon = hub_daemon()
    with daemon.client() as client:
        for url, data in (("hf://org/repo/a.safetensors", main),
                          ("hf://org/repo@v1/sub/b.safetensors", tagged),
                          ("hf://org/repo@refs%2Fpr%2F1/c.safetensors", pr)):
            with client.acquire(url) as lease:
                assert same_tensors(lease.tensors, data), url
        asked = len(hub.requests)
        client.acquire("hf://org/repo@v1/sub/b.safetensors").release()  # a hit: no request
        assert len(hub.requests) == asked
    # each revision resolved as named, then the file fetched at the commit it resolved to (a
    # branch that moves between the two cannot swap the file)
    named = {"/org/repo/resolve/main/a.safetensors", "/org/repo/resolve/v1/sub/b.safetensors",
             "/org/repo/resolve/refs%2Fpr%2F1/c.safetensors"}
    pinned = {f"/org/repo/resolve/{commit_of('org/repo', rev)}/{path}" for rev, path in (
        ("main", "a.safetensors"), ("v1", "sub/b.safetensors"), ("refs/pr/1", "c.safetensors"))}
    assert set(hub.resolves("HEAD")) == named | pinned
    # each file fetched once, from where the Hub redirected
    assert sorted(r.path for r in hub.cdn_gets()) == sorted(
        f"/cdn/{hashlib.sha256(d).hexdigest()}" for d in (main, tagged, pr))
    assert all(r.authorization is None for r in hub.requests)  # the daemon has no token
    assert sorted(p.read_bytes() for p in downloads(cache_dir)) == sorted((main, tagged, pr))


def test_allow_sources_by_organisation_and_by_repository(hub_daemon, hub, cache_dir):
    data = lora_bytes(4)
    for repo_id in ("org/any", "team/repo", "team/repo2", "evil/repo"):
        hub.add(repo_id, "x.safetensors", data)
    hub.add("team/repo", "x.safetensors", data, revision="v2")
    daemon = hub_daemon("hf://org/", "hf://team/repo/")
    with daemon.client() as client:
        for url in ("hf://org/any/x.safetensors", "hf://team/repo/x.safetensors",
                    "hf://team/repo@v2/x.safetensors"):  # a prefix allows every revision
            client.acquire(url).release()
        asked = len(hub.requests)
        for url in ("hf://team/repo2/x.safetensors", "hf://evil/repo/x.safetensors",
                    "hf://team/repo2@main/x.safetensors"):
            with pytest.raises(LoraCacheError) as error:
                client.acquire(url)
            assert error.value.code is ErrorCode.FORBIDDEN_SOURCE, url
            assert "allow_sources" in error.value.message
        assert len(hub.requests) == asked
    assert len(downloads(cache_dir)) == 3


def test_what_the_hub_does_not_have_is_not_found_and_a_gated_repo_is_denied(hub_daemon, hub,
                                                                          cache_dir):
    hub.add("org/repo", "a.safetensors", lora_bytes(5))
    hub.add("org/private", "a.safetensors", lora_bytes(5))
    hub.private["org/private"] = "hf_owner"
    hub.add("org/gated", "a.safetensors", lora_bytes(5))
    hub.gated.add("org/gated")
    daemon = hub_daemon()
    with daemon.client() as client:
        for url, code in (("hf://org/nothing/a.safetensors", ErrorCode.NOT_FOUND),
                          ("hf://org/repo/missing.safetensors", ErrorCode.NOT_FOUND),
                          ("hf://org/repo@v9/a.safetensors", ErrorCode.NOT_FOUND),
                          ("hf://org/private/a.safetensors", ErrorCode.NOT_FOUND),
                          ("hf://org/gated/a.safetensors", ErrorCode.SOURCE_DENIED)):
            with pytest.raises(LoraCacheError) as error:
                client.acquire(url)
            assert error.value.code is code, (url, error.value)
            assert url in error.value.message
    assert hub.cdn_gets() == []
    assert nothing_left(cache_dir)


def test_hf_token_reaches_the_hub_and_not_its_cdn(hub_daemon, hub, cache_dir):
    data = hub.add("org/private", "a.safetensors", lora_bytes(6))
    hub.private["org/private"] = "hf_owner"
    daemon = hub_daemon(HF_TOKEN="hf_owner")
    with daemon.client() as client, client.acquire("hf://org/private/a.safetensors") as lease:
        assert same_tensors(lease.tensors, data)
    resolves = [r for r in hub.requests if "/resolve/" in r.path]
    assert resolves and all(r.authorization == "Bearer hf_owner" for r in resolves)
    [cdn] = hub.cdn_gets()
    assert cdn.authorization is None  # a token never leaves the Hub for its CDN


def test_a_download_that_does_not_match_its_sha256_is_refused(hub_daemon, hub, cache_dir):
    hub.add("org/repo", "bad.safetensors", lora_bytes(7))
    hub.lying.add("bad.safetensors")
    good = hub.add("org/repo", "good.safetensors", lora_bytes(8))
    daemon = hub_daemon()
    with daemon.client() as client:
        with pytest.raises(LoraCacheError) as error:
            client.acquire("hf://org/repo/bad.safetensors")
        assert error.value.code is ErrorCode.SOURCE_FAILED, error.value
        assert "sha256" in error.value.message
        assert len(hub.cdn_gets()) == 1  # it was downloaded, then refused
        assert nothing_left(cache_dir)
        with client.acquire("hf://org/repo/good.safetensors") as lease:  # still serving
            assert same_tensors(lease.tensors, good)


def test_offline_the_hub_cache_is_served_without_asking(hub_daemon, hub, cache_dir, hf_home):
    """HF_HUB_OFFLINE=1: a file an operator put in the Hub cache (``hf download``) is served
    from it; one that is not there fails; the Hub hears nothing."""
    from huggingface_hub import hf_hub_download

    data = hub.add("org/repo", "a.safetensors", lora_bytes(9))
    hub.add("org/repo", "b.safetensors", lora_bytes(10))
    hf_hub_download("org/repo", "a.safetensors", cache_dir=hf_home / "hub", endpoint=hub.base,
                    token=False)
    assert len(hub.cdn_gets()) == 1  # the request log sees what reaches the server
    hub.requests.clear()
    daemon = hub_daemon(HF_HUB_OFFLINE="1")
    with daemon.client() as client:
        with client.acquire("hf://org/repo/a.safetensors") as lease:
            assert same_tensors(lease.tensors, data)
        with pytest.raises(LoraCacheError) as error:
            client.acquire("hf://org/repo/b.safetensors")
        assert error.value.code is ErrorCode.SOURCE_FAILED, error.value
        assert "hf://org/repo/b.safetensors" in error.value.message
    assert hub.requests == []
    assert [p.read_bytes() for p in downloads(cache_dir)] == [data]


def test_a_daemon_restarted_offline_serves_its_downloads_without_asking(hub_daemon, hub,
                                                                        cache_dir, hf_home):
    data = hub.add("org/repo", "a.safetensors", lora_bytes(11))
    first = hub_daemon()
    with first.client() as client:
        client.acquire("hf://org/repo/a.safetensors").release()
    assert first.stop() == 0
    assert len(hub.cdn_gets()) == 1
    hub.requests.clear()
    second = hub_daemon(HF_HUB_OFFLINE="1")
    with second.client() as client, client.acquire("hf://org/repo/a.safetensors") as lease:
        assert same_tensors(lease.tensors, data)
        # the look at the source that a restart starts in the background is refused offline
        second.wait_for_log("HF_HUB_OFFLINE is set")
    assert hub.requests == []
    assert not (hf_home / "hub").exists() or not any((hf_home / "hub").rglob("*.safetensors"))
