"""The node-local disk tier: remote LoRA files downloaded once per node into ``cache_dir``.

However many workers and devices ask for a URL at once, it is downloaded once (single flight
on the event loop; the transfer runs in a thread). A download streams into ``.partial/``, is
checked (the announced size, the sha256 where the source publishes one, the safetensors header)
and renamed into place under a name of its own, with a JSON sidecar that records its URL and
version, so a crash never leaves a half file that looks whole. The files outlive the daemon:
the index is rebuilt from the sidecars at start. Least recently used files go when the
directory's byte budget or the file system's free-space floor needs room; room for a download
is reserved from the size its source announces before its bytes come, so downloads at once
cannot overrun the budget.

A URL fetched once is served from disk at once. After ``revalidate_s`` a request still gets the
copy at once while the source is asked (in the background) whether it changed; a changed file
(new ETag or revision) is a new download under a new name, so entries made from the old one
stay what they were.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

from loracache.shared.errors import ErrorCode, LoraCacheError
from loracache.shared.humanize import human_bytes
from loracache.shared.protocol import TierStats
from loracache.shared.safetensors_header import read_header

from .cache import LoadTimes
from .config import ConfigError
from .remotes import NO_ROOM, NoRoom, RemoteFile, Remotes, reason
from .sources import RemoteSource

log = logging.getLogger("loracache.daemon")

PARTIAL = ".partial"
# The names the cache writes: it touches no other file in its directory.
OWN_NAME = re.compile(r"[0-9a-f]{32}\.(safetensors|json)")
HASH_CHUNK = 8 << 20


@dataclasses.dataclass
class DiskFile:
    """One downloaded file and the version of the remote it came from."""

    url: str
    path: Path
    size: int
    version: str  # the ETag or revision, or size and modification time where there is none
    checked: float = -math.inf  # time.monotonic() of the last look at the source
    refused: bool = False  # the last look was answered 404 or 401/403


class DiskCache:
    """Downloads under ``directory``: at most ``budget`` bytes of them, leaving at least
    ``min_free`` bytes of its file system free."""

    def __init__(self, directory: Path, budget: int, min_free: int, revalidate_s: float,
                 remotes: Remotes) -> None:
        self.directory = directory
        self.budget = budget
        self.min_free = min_free
        self.revalidate_s = revalidate_s
        self.remotes = remotes
        self.files: OrderedDict[str, DiskFile] = OrderedDict()  # by URL, least recent first
        self.hits = self.misses = self.evictions = 0  # requests served from disk or not
        self.download_times = LoadTimes()
        self._inflight: dict[str, asyncio.Future[DiskFile]] = {}
        # Files handed out and not yet loaded from: eviction leaves them; a replaced one is
        # removed once the last user is done with it.
        self._in_use: collections.Counter[Path] = collections.Counter()
        self._doomed: set[Path] = set()
        self._reserved = 0  # bytes announced by downloads under way
        # The index is changed on the event loop and by downloads making room in their threads.
        self._lock = threading.RLock()
        self._lock_file = _lock_directory(directory)
        self._rebuild()

    @property
    def used(self) -> int:
        return sum(f.size for f in self.files.values())

    async def fetch(self, source: RemoteSource) -> Path:
        """The local copy of ``source``, downloaded (once, however many ask) if there is none.
        The file is the caller's until it calls :meth:`done` with it: nothing removes it
        meanwhile. A copy due for a look at its source is served as it is while the source is
        asked in the background."""
        with self._lock:
            if source.url in self.files:
                self.hits += 1
            else:
                self.misses += 1
        downloaded = False  # by this call: the copy is as fresh as it gets
        while True:
            with self._lock:
                known = self.files.get(source.url)
                if known is not None and not _touch(known.path):  # removed behind our back
                    log.warning("disk cache: %s is gone from %s; downloading it again",
                                known.path, self.directory)
                    del self.files[source.url]
                    known = None
                if known is not None:
                    if not downloaded and time.monotonic() - known.checked >= self.revalidate_s:
                        self._start(source, known)  # not awaited: later requests see the answer
                    self.files.move_to_end(source.url)
                    self._in_use[known.path] += 1
                    return known.path
            await asyncio.shield(self._start(source, None))
            downloaded = True
            # Kept by _settled; a download making room may have evicted it since: ask again.

    def done(self, path: Path) -> None:
        """The caller of :meth:`fetch` has loaded what it needed from ``path``."""
        with self._lock:
            self._in_use[path] -= 1
            if self._in_use[path] <= 0:
                del self._in_use[path]
                if path in self._doomed:
                    self._doomed.discard(path)
                    _remove(path)
                self._trim()

    def snapshot(self) -> list[DiskFile]:
        """The downloads, least recently used first."""
        with self._lock:
            return list(self.files.values())

    def stats(self) -> TierStats:
        with self._lock:
            return TierStats(tier="disk", budget=self.budget, used=self.used,
                             entries=len(self.files), hits=self.hits, misses=self.misses,
                             evictions=self.evictions, load_seconds=self.download_times.stats())

    def close(self) -> None:
        """Remove the files replaced while in use, and let go of the directory (downloads under
        way are in daemon threads: abandoned, their partial files removed at the next start)."""
        with self._lock:
            for path in self._doomed:
                _remove(path)
            self._doomed.clear()
        self._lock_file.close()

    # ---------------------------------------------------------------------- on the event loop

    def _start(self, source: RemoteSource, known: DiskFile | None) -> asyncio.Future[DiskFile]:
        """The download or look at ``source`` under way, started if there is none."""
        future = self._inflight.get(source.url)
        if future is None:
            future = _in_thread(self._refresh, source, known)
            self._inflight[source.url] = future
            future.add_done_callback(lambda done: self._settled(source, known, done))
        return future

    def _settled(self, source: RemoteSource, known: DiskFile | None,
                 future: asyncio.Future[DiskFile]) -> None:
        self._inflight.pop(source.url, None)
        if future.cancelled():
            return
        error = future.exception()
        if error is None:
            fetched = future.result()
            if known is not None and fetched.path == known.path:
                self._confirmed(fetched)  # the source still has that version
            else:
                self._keep(fetched)
        elif known is None:
            return  # a download: its waiters get the error
        elif isinstance(error, LoraCacheError) and error.code in (ErrorCode.NOT_FOUND,
                                                                  ErrorCode.SOURCE_DENIED):
            self._refused(known, error)
        else:  # the source is away: the copy is served on
            log.warning("could not refresh %s (%s); serving the copy from %s", source.url,
                        error, known.path)

    def _keep(self, fetched: DiskFile) -> None:
        """Index a download as the URL's file (its reserved bytes now count as used) and trim
        the directory to the budget."""
        with self._lock:
            self._reserved -= fetched.size
            old = self.files.pop(fetched.url, None)
            self.files[fetched.url] = fetched
            if old is not None and old.path != fetched.path:
                self._discard(old.path)  # an entry loaded from it holds its own copy
            self._trim(keep=fetched)

    def _confirmed(self, checked: DiskFile) -> None:
        """Note a look at the source that found the copy current: only if the copy is still
        indexed (a download making room may have evicted it meanwhile)."""
        with self._lock:
            current = self.files.get(checked.url)
            if current is not None and current.path == checked.path:
                current.checked, current.refused = checked.checked, False

    def _refused(self, known: DiskFile, error: LoraCacheError) -> None:
        """The source says it no longer has the file, or no longer lets us read it. Twice in a
        row (``revalidate_s`` apart), and the copy is no longer served: once may be a credential
        that expires and is renewed, or a token the daemon was restarted without."""
        with self._lock:
            current = self.files.get(known.url)
            if current is None or current.path != known.path:
                return
            if not current.refused:
                current.refused, current.checked = True, time.monotonic()
                log.warning("%s; the copy is served until the source says so again",
                            error.message)
                return
            del self.files[known.url]
            self._discard(known.path)
        log.warning("%s, again; its copy is no longer served", error.message)

    def _trim(self, keep: DiskFile | None = None, need: int = 0) -> None:
        """Evict least recently used files until ``need`` more bytes fit the budget and the
        free-space floor, except ``keep`` and files in use (trimmed once their users are
        done)."""
        for url, victim in list(self.files.items()):
            if self._fits(need):
                break
            if victim is keep or victim.path in self._in_use:
                continue
            del self.files[url]
            self._discard(victim.path)
            self.evictions += 1
            log.info("disk cache: evicted %s (%s) for room", url, human_bytes(victim.size))

    def _fits(self, need: int) -> bool:
        if self.used + self._reserved + need > self.budget:
            return False
        if need == 0:
            return True
        return shutil.disk_usage(self.directory).free - self._reserved - need >= self.min_free

    def _discard(self, path: Path) -> None:
        if path in self._in_use:
            self._doomed.add(path)
        else:
            _remove(path)

    # ------------------------------------------------------------------------ in the threads

    def _refresh(self, source: RemoteSource, known: DiskFile | None) -> DiskFile:
        """``known`` if the source still has that version, else a fresh download."""
        if known is not None and known.path.exists():
            checked = time.monotonic()
            try:
                now = self.remotes.head(source)
            except LoraCacheError as exc:
                if exc.code is not ErrorCode.SOURCE_FAILED:
                    raise  # gone, or no longer ours to read: the copy goes (_settled)
                log.warning("could not check %s for changes (%s); serving the copy from %s",
                            source.url, exc.message, known.path)  # away: the copy is the best
                return dataclasses.replace(known, checked=checked)
            if now.version == known.version:
                return dataclasses.replace(known, checked=checked)
        return self._download(source)

    def _download(self, source: RemoteSource) -> DiskFile:
        started = time.monotonic()
        partial = self.directory / PARTIAL / secrets.token_hex(8)
        reserved = [0]

        def admit(announced: RemoteFile) -> None:
            self._reserve(source, announced.size)
            reserved[0] = announced.size

        try:
            try:
                remote = self.remotes.download(source, partial, admit)
            except NoRoom:  # the file system filled up under us: make room once, try again
                _remove(partial)
                self._unreserve(reserved)
                remote = self.remotes.download(source, partial, admit)
            if remote.sha256 is not None and _sha256(partial) != remote.sha256:
                raise LoraCacheError(ErrorCode.SOURCE_FAILED,
                                     f"{source.url}: the download does not match the sha256 "
                                     "its source gives; it was corrupted on the way")
            with open(partial, "rb") as f:
                read_header(f, source.url)
            # A name of its own: no download ever lands on a file served or held meanwhile.
            final = self.directory / f"{secrets.token_hex(16)}.safetensors"
            fetched = DiskFile(source.url, final, remote.size, remote.version, time.monotonic())
            _write_sidecar(fetched, partial)
        except NoRoom as exc:
            self._unreserve(reserved)
            raise LoraCacheError(ErrorCode.CACHE_FULL,
                                 f"{source.url}: no room on {self.directory}'s file system "
                                 f"({reason(exc)}) after evicting what was not in use; free "
                                 "disk space or lower cache_max_bytes") from None
        except BaseException:
            self._unreserve(reserved)
            raise
        finally:
            _remove(partial)
        # The reservation stays until _keep indexes the file, so its bytes count all along.
        with self._lock:
            self.download_times.record(time.monotonic() - started)
        log.info("downloaded %s (%s) to %s", source.url, human_bytes(remote.size), final)
        return fetched

    def _reserve(self, source: RemoteSource, size: int) -> None:
        """Room for ``size`` bytes, made by evicting, before the bytes are fetched. Files in
        use may hold the budget over for a while (they are trimmed once done with); the file
        system's free-space floor holds always: CACHE_FULL where even evicting leaves none."""
        if size > self.budget:
            raise LoraCacheError(ErrorCode.TOO_LARGE,
                                 f"{source.url} is {human_bytes(size)}, more than the whole disk "
                                 f"cache ({human_bytes(self.budget)}); raise cache_max_bytes")
        with self._lock:
            self._trim(need=size)
            free = shutil.disk_usage(self.directory).free - self._reserved
            if free - size < self.min_free:
                raise LoraCacheError(
                    ErrorCode.CACHE_FULL,
                    f"{source.url} ({human_bytes(size)}) does not fit: the file system of "
                    f"{self.directory} has {human_bytes(free)} free (less what downloads under "
                    f"way need) and cache_min_free_bytes keeps {human_bytes(self.min_free)} "
                    "free; the cache's files that are left are in use. Free disk space or "
                    "lower cache_min_free_bytes")
            self._reserved += size

    def _unreserve(self, reserved: list[int]) -> None:
        with self._lock:
            self._reserved -= reserved[0]
            reserved[0] = 0

    # ----------------------------------------------------------------------------- at start

    def _rebuild(self) -> None:
        """Index what earlier runs downloaded; drop partial downloads and orphans."""
        shutil.rmtree(self.directory / PARTIAL, ignore_errors=True)
        (self.directory / PARTIAL).mkdir(mode=0o750, parents=True, exist_ok=True)
        found = []
        for sidecar in self.directory.glob("*.json"):
            if not OWN_NAME.fullmatch(sidecar.name):
                continue
            data = _read_sidecar(sidecar)
            path = sidecar.with_suffix(".safetensors")
            if data is None or not path.is_file() or path.stat().st_size != data["size"]:
                log.warning("disk cache: dropping %s (no file, or not the size recorded)", path)
                _remove(path)
                _remove(sidecar)
                continue
            found.append((path.stat().st_atime, DiskFile(data["url"], path, data["size"],
                                                         data["version"])))
        newest = {f.url: f for _, f in sorted(found, key=lambda pair: pair[1].path.with_suffix(
            ".json").stat().st_mtime_ns)}  # of two downloads of a URL, the later one serves
        for _, fetched in sorted(found, key=lambda pair: pair[0]):
            if newest[fetched.url] is fetched:
                self.files[fetched.url] = fetched
            else:
                log.info("disk cache: %s was replaced by a later download; removing it",
                         fetched.path)
                _remove(fetched.path)
        for orphan in self.directory.glob("*.safetensors"):
            if OWN_NAME.fullmatch(orphan.name) and not orphan.with_suffix(".json").exists():
                _remove(orphan)


def _in_thread(work: Callable[..., DiskFile], *args: Any) -> asyncio.Future[DiskFile]:
    """Run ``work`` in a daemon thread of its own: a download under way must not hold up
    the daemon's exit (an executor's threads are joined at exit)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[DiskFile] = loop.create_future()

    def settle(outcome: Callable[[Any], None], value: Any) -> None:
        if not future.done():
            outcome(value)

    def run() -> None:
        outcome: Callable[[Any], None]
        try:
            value: Any = work(*args)
            outcome = future.set_result
        except BaseException as exc:  # noqa: B036 (handed to the waiting coroutines)
            outcome, value = future.set_exception, exc
        try:
            loop.call_soon_threadsafe(settle, outcome, value)
        except RuntimeError:  # the loop is closed: the daemon stopped, nobody waits
            pass

    threading.Thread(target=run, name="loracache-fetch", daemon=True).start()
    return future


def _lock_directory(directory: Path) -> Any:
    """Hold ``directory/.lock`` while this daemon runs: two daemons on one cache directory
    would delete each other's downloads."""
    lock_file = open(directory / ".lock", "a")
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.close()
        raise ConfigError(f"cache_dir {directory} is in use by another loracache daemon; give "
                          "each daemon a cache_dir of its own") from None
    return lock_file


def _touch(path: Path) -> bool:
    """Set the file's access time to now, whatever the mount's atime policy (the order of use
    survives restarts); its modification time stays, as it is part of the file's identity.
    False if the file is gone."""
    try:
        os.utime(path, ns=(time.time_ns(), path.stat().st_mtime_ns))
    except FileNotFoundError:
        return False
    except OSError:  # not ours to touch (a read-only mount): the order is just not kept
        pass
    return True


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _write_sidecar(fetched: DiskFile, partial: Path) -> None:
    """Put the checked download ``partial`` in place with its sidecar: the sidecar is what makes
    a file an entry at the next start, so it goes last, and a failure leaves neither."""
    sidecar = fetched.path.with_suffix(".json")
    sidecar_partial = fetched.path.parent / PARTIAL / f"{sidecar.name}.{secrets.token_hex(4)}"
    try:
        os.replace(partial, fetched.path)
        sidecar_partial.write_text(json.dumps({"url": fetched.url, "size": fetched.size,
                                               "version": fetched.version}))
        os.replace(sidecar_partial, sidecar)
    except OSError as exc:
        _remove(fetched.path)
        _remove(sidecar_partial)
        if exc.errno in NO_ROOM:
            raise NoRoom(exc.errno, str(exc)) from None
        raise


def _read_sidecar(sidecar: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return None
    valid = (isinstance(data, dict) and isinstance(data.get("url"), str)
             and type(data.get("size")) is int and isinstance(data.get("version"), str))
    return data if valid else None


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    if path.suffix == ".safetensors":
        try:
            path.with_suffix(".json").unlink()
        except FileNotFoundError:
            pass
