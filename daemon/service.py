"""The daemon's logic: one handler per request type, over the devices and the session table.

It touches no sockets (the server feeds it decoded requests) and owns all state from the event
loop, so it needs no locks. Each device (:class:`~.device.Device`) keeps its cache, its loads
and the thread its copies run on; the service keeps dispatch, the handlers, quotas, stats and
session expiry over them.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import inspect
import itertools
import logging
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

from loracache.shared.device_names import same_device, selects
from loracache.shared.errors import ErrorCode, LoraCacheError
from loracache.shared.families import parse_layout
from loracache.shared.humanize import human_bytes
from loracache.shared.ipc_compat import check_importer, torch_release
from loracache.shared.protocol import (
    Acquire,
    AcquireResult,
    Bye,
    Clear,
    DeviceStats,
    Done,
    DropResult,
    EntriesResult,
    EntryInfo,
    Evict,
    Heartbeat,
    Hello,
    HelloResult,
    ListEntries,
    Prefetch,
    Preload,
    Probe,
    Release,
    Request,
    Stats,
    StatsResult,
)
from loracache.shared.transport import Transport

from .cache import Entry
from .config import DaemonConfig, PreloadSpec
from .device import Device, free_all
from .host_tier import HostTier
from .disk_cache import DiskCache
from .remotes import Remotes
from .files import FileIdentity, confine, identify
from .sessions import Lease, Session, SessionTable
from .sources import RemoteSource, check_allowed, is_remote, parse_source

log = logging.getLogger("loracache.daemon")

# Ops that need a session; the others (stats, list, preload, ...) also serve tools like the CLI.
SESSION_OPS = (Acquire, Release, Heartbeat, Bye, Probe)
MAX_PID = 2**22  # the kernel's PID_MAX_LIMIT
PREFETCH_AT_ONCE = 4  # prefetched LoRAs fetched and loaded at a time
HOST_SHARE_OF_TMPFS = 0.5  # the host tier takes at most this share of shm_dir's file system


class CacheService:
    def __init__(self, config: DaemonConfig, transports: list[Transport]) -> None:
        """``transports``: one per device; the CPU's also makes the host tier's copies, and is
        served as a device only where ``config.devices`` selects the CPU."""
        self.config = config
        self.instance = secrets.token_hex(8)
        self.started = time.monotonic()
        self._header_pool = concurrent.futures.ThreadPoolExecutor(4, "loracache-header")
        entry_ids = itertools.count(1)  # daemon-wide: clients key their mappings by entry id
        self._host_transport = next((t for t in transports if t.device == "cpu"), None)
        self.host = _host_tier(config, self._host_transport)  # None: evicted entries are freed
        self.devices = {t.device: Device(t, config, self._header_pool, entry_ids, self.host)
                        for t in transports if t.device != "cpu" or serves_cpu(config)}
        self.sessions = SessionTable(config.session_ttl)
        self.disk = _disk_cache(config)  # None: no remote sources
        self.errors: collections.Counter[str] = collections.Counter()  # replies by error code
        self.metrics_address: str | None = None  # set by the server when it serves metrics
        self._prefetching: set[asyncio.Task[None]] = set()
        self._prefetch_slots = asyncio.Semaphore(PREFETCH_AT_ONCE)
        # Each takes its request and the session (None for ops that need none).
        self._handlers: dict[type[Request], Callable[[Any, Any], Any]] = {
            Hello: self._hello, Acquire: self._acquire, Release: self._release,
            Heartbeat: self._heartbeat, Bye: self._bye, Stats: self._stats,
            ListEntries: self._list, Preload: self._preload, Prefetch: self._prefetch,
            Evict: self._evict,
            Clear: self._clear, Probe: self._probe,
        }

    # ------------------------------------------------------------------------------ dispatch

    def handle(self, request: Request, admin: bool = True) -> Any:
        """Run the handler of ``request``'s type.

        Returns the result, or an awaitable of it when the request has to wait (for a load, or
        for room in the cache). Everything else, every hit included, is answered at once.
        ``admin``: whether it came on a socket that may evict, clear and pin.
        """
        if not admin and _is_admin_op(request):
            raise LoraCacheError(ErrorCode.NOT_ALLOWED,
                                 f"{request.op}{' --pin' if _is_pin(request) else ''}"
                                 f" is served on the admin socket {self.config.admin_socket} "
                                 "only; use it (loracache --socket ...) as a member of its group")
        session = None
        if isinstance(request, SESSION_OPS):
            session = self.sessions.get(request.session)
        elif request.session in self.sessions.sessions:
            session = self.sessions.get(request.session)  # any message refreshes its session
        return self._handlers[type(request)](request, session)

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
                           session_ttl=self.config.session_ttl, devices=list(self.devices),
                           torch=torch_release())

    def _acquire(self, req: Acquire,
                 session: Session) -> AcquireResult | Awaitable[AcquireResult]:
        device = self._lending_device(req.device, session)
        self._check_lease_count(session)  # before loading a file the session may not lease
        if is_remote(req.path):
            return self._acquire_remote(device, req, session)
        identity = identify(req.path, self.config.lora_dirs)
        entry = device.cached(identity, req.layout)
        if entry is None:
            return self._acquire_loading(device, identity, req, session)
        result = self._lend(device, entry, req, session)
        device.cache.hits += 1  # counted once lent: hits + misses = acquires that succeeded
        return result

    async def _acquire_remote(self, device: Device, req: Acquire,
                              session: Session) -> AcquireResult:
        disk, path = await self._downloaded(req.path)
        try:
            identity = identify(str(path), (disk.directory,))
            return await self._acquire_loading(device, identity, req, session, req.path)
        finally:
            disk.done(path)

    async def _downloaded(self, url: str) -> tuple[DiskCache, Path]:
        """The local copy of the LoRA at ``url``, fetched if need be; the caller tells the
        disk cache when it is :meth:`~DiskCache.done` with it."""
        source, disk = self._fetchable(url)
        return disk, await disk.fetch(source)

    def _fetchable(self, url: str) -> tuple[RemoteSource, DiskCache]:
        """``url``'s canonical source and the disk cache it is fetched into, if the daemon may
        fetch it."""
        source = parse_source(url)
        check_allowed(source, self.config.allow_sources)
        if self.disk is None:  # allow_sources came with a reload; cache_dir needs a restart
            raise LoraCacheError(ErrorCode.FORBIDDEN_SOURCE,
                                 f"{source.url}: this daemon started without cache_dir, so it "
                                 "fetches nothing; restart it with cache_dir set")
        return source, self.disk

    async def _acquire_loading(self, device: Device, identity: FileIdentity, req: Acquire,
                               session: Session, source: str = "") -> AcquireResult:
        entry, loaded = await device.entry(identity, req.layout, self.config.acquire_timeout)
        _mark_source(entry, source)
        if not self._still_open(session):
            device.trim()  # the session expired while the entry was loading
            raise _expired_meanwhile("the entry was loading")
        result = self._lend(device, entry, req, session)
        if loaded:
            device.cache.misses += 1
        else:
            device.cache.hits += 1
        return result

    def _lend(self, device: Device, entry: Entry, req: Acquire,
              session: Session) -> AcquireResult:
        self._check_quota(device, entry, session)
        handle = entry.buffer.export()
        lease = self.sessions.add_lease(session, entry, handle)
        device.cache.lend(entry)
        return AcquireResult(lease=lease.id, entry=entry.info(), handle=handle,
                             tensors=None if req.known_entry == entry.id else entry.tensors)

    async def _probe(self, req: Probe, session: Session) -> AcquireResult:
        """Lend a fresh probe buffer, one per session at a time: the same export path as an
        entry's, outside the cache (``loracache doctor``)."""
        device = self._lending_device(req.device, session)
        self._check_probe_allowed(session)
        entry = await device.make_probe(self.config.acquire_timeout)
        try:
            if not self._still_open(session):
                raise _expired_meanwhile("the probe was made")
            self._check_probe_allowed(session)  # again: another may have been made meanwhile
            lease = self.sessions.add_lease(session, entry, entry.buffer.export())
        except BaseException:
            device.discard_probe(entry)
            raise
        device.cache.lend(entry)
        return AcquireResult(lease=lease.id, entry=entry.info(), handle=lease.handle,
                             tensors=entry.tensors)

    def _check_probe_allowed(self, session: Session) -> None:
        if any(not lease.entry.cached for lease in session.leases.values()):
            raise LoraCacheError(ErrorCode.NOT_ALLOWED, "this session holds a probe already; "
                                 "release it first")
        self._check_lease_count(session)

    def _check_quota(self, device: Device, entry: Entry, session: Session) -> None:
        """Refuse a lease beyond the session's quotas (so one client cannot hold the cache)."""
        try:
            self._check_lease_count(session)
            self._check_leased_bytes(device, entry, session)
        except LoraCacheError:
            device.trim()  # a fresh load nobody holds must not stay beyond the cache size
            raise

    def _check_leased_bytes(self, device: Device, entry: Entry, session: Session) -> None:
        if self.config.session_max_bytes is None or session.holds(entry):
            return
        max_bytes = self.config.session_max_bytes.resolve(device.total_memory)
        held = session.leased_bytes[device.name]
        if held + entry.nbytes > max_bytes:
            raise LoraCacheError(ErrorCode.NOT_ALLOWED,
                                 f"leasing {entry.path} ({entry.nbytes} bytes) would make this "
                                 f"session hold {held + entry.nbytes} bytes on {device.name}, "
                                 f"over session_max_bytes ({max_bytes}); release leases first")

    def _check_lease_count(self, session: Session) -> None:
        limit = self.config.session_max_leases
        if len(session.leases) >= limit:
            raise LoraCacheError(ErrorCode.NOT_ALLOWED,
                                 f"this session holds {len(session.leases)} leases, the most "
                                 f"one session may hold (session_max_leases = {limit}); release "
                                 "some first")

    def _release(self, req: Release, session: Session) -> Done:
        lease = self.sessions.release(session, req.lease)
        if not req.opened:  # the client could not map it: undo what the export left to it
            lease.entry.buffer.forget_export(lease.handle)
        self._released([lease])
        return Done()

    def _heartbeat(self, req: Heartbeat, session: Session) -> Done:
        return Done()

    def _bye(self, req: Bye, session: Session) -> Done:
        self._released(self.sessions.close(session))
        return Done()

    def _stats(self, req: Stats, _: Session | None) -> StatsResult:
        return self.stats()

    def stats(self) -> StatsResult:
        """Counters of the daemon and of each device (what ``loracache stats`` prints)."""
        sessions_by_device: collections.Counter[str] = collections.Counter()
        for session in self.sessions.sessions.values():
            sessions_by_device.update({lease.entry.device for lease in session.leases.values()})
        return StatsResult(
            instance=self.instance, pid=os.getpid(), uptime_s=time.monotonic() - self.started,
            sessions=len(self.sessions.sessions),
            leases=sum(d.cache.leases for d in self.devices.values()),
            errors=dict(self.errors), metrics=self.metrics_address,
            devices=[_device_stats(device, sessions_by_device[name])
                     for name, device in self.devices.items()],
            tiers=[tier.stats() for tier in (self.host, self.disk) if tier is not None])

    def summary(self) -> str:
        """One line for ``systemctl status``: entries, bytes, sessions and leases."""
        caches = [device.cache for device in self.devices.values()]
        return (f"{sum(len(c.entries) for c in caches)} entries, "
                f"{human_bytes(sum(c.used for c in caches))} of "
                f"{human_bytes(sum(c.budget for c in caches))} used, "
                f"{len(self.sessions.sessions)} sessions, {sum(c.leases for c in caches)} leases")

    def _list(self, req: ListEntries, _: Session | None) -> EntriesResult:
        """The entries on the devices; with ``tiers``, then host copies and downloads (least
        recent first within each)."""
        entries = [entry.info() for device in self.devices.values()
                   for entry in device.cache.entries.values()]
        if not req.tiers:
            return EntriesResult(entries=entries)
        if self.host is not None:
            entries += [copy.info() for copy in self.host.copies.values()]
        if self.disk is not None:
            entries += [EntryInfo(id="", path=str(f.path), device="disk", layout="",
                                  nbytes=f.size, tier="disk", source=f.url)
                        for f in self.disk.snapshot()]
        return EntriesResult(entries=entries)

    def _preload(self, req: Preload,
                 _: Session | None) -> EntryInfo | Awaitable[EntryInfo]:
        device = self._device(req.device)
        if is_remote(req.path):
            return self._preload_remote(device, req)
        identity = identify(req.path, self.config.lora_dirs)
        entry = device.cached(identity, req.layout)
        if entry is None:
            return self._preload_loading(device, identity, req)
        return self._settle_preload(device, entry, req)

    async def _preload_remote(self, device: Device, req: Preload) -> EntryInfo:
        disk, path = await self._downloaded(req.path)
        try:
            return await self._preload_loading(device, identify(str(path), (disk.directory,)),
                                               req, req.path)
        finally:
            disk.done(path)

    async def _preload_loading(self, device: Device, identity: FileIdentity,
                               req: Preload, source: str = "") -> EntryInfo:
        entry, _loaded = await device.entry(identity, req.layout, self.config.acquire_timeout)
        _mark_source(entry, source)
        return self._settle_preload(device, entry, req)

    def _settle_preload(self, device: Device, entry: Entry, req: Preload) -> EntryInfo:
        if req.pin:
            device.cache.pin(entry)
        info = entry.info()
        device.trim()
        return info

    def _prefetch(self, req: Prefetch, _: Session | None) -> Done:
        """Check the request now, warm the tiers in the background (each LoRA as a preload)."""
        device = self._device(req.device)
        try:
            parse_layout(req.layout)
        except ValueError as exc:
            raise LoraCacheError(ErrorCode.BAD_REQUEST, str(exc)) from None
        for path in req.paths:
            if is_remote(path):
                self._fetchable(path)
            else:
                identify(path, self.config.lora_dirs)  # allowed, and there
        for path in req.paths:
            task = asyncio.get_running_loop().create_task(
                self._warm(Preload(path=path, device=device.name, layout=req.layout)))
            self._prefetching.add(task)
            task.add_done_callback(self._prefetching.discard)
        return Done()

    async def _warm(self, req: Preload) -> None:
        """One prefetched LoRA, as a preload; a few at a time, so that a long list does not
        start every download and load at once."""
        async with self._prefetch_slots:
            try:
                outcome = self._preload(req, None)
                if inspect.isawaitable(outcome):
                    await outcome
            except Exception as exc:  # the worker learns it at acquire; the operator here
                log.warning("prefetch of %s on %s failed: %s", req.path, req.device, exc)

    def _evict(self, req: Evict, _: Session | None) -> DropResult:
        if is_remote(req.path):  # the entries made from its downloads
            url = parse_source(req.path).url
            downloaded = self.disk.files.get(url) if self.disk else None
            path = str(downloaded.path) if downloaded else ""
        else:
            path = confine(req.path, self.config.lora_dirs)
        return self._drop(lambda entry_path: entry_path == path, req.device)

    def _clear(self, req: Clear, _: Session | None) -> DropResult:
        return self._drop(lambda entry_path: True, req.device)

    def _drop(self, match: Callable[[str], bool], device: str) -> DropResult:
        """Evict the matching idle entries of ``device`` (every device and the host tier when
        it is empty)."""
        devices = [self._device(device)] if device else list(self.devices.values())
        evicted = busy = 0
        for each in devices:
            dropped, leased = each.drop(match)
            evicted, busy = evicted + dropped, busy + leased
        copies = []
        if not device and self.host is not None and self._host_transport is not None:
            copies = self.host.drop(match)
            free_all(self._host_transport, copies)
        return DropResult(evicted=evicted, busy=busy, copies=len(copies))

    def _released(self, leases: list[Lease]) -> None:
        touched = {}
        for lease in leases:
            device = self.devices[lease.entry.device]
            device.give_back(lease.entry)
            touched[device.name] = device
        for device in touched.values():
            device.trim()
            device.room_changed()

    # ------------------------------------------------------------------------ configuration

    def reconfigure(self, config: DaemonConfig) -> None:
        """Apply a reloaded configuration: lower limits evict idle entries at once, new roots
        and timeouts apply to the next requests."""
        self.config = config
        self.sessions.ttl = config.session_ttl
        if self.host is not None and self._host_transport is not None:
            budget = _host_budget(config, self._host_transport)
            free_all(self._host_transport, self.host.shrink(budget))
        if self.disk is not None:
            self.disk.budget, self.disk.min_free = _disk_limits(config, self.disk.directory)
            self.disk.revalidate_s = config.source_revalidate_s
            self.disk.remotes = Remotes(config.source, config.source_timeout_s)
        for device in self.devices.values():
            device.reconfigure(config)
        unknown = [name for name in config.device
                   if not any(same_device(name, served) for served in self.devices)]
        if unknown:
            log.warning("configuration has [device] settings for %s, which this daemon does not "
                        "serve (it serves %s)", ", ".join(sorted(unknown)),
                        ", ".join(self.devices))

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

    def device_named(self, selector: str) -> str:
        """The device a preload's ``device`` selects (``cuda``: the first GPU); an unknown
        one is returned as it is, for _device() to refuse naming the devices there are."""
        for device in self.devices.values():
            if selects(selector, device.name, getattr(device.transport, "index", None)):
                return device.name
        return selector

    def record_error(self, code: ErrorCode) -> None:
        self.errors[code.value] += 1

    # ---------------------------------------------------------------- sessions and memory

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

    def collect_memory(self) -> None:
        """Give back device memory the caches no longer count (see Device.collect_memory)."""
        for device in self.devices.values():
            device.collect_memory()

    # ------------------------------------------------------------------------------- helpers

    def _device(self, name: str) -> Device:
        device = self.devices.get(name)
        if device is None:  # the same GPU named with the other prefix (GPU-/MIG-)?
            device = next((d for known, d in self.devices.items() if same_device(known, name)),
                          None)
        if device is None:
            raise LoraCacheError(ErrorCode.UNKNOWN_DEVICE,
                                 f"this daemon serves no device {name!r}; it serves "
                                 f"{', '.join(self.devices)}")
        return device

    def _lending_device(self, name: str, session: Session) -> Device:
        """The device to lend on, once this session's torch can open its handles."""
        device = self._device(name)
        if device.name != "cpu":
            check_importer(torch_release(), session.torch)
        return device

    def _still_open(self, session: Session) -> bool:
        """Whether ``session`` is still open (after an await: it may have expired meanwhile)."""
        return self.sessions.sessions.get(session.token) is session

    def close(self) -> None:
        """Free every entry and every file the transports created (at shutdown)."""
        # GPUs first: their copies to host memory finish before the host memory is let go.
        for device in sorted(self.devices.values(), key=lambda d: d.name == "cpu"):
            device.close()
        if self._host_transport is not None and "cpu" not in self.devices:
            if self.host is not None:
                free_all(self._host_transport, self.host.drop(lambda path: True))
            self._host_transport.close()
        self._header_pool.shutdown(wait=True)
        if self.disk is not None:
            self.disk.close()


def _mark_source(entry: Entry, requested: str) -> None:
    """Record the URL an entry's file was downloaded from (``ls`` shows it)."""
    if requested and not entry.source:
        entry.source = parse_source(requested).url


def serves_cpu(config: DaemonConfig) -> bool:
    return "cpu" in config.devices or "all" in config.devices


def _host_tier(config: DaemonConfig, transport: Transport | None) -> HostTier | None:
    if transport is None:
        return None
    budget = _host_budget(config, transport)
    return HostTier(transport, budget) if budget > 0 else None


def _host_budget(config: DaemonConfig, transport: Transport) -> int:
    """``host_max_bytes``, within a share of the tmpfs the copies live in: it also holds the
    CPU's entries and torch's CUDA IPC files, which must not find it full."""
    budget = config.host_max_bytes.resolve(transport.total_memory())
    tmpfs = getattr(transport, "directory", None)
    if tmpfs is not None:
        budget = min(budget, int(shutil.disk_usage(tmpfs).total * HOST_SHARE_OF_TMPFS))
    return budget


def _disk_cache(config: DaemonConfig) -> DiskCache | None:
    if config.cache_dir is None:
        return None
    budget, min_free = _disk_limits(config, config.cache_dir)
    return DiskCache(config.cache_dir, budget, min_free, config.source_revalidate_s,
                     Remotes(config.source, config.source_timeout_s))


def _disk_limits(config: DaemonConfig, directory: Path) -> tuple[int, int]:
    """The disk cache's budget and free-space floor, in bytes."""
    total = shutil.disk_usage(directory).total
    return config.cache_max_bytes.resolve(total), config.cache_min_free_bytes.resolve(total)


def _device_stats(device: Device, sessions: int) -> DeviceStats:
    held = device.allocator_stats()  # empty where there is no allocator (the CPU)
    return DeviceStats(**device.cache.stats(), sessions=sessions,
                       allocated_bytes=held.get("allocated_bytes"),
                       reserved_bytes=held.get("reserved_bytes"),
                       waiting_bytes=held.get("waiting_bytes"),
                       stage_seconds={stage: times.stats()
                                      for stage, times in device.stage_times.items()
                                      if times.count})


def _expired_meanwhile(what: str) -> LoraCacheError:
    return LoraCacheError(ErrorCode.UNKNOWN_SESSION,
                          f"the session expired while {what}; send hello again and keep "
                          "heartbeating (the client library does)")


def _is_pin(request: Request) -> bool:
    return isinstance(request, Preload) and request.pin


def _is_admin_op(request: Request) -> bool:
    """Evicting and pinning change what every worker gets: an operator's decision."""
    return isinstance(request, (Evict, Clear)) or _is_pin(request)
