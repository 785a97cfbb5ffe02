"""One device the daemon serves: its transport, its cache, the thread its copies run on, the
signal that room was freed, and its loads in flight. The lifecycle of its entries lives here:
look up, load once for all askers (from a host copy when the host tier has one, else from the
file), make room (evicted entries go to the host tier), fill, remove, trim, reconfigure,
collect, close.

Everything but the copies runs on the event loop, so the state needs no locks; a load or a
free is handed to the device's executor (one thread per GPU, for CUDA calls).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import itertools
import logging
import time
from typing import Any, Callable, Hashable, TypeVar

import torch

from loracache.shared.errors import ErrorCode, LoraCacheError
from loracache.shared.humanize import human_bytes
from loracache.shared.protocol import TensorSpec
from loracache.shared.transport import PROBE_BYTES, DeviceBuffer, Transport, probe_pattern

from .cache import DeviceCache, Entry, LoadTimes
from .config import DaemonConfig
from .files import FileIdentity
from .host_tier import HostCopy, HostTier
from .loader import fill_buffer, plan_load

log = logging.getLogger("loracache.daemon")

CPU_LOAD_THREADS = 4
PROBE_PATH = "<probe>"  # what lists and logs show for a probe's entry
STAGES = ("read", "convert", "upload")  # where a load's time goes (DeviceStats.stage_seconds)
T = TypeVar("T")


class Device:
    """``name`` is what clients call it (``cpu``, ``cuda:<uuid>``)."""

    def __init__(self, transport: Transport, config: DaemonConfig,
                 header_pool: concurrent.futures.Executor,
                 entry_ids: itertools.count[int], host: HostTier | None = None) -> None:
        """``header_pool`` reads file headers (shared by all devices); ``entry_ids`` numbers
        entries daemon-wide; ``host``: the host tier evicted entries go to (None: freed)."""
        self.name = transport.device
        self.transport = transport
        self.total_memory = transport.total_memory()
        self.cache = DeviceCache(self.name, config.budget(self.name, self.total_memory),
                                 config.cache_size_for(self.name))
        self.pool = concurrent.futures.ThreadPoolExecutor(
            CPU_LOAD_THREADS if self.name == "cpu" else 1, f"loracache-{self.name[:12]}")
        self.host = host
        self.stage_times = {stage: LoadTimes() for stage in STAGES}
        self._header_pool = header_pool
        self._entry_ids = entry_ids
        self._demotions: set[asyncio.Task[None]] = set()  # GPU entries being copied to host
        # What evicts and clears matched while copies to host memory were under way: such a
        # copy of a matching file is not kept (cleared once no copy is under way).
        self._drop_log: list[Callable[[str], bool]] = []
        self._loading: dict[Hashable, asyncio.Future[None]] = {}  # single flight, per file
        self._room_freed = asyncio.Event()
        self._collecting: concurrent.futures.Future[None] | None = None

    # ------------------------------------------------------------------------------ entries

    def cached(self, identity: FileIdentity, layout: str) -> Entry | None:
        """The cached entry for the file, touched, or None when it must be (or is being) loaded."""
        entry = self.cache.entries.get((identity, layout))
        if entry is not None:
            self.cache.touch(entry)
        return entry

    async def entry(self, identity: FileIdentity, layout: str,
                    acquire_timeout: float) -> tuple[Entry, bool]:
        """The cached entry for the file, loading it once for all concurrent askers.

        Returns ``(entry, loaded_by_this_call)``. The entry is in the cache when this returns,
        and stays there until the caller next awaits.
        """
        key = (identity, layout)  # a plain tuple: hashed in C on every hit
        while (pending := self._loading.get(key)) is not None or key not in self.cache.entries:
            if pending is None:
                return await self._load_once(key, identity, layout, acquire_timeout), True
            await asyncio.shield(pending)  # re-raises the loader's error for every waiter
        return self.cache.entries[key], False

    async def _load_once(self, key: Hashable, identity: FileIdentity, layout: str,
                         acquire_timeout: float) -> Entry:
        done = asyncio.get_running_loop().create_future()
        self._loading[key] = done
        try:
            entry = await self._load(key, identity, layout, acquire_timeout)
        except Exception as exc:
            done.set_exception(exc)
            done.exception()  # waiters re-raise it; with none, it must not be reported as lost
            raise
        except BaseException:
            done.cancel()
            raise
        finally:
            del self._loading[key]
        done.set_result(None)
        return entry

    async def _load(self, key: Hashable, identity: FileIdentity, layout: str,
                    acquire_timeout: float) -> Entry:
        copy = self.host.find(key) if self.host is not None else None
        if copy is not None:
            return await self._from_host(copy, acquire_timeout)
        started = time.monotonic()
        plan = await self.run_in(self._header_pool, plan_load, identity, layout)
        try:
            need = self.transport.footprint(plan.nbytes)
            self._check_fits(need, identity.path)
            await self.reserve(need, acquire_timeout)
            entry_id = f"{next(self._entry_ids):x}"
            try:
                buffer = await self._fill(fill_buffer, plan, entry_id, path=plan.path,
                                          nbytes=plan.nbytes)
            finally:
                self.unreserve(need)
        finally:
            plan.file.close()
        self.stage_times["read"].record(plan.read_s)
        if plan.convert_s is not None:
            self.stage_times["convert"].record(plan.convert_s)
        entry = Entry(id=entry_id, key=key, path=identity.path, device=self.name,
                      layout=layout, buffer=buffer, tensors=plan.layout.specs,
                      file=identity.token, packed=plan.nbytes)
        return self._added(entry, started, "the file")

    async def _from_host(self, copy: HostCopy, acquire_timeout: float) -> Entry:
        """An entry made from a host copy: the copy itself on the CPU (taken out of the tier,
        no bytes move), one upload on a GPU."""
        assert self.host is not None, "a copy comes from the host tier"
        started = time.monotonic()
        need = self.transport.footprint(copy.nbytes)
        self._check_fits(need, copy.path)
        moved = self.transport is self.host.transport
        if moved:
            self.host.take(copy.key)  # ours while we wait for room; given back on failure
        else:  # mapped now: the tier may let the copy go while we wait, the mapping stays
            contents = copy.buffer.contents()
        entry_id = f"{next(self._entry_ids):x}"
        try:
            await self.reserve(need, acquire_timeout)
        except BaseException:
            if moved:
                self._free_soon(self.host.keep(copy), self.host.transport)
            raise
        try:
            buffer = copy.buffer if moved else await self._fill(
                _upload, contents, entry_id, path=copy.path, nbytes=copy.nbytes)
        finally:
            self.unreserve(need)
        entry = Entry(id=entry_id, key=copy.key, path=copy.path, device=self.name,
                      layout=copy.layout, buffer=buffer, tensors=copy.tensors, file=copy.file,
                      source=copy.source, packed=copy.nbytes)
        return self._added(entry, started, "host memory")

    def _check_fits(self, need: int, path: str) -> None:
        if need > self.cache.budget:
            raise LoraCacheError(ErrorCode.TOO_LARGE,
                                 f"{path} needs {need} bytes on {self.name} but its whole "
                                 f"budget is {self.cache.budget}; raise --max-bytes")

    def _added(self, entry: Entry, started: float, origin: str) -> Entry:
        self.cache.add(entry)
        self.cache.loads += 1
        seconds = time.monotonic() - started
        self.cache.load_times.record(seconds)
        log.info("loaded %s on %s from %s: %s (%d bytes), %d tensors in %.3f s", entry.path,
                 self.name, origin, human_bytes(entry.nbytes), entry.nbytes, len(entry.tensors),
                 seconds)
        return entry

    async def _fill(self, fill: Callable[..., DeviceBuffer], *args: Any, path: str,
                    nbytes: int) -> DeviceBuffer:
        """Allocate and fill an entry's buffer (``fill(self.transport, *args)``). When the
        device (or the tmpfs) has less room than the budget promised, free host copies in the
        same tmpfs, then idle entries, one by one, and retry; then CACHE_FULL. Its time is the
        load's upload stage."""
        started = time.monotonic()
        while True:
            try:
                buffer = await self.run(fill, self.transport, *args)
                self.stage_times["upload"].record(time.monotonic() - started)
                return buffer
            except LoraCacheError as exc:
                if exc.code is not ErrorCode.CACHE_FULL:
                    raise
                host_copies = self.host.copies if self.host is not None and \
                    self.host.transport is self.transport else {}  # in the same tmpfs
                if host_copies:
                    assert self.host is not None
                    victims = self.host.drop_oldest()
                elif self.cache.idle:
                    victim = next(iter(self.cache.idle.values()))
                    log.warning("%s has no room for %s (%s): evicting %s and retrying",
                                self.name, path, human_bytes(nbytes), victim.path)
                    if self.host is not None and self.transport is not self.host.transport:
                        # A GPU's victim is copied to host memory; retry once it is freed.
                        self.remove([victim], demote=True)
                        await asyncio.gather(*self._demotions)
                    else:  # the CPU's must be freed, not moved: host copies share its tmpfs
                        self.cache.remove(victim)
                        await self.run(free_all, self.transport, [victim.buffer])
                    continue
                else:
                    raise
                log.warning("%s has no room for %s (%s): freeing a host copy (%s) and retrying",
                            self.name, path, human_bytes(nbytes), human_bytes(victims[0].nbytes))
                await self.run(free_all, self.transport, victims)

    async def make_probe(self, acquire_timeout: float) -> Entry:
        """A fresh probe (``loracache doctor``'s test lease): a small buffer holding
        :func:`probe_pattern`, lent like an entry but never cached. It takes room in the budget
        as a load does (``reserved``) until :meth:`give_back` frees it."""
        need = self.transport.footprint(PROBE_BYTES)
        await self.reserve(need, acquire_timeout)
        entry_id = f"probe-{next(self._entry_ids):x}"
        try:
            buffer = await self.run(_probe_buffer, self.transport, entry_id)
        except BaseException:
            self.unreserve(need)
            raise
        return Entry(id=entry_id, key=(PROBE_PATH, entry_id), path=PROBE_PATH,
                     device=self.name, layout="raw", buffer=buffer, cached=False,
                     tensors=[TensorSpec("probe", "U8", [PROBE_BYTES], 0)])

    # --------------------------------------------------------------------------------- room

    async def reserve(self, nbytes: int, acquire_timeout: float) -> None:
        """Make room for ``nbytes`` by evicting, waiting for releases up to the timeout."""
        cache = self.cache
        deadline = time.monotonic() + acquire_timeout
        while (victims := cache.victims_for(nbytes)) is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LoraCacheError(
                    ErrorCode.CACHE_FULL,
                    f"no room for {nbytes} bytes on {self.name} after waiting "
                    f"{acquire_timeout:g} s: budget {cache.budget}, used {cache.used}, leased "
                    f"{cache.leased_bytes}, pinned {cache.pinned_bytes}, loading "
                    f"{cache.reserved}; release leases, unpin entries, or raise --max-bytes / "
                    "acquire_timeout")
            try:
                await asyncio.wait_for(self._room_freed.wait(), remaining)
            except TimeoutError:
                pass
        self.remove(victims, demote=True)
        cache.reserved += nbytes

    def unreserve(self, nbytes: int) -> None:
        self.cache.reserved -= nbytes
        self.room_changed()

    def room_changed(self) -> None:
        """Wake everyone waiting for room (they check again)."""
        event, self._room_freed = self._room_freed, asyncio.Event()
        event.set()

    def give_back(self, entry: Entry) -> None:
        """One lease on ``entry`` ended; a probe is freed once its lease is back."""
        self.cache.give_back(entry)
        if not entry.cached and entry.leases == 0:
            self.discard_probe(entry)

    def discard_probe(self, probe: Entry) -> None:
        """Free a probe nobody holds, and the room it took."""
        self.unreserve(probe.nbytes)
        self.pool.submit(free_all, self.transport, [probe.buffer])

    def remove(self, entries: list[Entry], demote: bool = False) -> None:
        """Take ``entries`` out of the cache now; free their memory on the device's thread,
        or with ``demote`` (evicted for room) keep their bytes in the host tier."""
        for entry in entries:
            self.cache.remove(entry)
            log.info("evicted %s from %s: %s (%d bytes)%s", entry.path, self.name,
                     human_bytes(entry.nbytes), entry.nbytes,
                     " to host memory" if demote and self.host is not None else "")
        if not entries:
            return
        if not demote or self.host is None:
            self._free_soon([e.buffer for e in entries])
        elif self.transport is self.host.transport:  # the CPU: the buffers themselves move
            for entry in entries:
                self._free_soon(self.host.keep(_host_copy(entry, entry.buffer)),
                                self.host.transport)
        else:  # submitted now, so the copy runs (and frees) before any fill queued after it
            kept = [e for e in entries if e.key in self.host.copies]  # copied already
            entries = [e for e in entries if e.key not in self.host.copies]
            for entry in kept:
                self.host.copies.move_to_end(entry.key)  # used more recently than its place
            self._free_soon([e.buffer for e in kept])
            copying = self.pool.submit(_copy_to_host, self.host.transport, entries)
            task = asyncio.get_running_loop().create_task(
                self._demoted(entries, copying, len(self._drop_log)))
            self._demotions.add(task)
            task.add_done_callback(self._demotion_done)

    async def _demoted(self, entries: list[Entry],
                       copying: concurrent.futures.Future[list[DeviceBuffer | None]],
                       since: int) -> None:
        """Keep the host copies of evicted GPU entries once they are made, unless an evict or
        clear of their file came meanwhile (``_drop_log`` from ``since``: they are freed)."""
        assert self.host is not None, "demoted to the host tier"
        copies = await asyncio.wrap_future(copying)
        for entry, buffer in zip(entries, copies):
            if buffer is None:
                continue
            if any(match(entry.path) for match in self._drop_log[since:]):
                self._free_soon([buffer], self.host.transport)
            else:
                self._free_soon(self.host.keep(_host_copy(entry, buffer)), self.host.transport)

    def _demotion_done(self, task: asyncio.Task[None]) -> None:
        self._demotions.discard(task)
        if not self._demotions:
            self._drop_log.clear()

    def _free_soon(self, buffers: list[DeviceBuffer],
                   transport: Transport | None = None) -> None:
        """Free ``buffers`` (of ``transport``, by default the device's) on the device's
        thread."""
        if buffers:
            self.pool.submit(free_all, transport or self.transport, buffers)

    def trim(self) -> None:
        """Drop idle entries beyond the cache-size cap (to the host tier)."""
        self.remove(self.cache.over_cap(), demote=True)

    def drop(self, match: Callable[[str], bool]) -> tuple[int, int]:
        """Evict the idle entries whose path ``match`` accepts (no host copy is kept);
        returns (evicted, still leased)."""
        if self._demotions:
            self._drop_log.append(match)
        matching = [e for e in self.cache.entries.values() if match(e.path)]
        idle = [e for e in matching if e.leases == 0]
        self.remove(idle)
        self.room_changed()
        return len(idle), len(matching) - len(idle)

    def reconfigure(self, config: DaemonConfig) -> None:
        """Apply a reloaded configuration's limits: lower ones evict idle entries at once."""
        cache = self.cache
        cache.budget = config.budget(self.name, self.total_memory)
        cache.cache_size = config.cache_size_for(self.name)
        self.remove(cache.over_limits())
        self.room_changed()
        log.info("device %s: budget %s (%d bytes), cache size %d", self.name,
                 human_bytes(cache.budget), cache.budget, cache.cache_size)

    # ---------------------------------------------------------------------- device memory

    def allocator_stats(self) -> dict[str, int]:
        """What the device's allocator holds (GPUs): ``waiting_bytes`` is memory of evicted
        entries that workers still map, which the budget no longer counts."""
        memory = self.transport.memory()
        if not memory:
            return {}
        return {"allocated_bytes": memory["allocated"], "reserved_bytes": memory["reserved"],
                "waiting_bytes": max(0, memory["allocated"] - self.cache.used
                                     - self.cache.reserved)}

    def collect_memory(self) -> None:
        """Free device memory that workers let go of since its entry was evicted. torch frees
        such memory only when asked (or at the next eviction), so ask whenever the allocator
        holds more than the cache counts: waiting memory, or segments freed already (torch
        frees a block at its next IPC bookkeeping, an export on the event loop) but still
        cached. On the device's thread, one collection at a time."""
        if self._collecting is not None and not self._collecting.done():
            return
        held = self.allocator_stats()
        if held and (held["waiting_bytes"] > 0
                     or held["reserved_bytes"] > held["allocated_bytes"]):
            self._collecting = self.pool.submit(self.transport.collect)

    # ------------------------------------------------------------------------------ threads

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the device's thread."""
        return await self.run_in(self.pool, fn, *args)

    @staticmethod
    async def run_in(pool: concurrent.futures.Executor, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args))

    def close(self) -> None:
        """Free every entry (leased ones too: the daemon is stopping) and what the transport
        made on the host; waits for the device's thread to finish."""
        entries = self.cache.take_all()
        self.pool.submit(free_all, self.transport, [e.buffer for e in entries])
        self.pool.shutdown(wait=True)
        self.transport.close()


def _probe_buffer(transport: Transport, name: str) -> DeviceBuffer:
    buffer = transport.allocate(PROBE_BYTES, name)
    buffer.write_tensors([(0, probe_pattern())])
    return buffer


def _upload(transport: Transport, contents: torch.Tensor, name: str) -> DeviceBuffer:
    """A buffer of ``transport`` holding a host copy's bytes."""
    buffer = transport.allocate(contents.numel(), name)
    try:
        buffer.write_tensors([(0, contents)])
    except BaseException:
        buffer.free()
        raise
    return buffer


def _copy_to_host(host: Transport, entries: list[Entry]) -> list[DeviceBuffer | None]:
    """Host buffers holding the evicted ``entries``' packed bytes (None where the copy failed,
    e.g. no room in host memory: that entry is just dropped); frees the device buffers."""
    copies: list[DeviceBuffer | None] = []
    for entry in entries:
        try:
            contents = entry.buffer.contents()[:entry.packed].cpu()
            copies.append(_upload(host, contents, f"host-{entry.id}"))
        except Exception as exc:  # a copy is an optimisation: never worth failing over
            log.warning("no host copy of %s: %s", entry.path, exc)
            copies.append(None)
        finally:
            entry.buffer.free()
    return copies


def _host_copy(entry: Entry, buffer: DeviceBuffer) -> HostCopy:
    return HostCopy(key=entry.key, path=entry.path, layout=entry.layout, source=entry.source,
                    file=entry.file, buffer=buffer, tensors=entry.tensors)


def free_all(transport: Transport, buffers: list[DeviceBuffer]) -> None:
    """Free ``buffers`` and let the transport reclaim what it can (on a device's thread)."""
    for buffer in buffers:
        buffer.free()
    transport.collect()
