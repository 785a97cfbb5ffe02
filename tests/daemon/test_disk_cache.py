"""The disk tier at start: what earlier runs left is indexed, checked, or removed; nothing else
in its directory is touched."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from loracache.daemon.config import ConfigError
from loracache.daemon.disk_cache import PARTIAL, DiskCache
from loracache.daemon.remotes import Remotes

NAME = "0123456789abcdef0123456789abcdef"


def open_cache(directory: Path) -> DiskCache:
    return DiskCache(directory, budget=1 << 20, min_free=0, revalidate_s=300,
                     remotes=Remotes({}, timeout_s=60))


def test_start_keeps_whole_downloads_and_drops_partial_or_orphaned_ones(tmp_path):
    (tmp_path / f"{NAME}.safetensors").write_bytes(b"x" * 10)
    (tmp_path / f"{NAME}.json").write_text(json.dumps(
        {"url": "https://example.com/a.safetensors", "size": 10, "version": "etag:1"}))
    short = "f" * 32  # a sidecar whose file lost bytes
    (tmp_path / f"{short}.safetensors").write_bytes(b"x" * 5)
    (tmp_path / f"{short}.json").write_text(json.dumps(
        {"url": "https://example.com/b.safetensors", "size": 10, "version": "etag:2"}))
    orphan = "e" * 32  # renamed into place, sidecar never written
    (tmp_path / f"{orphan}.safetensors").write_bytes(b"x")
    (tmp_path / PARTIAL).mkdir()
    (tmp_path / PARTIAL / "half").write_bytes(b"x")
    cache = open_cache(tmp_path)
    try:
        assert list(cache.files) == ["https://example.com/a.safetensors"]
        assert cache.files["https://example.com/a.safetensors"].size == 10
        left = sorted(p.name for p in tmp_path.iterdir())
        assert left == sorted([f"{NAME}.safetensors", f"{NAME}.json", PARTIAL, ".lock"])
        assert list((tmp_path / PARTIAL).iterdir()) == []
    finally:
        cache.close()


def test_files_the_cache_did_not_write_are_left_alone(tmp_path):
    foreign = ["style.safetensors", "notes.json", "A" * 32 + ".safetensors"]
    for name in foreign:
        (tmp_path / name).write_bytes(b"{}")
    cache = open_cache(tmp_path)
    cache.close()
    assert all((tmp_path / name).exists() for name in foreign) and cache.files == {}


def test_two_daemons_may_not_share_a_cache_directory(tmp_path):
    """The second would delete the first one's downloads under way (its .partial files)."""
    first = open_cache(tmp_path)
    try:
        with pytest.raises(ConfigError, match="in use by another loracache daemon"):
            open_cache(tmp_path)
    finally:
        first.close()
    open_cache(tmp_path).close()  # free again


def test_of_two_downloads_of_one_url_the_later_is_kept(tmp_path):
    """A crash between a new download's sidecar and the old file's removal leaves both."""
    for name, version in (("a" * 32, "etag:old"), ("b" * 32, "etag:new")):
        (tmp_path / f"{name}.safetensors").write_bytes(b"x" * 10)
        (tmp_path / f"{name}.json").write_text(json.dumps(
            {"url": "https://example.com/a.safetensors", "size": 10, "version": version}))
        time.sleep(0.01)  # the later sidecar is the newer one
    cache = open_cache(tmp_path)
    try:
        (kept,) = cache.files.values()
        assert kept.version == "etag:new" and cache.used == 10
        newer = "b" * 32
        assert sorted(p.name for p in tmp_path.glob("[ab]*")) == [f"{newer}.json",
                                                                f"{newer}.safetensors"]
    finally:
        cache.close()
