"""The daemon's logic: one handler per request type, over the caches and the session table.

It touches no sockets (the server feeds it decoded requests) and owns all cache state from the
event loop, so it needs no locks. File reads and device copies run in executor threads: one
pool for headers, and one per device for loads (a single thread per GPU, for CUDA calls).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import functools
import inspect
import itertools
import logging
import os
import secrets
import time
from typing import Any, Awaitable, Callable, Hashable

from loracache.shared.device_names import same_device
from loracache.shared.errors import ErrorCode, LoraCacheError
from loracache.shared.humanize import human_bytes
from loracache.shared.ipc_compat import check_importer, torch_release
from loracache.shared.protocol import (
    Acquire,
    AcquireResult,
    Bye,
    Clear,
    Evict,
    Heartbeat,
    Hello,
    HelloResult,
    ListEntries,
    Preload,
    Probe,
    Release,
    Request,
    RequestFrame,
    Stats,
    TensorSpec,
)
from loracache.shared.transport import PROBE_BYTES, DeviceBuffer, Transport, probe_pattern

from .cache import DeviceCache, Entry
from .config import DaemonConfig, PreloadSpec
from .files import FileIdentity, confine, identify
from .loader import LoadPlan, fill_buffer, plan_load
from .sessions import Lease, Session, SessionTable

log = logging.getLogger("loracache.daemon")

# Ops that need a session; the others (stats, list, preload, ...) also serve tools like the CLI.
SESSION_OPS = (Acquire, Release, Heartbeat, Bye, Probe)
PROBE_PATH = "<probe>"  # what lists and logs show for a probe's entry
CPU_LOAD_THREADS = 4
MAX_PID = 2**22  # the kernel's PID_MAX_LIMIT


class CacheService:
    def __init__(self, config: DaemonConfig, transports: list[Transport]) -> None:
        self.config = config
        self.instance = secrets.token_hex(8)
        self.started = time.monotonic()
        self.transports = {t.device: t for t in transports}
        self.total_memory = {t.device: t.total_memory() for t in transports}
        self.caches = {device: DeviceCache(device, config.budget(device, total),
                                           config.cache_size_for(device))
                       for device, total in self.total_memory.items()}
        self.sessions = SessionTable(config.session_ttl)
        self.errors: collections.Counter[str] = collections.Counter()  # replies by error code
        self.metrics_address: str | None = None  # set by the server when it serves metrics
        self._header_pool = concurrent.futures.ThreadPoolExecutor(4, "loracache-header")
        self._device_pools = {
            t.device: concurrent.futures.ThreadPoolExecutor(
                CPU_LOAD_THREADS if t.device == "cpu" else 1, f"loracache-{t.device[:12]}")
            for t in transports}
        self._loading: dict[Hashable, asyncio.Future[None]] = {}
        self._collecting: dict[str, concurrent.futures.Future[None]] = {}
        self._room_freed = {device: asyncio.Event() for device in self.caches}
        self._entry_ids = itertools.count(1)
        # Each takes its request and the session (None for ops that need none).
        self._handlers: dict[type[Request], Callable[[Any, Any], Any]] = {
            Hello: self._hello, Acquire: self._acquire, Release: self._release,
            Heartbeat: self._heartbeat, Bye: self._bye, Stats: self._stats,
            ListEntries: self._list, Preload: self._preload, Evict: self._evict,
            Clear: self._clear, Probe: self._probe,
        }

    # ------------------------------------------------------------------------------ dispatch

    def handle(self, frame: RequestFrame, admin: bool = True) -> Any:
        """Run the handler of ``frame``'s request type.

        Returns the result, or an awaitable of it when the request has to wait (for a load, or
        for room in the cache). Everything else, every hit included, is answered at once.
        ``admin``: whether it came on a socket that may evict, clear and pin.
        """
        if not admin and _is_admin_op(frame.request):
            raise LoraCacheError(ErrorCode.NOT_ALLOWED,
                                 f"{frame.request.op}{' --pin' if _is_pin(frame.request) else ''}"
                                 f" is served on the admin socket {self.config.admin_socket} "
                                 "only; use it (loracache --socket ...) as a member of its group")
        session = None
        if isinstance(frame.request, SESSION_OPS):
            session = self.sessions.get(frame.session)
        elif frame.session in self.sessions.sessions:
            session = self.sessions.get(frame.session)  # any message refreshes its session
        return self._handlers[type(frame.request)](frame.request, session)

    # ------------------------------------------------------------------------------ handlers

    def _hello(self, req: Hello, _: Session | None) -> HelloResult:
        if not 0 <= req.pid <= MAX_PID:
            raise LoraCacheError(ErrorCode.BAD_REQUEST,
                                 f"pid {req.pid} is not a process id (0 to {MAX_PID}); send the "
                                 "client's os.getpid(), or 0 if unknown")
        token = ""
        if req.open_session:
            token = self.sessions.open(req.pid, req.torch).token
            log.debug("session opened for pid %d (%s, torch %s)", req.pid,
                      req.client or "client", req.torch or "unknown")
        return HelloResult(instance=self.instance, session=token,
                           session_ttl=self.config.session_ttl, devices=list(self.caches),
                           torch=torch_release())

    def _acquire(self, req: Acquire,
                 session: Session) -> AcquireResult | Awaitable[AcquireResult]:
        cache = self._cache(req.device)
        if cache.device != "cpu":
            check_importer(torch_release(), session.torch)
        identity = identify(req.path, self.config.lora_dirs)
        entry = self._cached(cache, identity, req.layout)
        if entry is None:
            return self._acquire_loading(cache, identity, req, session)
        result = self._lend(cache, entry, req, session)
        cache.hits += 1  # counted once lent: hits + misses = acquires that succeeded
        return result

    async def _acquire_loading(self, cache: DeviceCache, identity: FileIdentity, req: Acquire,
                               session: Session) -> AcquireResult:
        entry, loaded = await self._entry(cache, identity, req.layout)
        if self.sessions.sessions.get(session.token) is not session:
            self._trim(cache)  # the session expired while the entry was loading
            raise LoraCacheError(ErrorCode.UNKNOWN_SESSION,
                                 "the session expired while the entry was loading; send hello "
                                 "again and keep heartbeating (the client library does)")
        result = self._lend(cache, entry, req, session)
        if loaded:
            cache.misses += 1
        else:
            cache.hits += 1
        return result

    def _lend(self, cache: DeviceCache, entry: Entry, req: Acquire,
              session: Session) -> AcquireResult:
        self._check_quota(cache, entry, session)
        handle = entry.buffer.export()
        lease = self.sessions.add_lease(session, entry, handle)
        cache.lend(entry)
        return AcquireResult(lease=lease.id, entry=entry.info(), handle=handle,
                             tensors=None if req.known_entry == entry.id else entry.tensors)

    async def _probe(self, req: Probe, session: Session) -> AcquireResult:
        """Lend a fresh probe buffer: the same export path as an entry's, outside the cache.
        One per session at a time; it takes room in the budget as a load does (``reserved``)
        until it is released."""
        cache = self._cache(req.device)
        if cache.device != "cpu":
            check_importer(torch_release(), session.torch)
        if any(not lease.entry.cached for lease in session.leases.values()):
            raise LoraCacheError(ErrorCode.NOT_ALLOWED, "this session holds a probe already; "
                                 "release it first")
        self._check_lease_count(session)
        transport = self.transports[cache.device]
        need = transport.footprint(PROBE_BYTES)
        await self._reserve(cache, need)
        entry_id = f"probe-{next(self._entry_ids):x}"
        try:
            buffer = await self._run(self._device_pools[cache.device], _probe_buffer,
                                     transport, entry_id)
            if self.sessions.sessions.get(session.token) is not session:
                self._device_pools[cache.device].submit(_free_all, transport, [buffer])
                raise LoraCacheError(ErrorCode.UNKNOWN_SESSION, "the session expired while "
                                     "the probe was made; send hello again")
        except BaseException:
            cache.reserved -= need
            self._room_changed(cache)
            raise
        entry = Entry(id=entry_id, key=(PROBE_PATH, entry_id), path=PROBE_PATH,
                      device=cache.device, layout="raw", buffer=buffer, cached=False,
                      tensors=[TensorSpec("probe", "U8", [PROBE_BYTES], 0)])
        lease = self.sessions.add_lease(session, entry, entry.buffer.export())
        cache.lend(entry)
        return AcquireResult(lease=lease.id, entry=entry.info(), handle=lease.handle,
                             tensors=entry.tensors)

    def _check_quota(self, cache: DeviceCache, entry: Entry, session: Session) -> None:
        """Refuse a lease beyond the session's quotas (so one client cannot hold the cache)."""
        self._check_lease_count(session)
        if self.config.session_max_bytes is None or session.holds(entry):
            return
        max_bytes = self.config.session_max_bytes.resolve(self.total_memory[cache.device])
        held = session.leased_bytes[cache.device]
        if held + entry.nbytes > max_bytes:
            self._trim(cache)  # a fresh load nobody holds must not stay beyond the cache size
            raise LoraCacheError(ErrorCode.NOT_ALLOWED,
                                 f"leasing {entry.path} ({entry.nbytes} bytes) would make this "
                                 f"session hold {held + entry.nbytes} bytes on {cache.device}, "
                                 f"over session_max_bytes ({max_bytes}); release leases first")

    def _check_lease_count(self, session: Session) -> None:
        limit = self.config.session_max_leases
        if len(session.leases) >= limit:
            raise LoraCacheError(ErrorCode.NOT_ALLOWED,
                                 f"this session holds {len(session.leases)} leases, the most "
                                 f"one session may hold (session_max_leases = {limit}); release "
                                 "some first")

    def _release(self, req: Release, session: Session) -> dict[str, Any]:
        lease = self.sessions.release(session, req.lease)
        if not req.opened:  # the client could not map it: undo what the export left to it
            lease.entry.buffer.forget_export(lease.handle)
        self._released([lease])
        return {}

    def _heartbeat(self, req: Heartbeat, session: Session) -> dict[str, Any]:
        return {}

    def _bye(self, req: Bye, session: Session) -> dict[str, Any]:
        self._released(self.sessions.close(session))
        return {}

    def _stats(self, req: Stats, _: Session | None) -> dict[str, Any]:
        return self.stats()

    def stats(self) -> dict[str, Any]:
        """Counters of the daemon and of each device (what ``loracache stats`` prints)."""
        sessions_by_device: collections.Counter[str] = collections.Counter()
        for session in self.sessions.sessions.values():
            sessions_by_device.update({lease.entry.device for lease in session.leases.values()})
        return {"instance": self.instance, "pid": os.getpid(),
                "uptime_s": time.monotonic() - self.started,
                "sessions": len(self.sessions.sessions),
                "leases": sum(c.leases for c in self.caches.values()),
                "errors": dict(self.errors),
                "metrics": self.metrics_address,
                "devices": [{**cache.stats(), "sessions": sessions_by_device[device],
                             **self._allocator_stats(cache)}
                            for device, cache in self.caches.items()]}

    def _allocator_stats(self, cache: DeviceCache) -> dict[str, int]:
        """What the device's allocator holds (GPUs): ``waiting_bytes`` is memory of evicted
        entries that workers still map, which the budget no longer counts."""
        memory = self.transports[cache.device].memory()
        if not memory:
            return {}
        return {"allocated_bytes": memory["allocated"], "reserved_bytes": memory["reserved"],
                "waiting_bytes": max(0, memory["allocated"] - cache.used - cache.reserved)}

    def collect_memory(self) -> None:
        """Free device memory that workers let go of since its entry was evicted. torch frees
        such memory only when asked (or at the next eviction), so the daemon asks whenever
        the allocator holds more than the cache counts (on the device's thread, one at a
        time)."""
        for device, cache in self.caches.items():
            pending = self._collecting.get(device)
            if pending is not None and not pending.done():
                continue
            held = self._allocator_stats(cache)
            # Waiting memory, or segments freed already (torch frees a block whose consumers
            # let go at its next IPC bookkeeping, an export on the event loop) but still cached.
            if held and (held["waiting_bytes"] > 0
                         or held["reserved_bytes"] > held["allocated_bytes"]):
                self._collecting[device] = self._device_pools[device].submit(
                    self.transports[device].collect)

    def summary(self) -> str:
        """One line for ``systemctl status``: entries, bytes, sessions and leases."""
        used = sum(c.used for c in self.caches.values())
        budget = sum(c.budget for c in self.caches.values())
        return (f"{sum(len(c.entries) for c in self.caches.values())} entries, "
                f"{human_bytes(used)} of {human_bytes(budget)} used, "
                f"{len(self.sessions.sessions)} sessions, "
                f"{sum(c.leases for c in self.caches.values())} leases")

    def _list(self, req: ListEntries, _: Session | None) -> dict[str, Any]:
        return {"entries": [dataclasses.asdict(entry.info()) for cache in self.caches.values()
                            for entry in cache.entries.values()]}

    def _preload(self, req: Preload, _: Session | None) -> dict[str, Any] | Awaitable[dict]:
        cache = self._cache(req.device)
        identity = identify(req.path, self.config.lora_dirs)
        entry = self._cached(cache, identity, req.layout)
        if entry is None:
            return self._preload_loading(cache, identity, req)
        return self._settle_preload(cache, entry, req)

    async def _preload_loading(self, cache: DeviceCache, identity: FileIdentity,
                               req: Preload) -> dict[str, Any]:
        entry, _loaded = await self._entry(cache, identity, req.layout)
        return self._settle_preload(cache, entry, req)

    def _settle_preload(self, cache: DeviceCache, entry: Entry, req: Preload) -> dict[str, Any]:
        if req.pin:
            cache.pin(entry)
        info = entry.info()
        self._trim(cache)
        return dataclasses.asdict(info)

    def _evict(self, req: Evict, _: Session | None) -> dict[str, int]:
        path = confine(req.path, self.config.lora_dirs)
        return self._drop(lambda e: e.path == path, req.device)

    def _clear(self, req: Clear, _: Session | None) -> dict[str, int]:
        return self._drop(lambda e: True, req.device)

    # ------------------------------------------------------------------------ cache lifecycle

    def _cached(self, cache: DeviceCache, identity: FileIdentity, layout: str) -> Entry | None:
        """The cached entry for the file, touched, or None when it must be (or is being) loaded."""
        entry = cache.entries.get((identity, layout))
        if entry is not None:
            cache.touch(entry)
        return entry

    async def _entry(self, cache: DeviceCache, identity: FileIdentity,
                     layout: str) -> tuple[Entry, bool]:
        """The cached entry for the file, loading it once for all concurrent askers.

        Returns ``(entry, loaded_by_this_call)``. The entry is in the cache when this returns,
        and stays there until the caller next awaits.
        """
        key = (identity, layout)  # a plain tuple: hashed in C on every hit
        while (pending := self._loading.get(key)) is not None or key not in cache.entries:
            if pending is None:
                return await self._load_once(cache, key, identity, layout), True
            await asyncio.shield(pending)  # re-raises the loader's error for every waiter
        return cache.entries[key], False

    async def _load_once(self, cache: DeviceCache, key: Hashable, identity: FileIdentity,
                         layout: str) -> Entry:
        done = asyncio.get_running_loop().create_future()
        self._loading[key] = done
        try:
            entry = await self._load(cache, key, identity, layout)
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

    async def _load(self, cache: DeviceCache, key: Hashable, identity: FileIdentity,
                    layout: str) -> Entry:
        started = time.monotonic()
        plan = await self._run(self._header_pool, plan_load, identity, layout)
        try:
            need = self.transports[cache.device].footprint(plan.nbytes)
            if need > cache.budget:
                raise LoraCacheError(ErrorCode.TOO_LARGE,
                                     f"{identity.path} needs {need} bytes on {cache.device} but "
                                     f"its whole budget is {cache.budget}; raise --max-bytes")
            await self._reserve(cache, need)
            entry_id = f"{next(self._entry_ids):x}"
            try:
                buffer = await self._fill(cache, plan, entry_id)
            finally:
                cache.reserved -= need
                self._room_changed(cache)
        finally:
            plan.file.close()
        entry = Entry(id=entry_id, key=key, path=identity.path, device=cache.device,
                      layout=layout, buffer=buffer, tensors=plan.layout.specs,
                      file=identity.token)
        cache.add(entry)
        cache.loads += 1
        seconds = time.monotonic() - started
        cache.load_times.record(seconds)
        log.info("loaded %s on %s: %s (%d bytes), %d tensors in %.3f s", identity.path,
                 cache.device, human_bytes(entry.nbytes), entry.nbytes, len(entry.tensors),
                 seconds)
        return entry

    async def _fill(self, cache: DeviceCache, plan: LoadPlan, entry_id: str) -> DeviceBuffer:
        """Allocate and fill the entry's buffer. When the device (or the tmpfs) has less room
        than the budget promised, evict idle entries one by one and retry, then CACHE_FULL."""
        pool, transport = self._device_pools[cache.device], self.transports[cache.device]
        while True:
            try:
                return await self._run(pool, fill_buffer, transport, plan, entry_id)
            except LoraCacheError as exc:
                if exc.code is not ErrorCode.CACHE_FULL or not cache.idle:
                    raise
                victim = next(iter(cache.idle.values()))
                log.warning("%s has no room for %s (%s): evicting %s and retrying", cache.device,
                            plan.path, human_bytes(plan.nbytes), victim.path)
                cache.remove(victim)
                await self._run(pool, _free_all, transport, [victim.buffer])

    async def _reserve(self, cache: DeviceCache, nbytes: int) -> None:
        """Make room for ``nbytes`` by evicting, waiting for releases up to the timeout."""
        deadline = time.monotonic() + self.config.acquire_timeout
        while (victims := cache.victims_for(nbytes)) is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                stats = cache.stats()
                raise LoraCacheError(
                    ErrorCode.CACHE_FULL,
                    f"no room for {nbytes} bytes on {cache.device} after waiting "
                    f"{self.config.acquire_timeout:g} s: budget {cache.budget}, used "
                    f"{cache.used}, leased {stats['leased_bytes']}, pinned "
                    f"{stats['pinned_bytes']}, loading {cache.reserved}; release leases, "
                    "unpin entries, or raise --max-bytes / acquire_timeout")
            try:
                await asyncio.wait_for(self._room_freed[cache.device].wait(), remaining)
            except TimeoutError:
                pass
        self._remove(cache, victims)
        cache.reserved += nbytes

    def _released(self, leases: list[Lease]) -> None:
        caches = {}
        for lease in leases:
            cache = self.caches[lease.entry.device]
            cache.give_back(lease.entry)
            caches[cache.device] = cache
            if not lease.entry.cached and lease.entry.leases == 0:  # a probe: gone once back
                cache.reserved -= lease.entry.nbytes
                self._device_pools[cache.device].submit(
                    _free_all, self.transports[cache.device], [lease.entry.buffer])
        for cache in caches.values():
            self._trim(cache)
            self._room_changed(cache)

    def _trim(self, cache: DeviceCache) -> None:
        """Drop idle entries beyond the cache-size cap."""
        self._remove(cache, cache.over_cap())

    def _drop(self, match: Callable[[Entry], bool], device: str) -> dict[str, int]:
        caches = [self._cache(device)] if device else list(self.caches.values())
        evicted = busy = 0
        for cache in caches:
            matching = [e for e in cache.entries.values() if match(e)]
            idle = [e for e in matching if e.leases == 0]
            self._remove(cache, idle)
            self._room_changed(cache)
            evicted, busy = evicted + len(idle), busy + len(matching) - len(idle)
        return {"evicted": evicted, "busy": busy}

    def _remove(self, cache: DeviceCache, entries: list[Entry]) -> None:
        """Take ``entries`` out of the cache now; free their memory on the device's thread."""
        for entry in entries:
            cache.remove(entry)
            log.info("evicted %s from %s: %s (%d bytes)", entry.path, cache.device,
                     human_bytes(entry.nbytes), entry.nbytes)
        if entries:
            pool = self._device_pools[cache.device]
            pool.submit(_free_all, self.transports[cache.device], [e.buffer for e in entries])

    def _room_changed(self, cache: DeviceCache) -> None:
        event = self._room_freed[cache.device]
        self._room_freed[cache.device] = asyncio.Event()
        event.set()

    # ------------------------------------------------------------------------ configuration

    def reconfigure(self, config: DaemonConfig) -> None:
        """Apply a reloaded configuration: lower limits evict idle entries at once, new roots
        and timeouts apply to the next requests."""
        self.config = config
        self.sessions.ttl = config.session_ttl
        for device, cache in self.caches.items():
            cache.budget = config.budget(device, self.total_memory[device])
            cache.cache_size = config.cache_size_for(device)
            self._remove(cache, cache.over_limits())
            self._room_changed(cache)
            log.info("device %s: budget %s (%d bytes), cache size %d", device,
                     human_bytes(cache.budget), cache.budget, cache.cache_size)
        unknown = set(config.device) - set(self.caches)
        if unknown:
            log.warning("configuration has [device] settings for %s, which this daemon does not "
                        "serve (it serves %s)", ", ".join(sorted(unknown)), ", ".join(self.caches))

    async def preload(self, specs: tuple[PreloadSpec, ...]) -> None:
        """Load the configured LoRAs; a failure is logged with its code and the rest go on."""
        for spec in specs:
            try:
                request = Preload(path=spec.path, device=self.device_named(spec.device),
                                  layout=spec.layout, pin=spec.pin)
                outcome = self._preload(request, None)
                if inspect.isawaitable(outcome):
                    await outcome
            except LoraCacheError as exc:
                self.record_error(exc.code)
                log.error("preload of %s on %s failed: %s", spec.path, spec.device, exc)

    def device_named(self, name: str) -> str:
        """The cache name for ``cuda`` (the first GPU) or ``cuda:<index>``; others unchanged."""
        for transport in self.transports.values():
            index = getattr(transport, "index", None)
            if index is not None and name in ("cuda", f"cuda:{index}"):
                return transport.device
        return name  # cpu, a UUID, or unknown: _cache() names the devices there are

    def record_error(self, code: ErrorCode) -> None:
        self.errors[code.value] += 1

    # ------------------------------------------------------------------------------ sessions

    def expire_sessions(self) -> None:
        """Release the leases of sessions silent for their TTL."""
        for session in self.sessions.expired():
            leases = self.sessions.close(session)
            if leases and not session.process_alive():
                for lease in leases:  # the client cannot undo its exports any more
                    lease.entry.buffer.forget_export(lease.handle)
            log.info("session of pid %d expired after %.0f s without a message; released %d "
                     "lease(s)", session.pid, session.ttl, len(leases))
            self._released(leases)

    # ------------------------------------------------------------------------------- helpers

    def _cache(self, device: str) -> DeviceCache:
        cache = self.caches.get(device)
        if cache is None:  # the same GPU named with the other prefix (GPU-/MIG-)?
            cache = next((c for name, c in self.caches.items() if same_device(name, device)),
                         None)
        if cache is None:
            raise LoraCacheError(ErrorCode.UNKNOWN_DEVICE,
                                 f"this daemon serves no device {device!r}; it serves "
                                 f"{', '.join(self.caches)}")
        return cache

    @staticmethod
    async def _run(pool: concurrent.futures.Executor, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args))

    def close(self) -> None:
        """Free every entry and every file the transports created (at shutdown)."""
        for cache in self.caches.values():
            entries = cache.take_all()
            self._device_pools[cache.device].submit(
                _free_all, self.transports[cache.device], [e.buffer for e in entries])
        for pool in (self._header_pool, *self._device_pools.values()):
            pool.shutdown(wait=True)
        for transport in self.transports.values():
            transport.close()


def _is_pin(request: Request) -> bool:
    return isinstance(request, Preload) and request.pin


def _is_admin_op(request: Request) -> bool:
    """Evicting and pinning change what every worker gets: an operator's decision."""
    return isinstance(request, (Evict, Clear)) or _is_pin(request)


def _probe_buffer(transport: Transport, name: str) -> DeviceBuffer:
    buffer = transport.allocate(PROBE_BYTES, name)
    buffer.write_tensors([(0, probe_pattern())])
    return buffer


def _free_all(transport: Transport, buffers: list) -> None:
    for buffer in buffers:
        buffer.free()
    transport.collect()
