"""Rules the service applies to GPU devices, proven in-process on CPU: a shared-memory transport
named like a GPU stands in for one (the service never branches on the transport's kind)."""

from __future__ import annotations

import asyncio
import inspect
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loracache.daemon.config import load_config
from loracache.daemon.service import CacheService
from loracache.shared.errors import ErrorCode, LoraCacheError
from loracache.shared.protocol import (Acquire, AcquireResult, Hello, Probe, Release,
                                       RequestFrame)
from loracache.shared.transport.shm import ShmTransport

GPU = "cuda:GPU-00000000-1111-2222-3333-444444444444"


class LookalikeGpu(ShmTransport):
    device = GPU


@pytest.fixture
def service(tmp_path: Path):
    loras = tmp_path / "loras"
    loras.mkdir()
    save_file({"a.lora_down.weight": torch.ones(4, 8)}, str(loras / "a.safetensors"))
    config = load_config({"lora_dirs": [str(loras)], "max_bytes": "64MiB"}, environ={})
    service = CacheService(config, [LookalikeGpu(tmp_path / "shm")])
    yield service
    service.close()


def call(service: CacheService, request, session: str = ""):
    async def run():
        outcome = service.handle(RequestFrame(id=1, session=session, request=request))
        return await outcome if inspect.isawaitable(outcome) else outcome
    return asyncio.run(run())


def session_of(service: CacheService, torch_release: str) -> str:
    return call(service, Hello(pid=0, torch=torch_release)).session


def test_a_worker_whose_torch_cannot_open_the_handles_is_refused(service, monkeypatch):
    monkeypatch.setattr("loracache.daemon.service.torch_release", lambda: "2.11.0+cu130")
    old = session_of(service, "2.4.1+cu121")
    with pytest.raises(LoraCacheError) as refused:
        call(service, Acquire(path="a.safetensors", device=GPU), old)
    assert refused.value.code is ErrorCode.VERSION_MISMATCH
    assert service.caches[GPU].loads == 0  # refused before loading anything
    for release in ("2.11.0+cu130", "2.5.1", ""):  # newer, equal, or not said: served
        lease = call(service, Acquire(path="a.safetensors", device=GPU),
                     session_of(service, release))
        assert isinstance(lease, AcquireResult)


def test_a_probe_is_lent_like_an_entry_but_never_cached(service):
    session = session_of(service, "")
    probe = call(service, Probe(device=GPU), session)
    cache = service.caches[GPU]
    assert probe.entry.path == "<probe>" and probe.tensors[0].name == "probe"
    assert cache.leases == 1 and cache.entries == {} and cache.used == 0
    path = Path(probe.handle["path"])
    assert path.read_bytes()[:3] == b"\x00\x01\x02"
    call(service, Release(lease=probe.lease), session)
    assert cache.leases == 0 and cache.leased_bytes == 0
    service._device_pools[GPU].submit(lambda: None).result()  # the free runs on that thread
    assert not path.exists()
