"""The service over its devices, proven in-process on CPU: a shared-memory transport
named like a GPU stands in for one (the service never branches on the transport's kind)."""

from __future__ import annotations

import asyncio
import inspect
from pathlib import Path

import msgspec
import pytest
import torch
from safetensors.torch import save_file

from loracache.daemon.config import load_config
from loracache.daemon.service import CacheService
from loracache.shared.errors import ErrorCode, LoraCacheError
from loracache.shared.protocol import Acquire, AcquireResult, Hello, Probe, Release
from loracache.shared.transport.shm import ShmBuffer, ShmTransport

GPU = "cuda:GPU-00000000-1111-2222-3333-444444444444"


class LookalikeGpu(ShmTransport):
    """Shared memory under a GPU's name, with a GPU's traits: entries hold whole 1 MiB
    "segments", exports are undone by the daemon when the client says so, and the allocator's
    holdings are what the test sets."""

    device = GPU
    SEGMENT = 1 << 20

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.forgotten: list[dict] = []
        self.held = {"allocated": 0, "reserved": 0}
        self.collections = 0

    def footprint(self, nbytes: int) -> int:
        return -(-nbytes // self.SEGMENT) * self.SEGMENT

    def allocate(self, nbytes: int, name: str) -> ShmBuffer:
        buffer = super().allocate(self.footprint(nbytes), name)
        buffer.forget_export = self.forgotten.append  # type: ignore[method-assign]
        return buffer

    def memory(self) -> dict[str, int]:
        return dict(self.held)

    def collect(self) -> None:
        self.collections += 1


@pytest.fixture
def service(tmp_path: Path):
    loras = tmp_path / "loras"
    loras.mkdir()
    save_file({"a.lora_down.weight": torch.ones(4, 8)}, str(loras / "a.safetensors"))
    config = load_config({"lora_dirs": [str(loras)], "max_bytes": "64MiB"}, environ={})
    service = CacheService(config, [LookalikeGpu(tmp_path / "shm")])
    yield service
    service.close()


def gpu(service: CacheService) -> LookalikeGpu:
    return service.devices[GPU].transport  # type: ignore[return-value]


def call(service: CacheService, request, session: str = ""):
    async def run():
        outcome = service.handle(msgspec.structs.replace(request, id=1, session=session))
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
    assert service.devices[GPU].cache.loads == 0  # refused before loading anything
    for release in ("2.11.0+cu130", "2.5.1", ""):  # newer, equal, or not said: served
        lease = call(service, Acquire(path="a.safetensors", device=GPU),
                     session_of(service, release))
        assert isinstance(lease, AcquireResult)


def test_a_probe_is_lent_like_an_entry_but_never_cached(service):
    session = session_of(service, "")
    probe = call(service, Probe(device=GPU), session)
    cache = service.devices[GPU].cache
    assert probe.entry.path == "<probe>" and probe.tensors[0].name == "probe"
    assert cache.leases == 1 and cache.entries == {} and cache.used == 0
    gpu(service).held = {"allocated": LookalikeGpu.SEGMENT, "reserved": LookalikeGpu.SEGMENT}
    assert service.stats().devices[0].waiting_bytes == 0  # nor is it waiting memory
    path = Path(probe.handle["path"])
    assert path.read_bytes()[:3] == b"\x00\x01\x02"
    call(service, Release(lease=probe.lease), session)
    assert cache.leases == 0 and cache.leased_bytes == 0
    service.devices[GPU].pool.submit(lambda: None).result()  # the free runs on that thread
    assert not path.exists()


def test_the_budget_counts_what_an_entry_holds_on_the_device(service):
    result = call(service, Acquire(path="a.safetensors", device=GPU), session_of(service, ""))
    cache = service.devices[GPU].cache
    assert result.entry.nbytes == cache.used == cache.leased_bytes == LookalikeGpu.SEGMENT
    assert cache.reserved == 0


def test_a_handle_the_client_could_not_open_is_undone_by_the_daemon(service):
    session = session_of(service, "")
    opened = call(service, Acquire(path="a.safetensors", device=GPU), session)
    unopened = call(service, Acquire(path="a.safetensors", device=GPU), session)
    call(service, Release(lease=opened.lease), session)
    assert gpu(service).forgotten == []  # the client released that one itself
    call(service, Release(lease=unopened.lease, opened=False), session)
    assert gpu(service).forgotten == [unopened.handle]
    assert service.devices[GPU].cache.leases == 0


def test_memory_the_cache_does_not_count_is_collected(service):
    transport = gpu(service)
    transport.held = {"allocated": 0, "reserved": 0}
    service.collect_memory()
    assert wait_for_collections(service) == 0  # nothing to give back: no work queued
    transport.held = {"allocated": 3 << 20, "reserved": 3 << 20}  # evicted, still mapped
    assert service.stats().devices[0].waiting_bytes == 3 << 20
    service.collect_memory()
    assert wait_for_collections(service) == 1
    transport.held = {"allocated": 0, "reserved": 2 << 20}  # let go, segments still cached
    service.collect_memory()
    assert wait_for_collections(service) == 2


def wait_for_collections(service: CacheService) -> int:
    service.devices[GPU].pool.submit(lambda: None).result()  # what was queued has run
    return gpu(service).collections


def test_a_session_holds_one_probe_at_a_time_within_the_budget(service):
    session = session_of(service, "")
    probe = call(service, Probe(device=GPU), session)
    cache = service.devices[GPU].cache
    assert cache.reserved == LookalikeGpu.SEGMENT  # room taken like a load in flight
    with pytest.raises(LoraCacheError) as refused:
        call(service, Probe(device=GPU), session)
    assert refused.value.code is ErrorCode.NOT_ALLOWED
    call(service, Release(lease=probe.lease), session)
    assert cache.reserved == 0
    call(service, Release(lease=call(service, Probe(device=GPU), session).lease), session)


def test_one_devices_failed_load_is_not_anothers(tmp_path):
    """Concurrent acquires of one file for two devices load once per device: the GPU's
    failure (here TOO_LARGE) is its own, and the CPU's load goes on."""

    class TooSmallGpu(LookalikeGpu):
        def footprint(self, nbytes: int) -> int:
            return 1 << 40

    loras = tmp_path / "loras"
    loras.mkdir()
    save_file({"a.lora_down.weight": torch.ones(4, 8)}, str(loras / "a.safetensors"))
    config = load_config({"lora_dirs": [str(loras)], "max_bytes": "64MiB"}, environ={})
    service = CacheService(config, [ShmTransport(tmp_path / "cpu"),
                                    TooSmallGpu(tmp_path / "gpu")])
    try:
        session = session_of(service, "")

        async def both():
            asked = [service.handle(Acquire(path="a.safetensors", device=device, id=i,
                                            session=session))
                     for i, device in enumerate((GPU, "cpu"))]
            return await asyncio.gather(*asked, return_exceptions=True)

        on_gpu, on_cpu = asyncio.run(both())
        assert isinstance(on_gpu, LoraCacheError) and on_gpu.code is ErrorCode.TOO_LARGE
        assert isinstance(on_cpu, AcquireResult) and on_cpu.entry.device == "cpu"
    finally:
        service.close()


def test_a_probe_made_for_a_session_that_expired_meanwhile_leaks_nothing(service):
    session = session_of(service, "")

    async def expire_while_probing():
        probing = asyncio.ensure_future(service.handle(
            Probe(device=GPU, id=1, session=session)))
        await asyncio.sleep(0)  # the probe is being made on the device's thread
        service.sessions.close(service.sessions.sessions[session])
        return await asyncio.gather(probing, return_exceptions=True)

    (outcome,) = asyncio.run(expire_while_probing())
    assert isinstance(outcome, LoraCacheError) and outcome.code is ErrorCode.UNKNOWN_SESSION
    cache = service.devices[GPU].cache
    assert (cache.leases, cache.leased_bytes, cache.reserved) == (0, 0, 0)


def test_a_gpu_selector_that_selects_no_device_is_named(tmp_path, caplog):
    """With something else to serve, a selector of no visible GPU is a warning (one list of
    devices for a whole fleet); with nothing else, the daemon stops, naming it."""
    from loracache.daemon.config import ConfigError
    from loracache.daemon.server import make_transports

    nowhere = "cuda:GPU-00000000-0000-0000-0000-000000000000"
    alone = load_config({"lora_dirs": [str(tmp_path)], "devices": nowhere}, environ={})
    with pytest.raises(ConfigError) as refused:
        make_transports(alone, tmp_path / "shm")
    assert nowhere in str(refused.value) and "select no CUDA device" in str(refused.value)
    assert not (tmp_path / "shm").exists()  # nothing made on the way
    with_cpu = load_config({"lora_dirs": [str(tmp_path)], "devices": f"cpu,{nowhere}"},
                           environ={})
    transports = make_transports(with_cpu, tmp_path / "shm")
    try:
        assert [t.device for t in transports] == ["cpu"]
        assert nowhere in caplog.text and "serving the others" in caplog.text
    finally:
        for transport in transports:
            transport.close()


def test_concurrent_probes_of_one_session_leave_one(service):
    session = session_of(service, "")

    async def two_at_once():
        asked = [service.handle(Probe(device=GPU, id=i, session=session))
                 for i in range(2)]
        return await asyncio.gather(*asked, return_exceptions=True)

    outcomes = asyncio.run(two_at_once())
    assert sorted(type(o).__name__ for o in outcomes) == ["AcquireResult", "LoraCacheError"]
    refused = next(o for o in outcomes if isinstance(o, LoraCacheError))
    assert refused.code is ErrorCode.NOT_ALLOWED
    cache = service.devices[GPU].cache
    assert cache.leases == 1 and cache.reserved == LookalikeGpu.SEGMENT  # the one kept
    assert cache.leased_bytes == 0  # a probe is counted as reserved, not as leased


def test_a_probe_whose_export_fails_gives_its_room_back(service):
    transport = gpu(service)
    made = transport.allocate

    def failing_export(nbytes: int, name: str) -> ShmBuffer:
        buffer = made(nbytes, name)

        def export():
            raise OSError("chmod of the counter file failed")
        buffer.export = export  # type: ignore[method-assign]
        return buffer

    transport.allocate = failing_export  # type: ignore[method-assign]
    session = session_of(service, "")
    with pytest.raises(OSError):
        call(service, Probe(device=GPU), session)
    cache = service.devices[GPU].cache
    assert (cache.leases, cache.reserved, cache.leased_bytes) == (0, 0, 0)


def test_eight_concurrent_acquires_load_once(service):
    """Single flight: the first acquire loads, the seven that arrive meanwhile wait for that
    load and are hits (one entry, one load, eight leases)."""
    session = session_of(service, "")

    async def eight():
        asked = [service.handle(Acquire(
            path="a.safetensors", device=GPU, id=i, session=session)) for i in range(8)]
        return await asyncio.gather(*asked)

    results = asyncio.run(eight())
    cache = service.devices[GPU].cache
    assert len({r.entry.id for r in results}) == 1
    assert (cache.loads, cache.misses, cache.hits, cache.leases) == (1, 1, 7, 8)
