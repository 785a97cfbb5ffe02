"""The node-local disk tier: remote LoRA files downloaded once per node into ``cache_dir``.

However many workers and devices ask for a URL at once, it is downloaded once (single flight
on the event loop; the transfer runs in a thread). A download streams into ``.partial/``, is
checked (the announced size, then the safetensors header) and renamed into place with a JSON
sidecar that records its URL and version, so a crash never leaves a half file that looks whole.
The files outlive the daemon: the index is rebuilt from the sidecars at start. Least recently
used files go when the directory's byte budget is exceeded.

A URL fetched once is served from disk; after ``revalidate_s`` the next request asks the source
(HEAD) whether it changed, and a changed file (new ETag, or size and modification time) is a new
download under a new name, so entries made from the old one stay what they were. The HTTP and S3
protocols are obstore's.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime
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
from typing import TYPE_CHECKING, Any, Callable

import obstore
from obstore.store import HTTPStore

from loracache.shared.errors import ErrorCode, LoraCacheError
from loracache.shared.humanize import human_bytes
from loracache.shared.safetensors_header import read_header

from .config import ConfigError
from .sources import RemoteSource

if TYPE_CHECKING:
    from obstore.store import RetryConfig

log = logging.getLogger("loracache.daemon")

PARTIAL = ".partial"
# The names the cache writes: it touches no other file in its directory.
OWN_NAME = re.compile(r"[0-9a-f]{32}\.(safetensors|json)")
CHUNK = 8 << 20
CONNECT_TIMEOUT = "10s"
TRANSFER_TIMEOUT = "3600s"  # a whole request, body included: GBs at slow speeds
# obstore retries failed requests: a few, briefly, so a dead source fails in about a minute.
RETRIES: RetryConfig = {"max_retries": 2, "retry_timeout": datetime.timedelta(seconds=30)}


@dataclasses.dataclass
class DiskFile:
    """One downloaded file and the version of the remote it came from."""

    url: str
    path: Path
    size: int
    version: str  # the ETag, or size and modification time where the source gives none
    checked: float = -math.inf  # time.monotonic() of the last look at the source


class DiskCache:
    """Downloads under ``directory``, at most ``budget`` bytes of them."""

    def __init__(self, directory: Path, budget: int, revalidate_s: float) -> None:
        self.directory = directory
        self.budget = budget
        self.revalidate_s = revalidate_s
        self.files: OrderedDict[str, DiskFile] = OrderedDict()  # by URL, least recent first
        self._inflight: dict[str, asyncio.Future[DiskFile]] = {}
        # Files handed out and not yet loaded from: eviction leaves them; a replaced one is
        # removed once the last user is done with it.
        self._in_use: collections.Counter[Path] = collections.Counter()
        self._doomed: set[Path] = set()
        self._stores: dict[tuple[str, str], Any] = {}
        self._stores_lock = threading.Lock()
        self._lock_file = _lock_directory(directory)
        self._rebuild()

    @property
    def used(self) -> int:
        return sum(f.size for f in self.files.values())

    async def fetch(self, source: RemoteSource) -> Path:
        """The local copy of ``source``, downloaded (once, however many ask) if needed. The
        file is the caller's until it calls :meth:`done` with it: nothing removes it meanwhile."""
        known = self.files.get(source.url)
        if known is None or time.monotonic() - known.checked >= self.revalidate_s:
            future = self._inflight.get(source.url)
            if future is None:
                future = _in_thread(self._refresh, source, known)
                self._inflight[source.url] = future
                future.add_done_callback(lambda _: self._inflight.pop(source.url, None))
            known = await asyncio.shield(future)
            self._keep(known)
        self.files.move_to_end(source.url)
        self._in_use[known.path] += 1
        return known.path

    def done(self, path: Path) -> None:
        """The caller of :meth:`fetch` has loaded what it needed from ``path``."""
        self._in_use[path] -= 1
        if self._in_use[path] <= 0:
            del self._in_use[path]
            if path in self._doomed:
                self._doomed.discard(path)
                _remove(path)
            self._trim()

    def close(self) -> None:
        """Let go of the directory (downloads under way are in daemon threads: abandoned)."""
        self._lock_file.close()

    # ---------------------------------------------------------------------- on the event loop

    def _keep(self, fetched: DiskFile) -> None:
        """Index ``fetched`` as the URL's file and trim the directory to the budget."""
        old = self.files.pop(fetched.url, None)
        self.files[fetched.url] = fetched
        if old is not None and old.path != fetched.path:
            self._discard(old.path)  # an entry loaded from it holds its own copy
        self._trim(keep=fetched)

    def _trim(self, keep: DiskFile | None = None) -> None:
        """Evict least recently used files beyond the budget, except ``keep`` and files in
        use (trimmed once their users are done)."""
        for url, victim in list(self.files.items()):
            if self.used <= self.budget:
                break
            if victim is keep or victim.path in self._in_use:
                continue
            del self.files[url]
            self._discard(victim.path)
            log.info("disk cache: evicted %s (%s) for room", url, human_bytes(victim.size))

    def _discard(self, path: Path) -> None:
        if path in self._in_use:
            self._doomed.add(path)
        else:
            _remove(path)

    # ------------------------------------------------------------------------ in the threads

    def _refresh(self, source: RemoteSource, known: DiskFile | None) -> DiskFile:
        """``known`` if the source still has that version, else a fresh download."""
        store, key = self._store(source), source.path.lstrip("/")
        if known is not None and known.path.exists():
            checked = time.monotonic()
            try:
                meta = obstore.head(store, key)
            except Exception as exc:  # the source is away: what we have is the best answer
                log.warning("could not check %s for changes (%s); serving the copy from %s",
                            source.url, _reason(exc), known.path)
                return dataclasses.replace(known, checked=checked)
            if _version(meta) == known.version:
                return dataclasses.replace(known, checked=checked)
        return self._download(source, store, key)

    def _download(self, source: RemoteSource, store: Any, key: str) -> DiskFile:
        try:
            result = obstore.get(store, key)
        except Exception as exc:
            raise _source_error(source, exc) from None
        size, version = int(result.meta["size"]), _version(result.meta)
        if size > self.budget:
            raise LoraCacheError(ErrorCode.TOO_LARGE,
                                 f"{source.url} is {human_bytes(size)}, more than the whole disk "
                                 f"cache ({human_bytes(self.budget)}); raise cache_max_bytes")
        partial = self.directory / PARTIAL / secrets.token_hex(8)
        try:
            written = self._stream(source, result, partial, size)
            if written != size:
                raise LoraCacheError(ErrorCode.SOURCE_FAILED,
                                     f"{source.url} was cut off: {written} of {size} bytes came")
            with open(partial, "rb") as f:
                read_header(f, source.url)
            name = hashlib.sha256(f"{source.url}\0{version}".encode()).hexdigest()[:32]
            final = self.directory / f"{name}.safetensors"
            os.replace(partial, final)
            fetched = DiskFile(source.url, final, size, version, time.monotonic())
            _write_sidecar(fetched)
        finally:
            _remove(partial)
        log.info("downloaded %s (%s) to %s", source.url, human_bytes(size), final)
        return fetched

    def _stream(self, source: RemoteSource, result: Any, partial: Path, size: int) -> int:
        written = 0
        try:
            with open(partial, "wb") as out:
                for chunk in result.stream(min_chunk_size=CHUNK):
                    written += len(chunk)
                    if written > size:
                        raise LoraCacheError(ErrorCode.SOURCE_FAILED,
                                             f"{source.url} sent more than the {size} bytes it "
                                             "announced")
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        except LoraCacheError:
            raise
        except Exception as exc:  # cut off, timed out, or the disk is full
            raise _source_error(source, exc) from None
        return written

    def _store(self, source: RemoteSource) -> Any:
        """One store per host, so connections are reused."""
        key = (source.scheme, source.authority)
        with self._stores_lock:
            if key not in self._stores:
                if source.scheme not in ("https", "http"):
                    raise LoraCacheError(ErrorCode.SOURCE_FAILED,
                                         f"{source.url}: this daemon does not fetch "
                                         f"{source.scheme}:// sources yet; use https://")
                try:
                    self._stores[key] = HTTPStore.from_url(
                        f"{source.scheme}://{source.authority}", retry_config=RETRIES,
                        client_options={"allow_http": source.scheme == "http",
                                        "connect_timeout": CONNECT_TIMEOUT,
                                        "timeout": TRANSFER_TIMEOUT})
                except Exception as exc:
                    raise _source_error(source, exc) from None
            return self._stores[key]

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
        for _, fetched in sorted(found, key=lambda pair: pair[0]):
            self.files[fetched.url] = fetched
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
        try:
            result = work(*args)
        except BaseException as exc:  # noqa: B036 (handed to the waiting coroutines)
            loop.call_soon_threadsafe(settle, future.set_exception, exc)
        else:
            loop.call_soon_threadsafe(settle, future.set_result, result)

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


def _version(meta: Any) -> str:
    etag = meta.get("e_tag")
    if etag:
        return f"etag:{etag}"
    modified = meta.get("last_modified")
    return f"size:{meta['size']}:modified:{modified.isoformat() if modified else ''}"


def _source_error(source: RemoteSource, exc: Exception) -> LoraCacheError:
    if isinstance(exc, FileNotFoundError):
        return LoraCacheError(ErrorCode.NOT_FOUND, f"{source.url}: the source has no such file")
    if isinstance(exc, (obstore.exceptions.UnauthenticatedError,
                        obstore.exceptions.PermissionDeniedError, PermissionError)):
        return LoraCacheError(ErrorCode.SOURCE_FAILED,
                              f"{source.url}: the source refused the daemon ({_reason(exc)}); "
                              "give the daemon credentials for it")
    return LoraCacheError(ErrorCode.SOURCE_FAILED,
                          f"fetching {source.url} failed: {_reason(exc)}")


def _reason(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


def _write_sidecar(fetched: DiskFile) -> None:
    sidecar = fetched.path.with_suffix(".json")
    partial = fetched.path.parent / PARTIAL / f"{sidecar.name}.{secrets.token_hex(4)}"
    partial.write_text(json.dumps({"url": fetched.url, "size": fetched.size,
                                   "version": fetched.version}))
    os.replace(partial, sidecar)


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
