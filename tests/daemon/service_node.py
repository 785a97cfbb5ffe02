"""A CacheService in process, over the real shared-memory transport, fed requests as the server
feeds them: what the daemon's in-process tests of policy and tiers drive (``make_node``)."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import inspect
import itertools
from pathlib import Path
from typing import Any, Callable, Iterator

import msgspec
import pytest
import torch
from safetensors.torch import save_file

from loracache.daemon.cache import DeviceCache
from loracache.daemon.config import load_config
from loracache.daemon.service import CacheService
from loracache.shared.errors import ErrorCode, LoraCacheError
from loracache.shared.protocol import (
    Acquire,
    AcquireResult,
    DeviceStats,
    Done,
    EntriesResult,
    EntryInfo,
    Hello,
    ListEntries,
    Release,
    Request,
)
from loracache.shared.transport.shm import ShmBuffer, ShmTransport

ENTRY = 4096  # every LoRA below packs to this many bytes: 1024 float32s, one aligned tensor
TTL = 5.0


class Shm(ShmTransport):
    """The real shared-memory transport. It notes the exports the daemon undoes (a no-op for
    files, so nothing else would show it) and, given ``capacity``, stands in for a tmpfs of
    that size: allocating beyond it fails with CACHE_FULL as ENOSPC does."""

    def __init__(self, directory: Path, capacity: int | None = None) -> None:
        super().__init__(directory)
        self.capacity = capacity
        self.forgotten: list[dict[str, Any]] = []

    def allocate(self, nbytes: int, name: str) -> ShmBuffer:
        if self.capacity is not None and self._held() + nbytes > self.capacity:
            raise LoraCacheError(ErrorCode.CACHE_FULL,
                                 f"no space left in {self.directory} for {nbytes} bytes")
        buffer = super().allocate(nbytes, name)
        buffer.forget_export = self.forgotten.append  # type: ignore[method-assign]
        return buffer

    def _held(self) -> int:
        held = 0
        for path in self.directory.glob("*.bin"):
            try:
                held += path.stat().st_size
            except FileNotFoundError:  # freed meanwhile on another thread
                pass
        return held


@dataclasses.dataclass
class Node:
    """One daemon's service and its LoRA directory, with the requests a client would send."""

    service: CacheService
    loras: Path
    ids: Iterator[int] = dataclasses.field(default_factory=lambda: itertools.count(1))

    def lora(self, name: str, units: float = 1, seed: float = 0) -> str:
        """Write ``name``.safetensors (``units`` * ENTRY bytes packed) unless it exists."""
        path = self.loras / f"{name}.safetensors"
        if not path.exists():
            save_file({"w": torch.full((int(units * ENTRY) // 4,), float(seed))}, str(path))
        return path.name

    async def ask(self, request: Request, session: str = "", admin: bool = True) -> Any:
        """Handle ``request`` as the server does: its result, awaited when it has to wait."""
        request = msgspec.structs.replace(request, id=next(self.ids), session=session)
        outcome = self.service.handle(request, admin=admin)
        return await outcome if inspect.isawaitable(outcome) else outcome

    async def refused(self, request: Request, session: str = "",
                      admin: bool = True) -> LoraCacheError:
        with pytest.raises(LoraCacheError) as error:
            await self.ask(request, session, admin)
        return error.value

    async def hello(self, pid: int = 0) -> str:
        return (await self.ask(Hello(pid=pid))).session

    async def lease(self, name: str, session: str) -> AcquireResult:
        return await self.ask(Acquire(path=self.lora(name)), session)

    async def release(self, lease: AcquireResult, session: str) -> None:
        assert await self.ask(Release(lease=lease.lease), session) == Done()

    async def names(self, tier: str = "device") -> set[str]:
        """The files of the entries in ``tier``: on the device, or copies in host memory."""
        listed = await self.ask(ListEntries(tiers=True))
        assert isinstance(listed, EntriesResult)
        return {stem(e) for e in listed.entries if e.tier == tier}

    def stats(self) -> DeviceStats:
        return self.service.stats().device("cpu")

    @property
    def cache(self) -> DeviceCache:
        return self.service.devices["cpu"].cache

    @property
    def transport(self) -> Shm:
        return self.service.devices["cpu"].transport  # type: ignore[return-value]


def stem(entry: EntryInfo) -> str:
    return Path(entry.path).name.removesuffix(".safetensors")


def in_loop(test: Callable[..., Any]) -> Callable[..., Any]:
    """Run an async test on its own event loop (fixtures are set up and closed outside it)."""
    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> Any:
        return asyncio.run(test(*args, **kwargs))
    return run


def node_factory(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    """Services configured by settings (as load_config takes them), closed at the end."""
    made: list[CacheService] = []

    def make(capacity: int | None = None, **settings: Any) -> Node:
        loras = tmp_path / f"loras{len(made)}"
        loras.mkdir()
        config = load_config({"lora_dirs": [str(loras)], "session_ttl": TTL, **settings},
                             environ={})
        service = CacheService(config, [Shm(tmp_path / f"shm{len(made)}", capacity)])
        made.append(service)
        return Node(service, loras)

    yield make
    for service in made:
        service.close()
