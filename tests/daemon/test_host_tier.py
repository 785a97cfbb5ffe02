"""The host tier, in process over the real shared-memory transport: an entry evicted for room
keeps its bytes in host memory and comes back from them without its file being read or
converted again; the tier keeps its own budget, gives way when the tmpfs is full, and goes
with evict and clear. A GPU stand-in shows the copies made from a device and uploaded to it."""

from __future__ import annotations

import asyncio
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from loracache.daemon.config import load_config
from loracache.daemon.service import CacheService
from loracache.shared.dtypes import ITEM_SIZES
from loracache.shared.errors import ErrorCode, LoraCacheError
from loracache.shared.protocol import Acquire, AcquireResult, Clear, Evict, TierStats
from loracache.shared.transport import open_handle
from loracache.shared.transport.shm import ShmBuffer
from tests.daemon.test_service_devices import GPU, LookalikeGpu
from tests.daemon.service_node import ENTRY, TTL, Node, Shm, in_loop

FIXTURES = Path(__file__).parents[1] / "fixtures"
SD15_LORA = "diffusers_pr8283_sd15_pokemon_lora.safetensors"


def host_stats(node: Node) -> TierStats:
    return next(t for t in node.service.stats().tiers if t.tier == "host")


def reads(node: Node, device: str = "cpu") -> dict[str, int]:
    """How many loads read, converted and uploaded on ``device``."""
    stages = node.service.stats().device(device).stage_seconds
    return {stage: stages[stage].count if stage in stages else 0
            for stage in ("read", "convert", "upload")}


def tensors_of(lease: AcquireResult) -> dict[str, torch.Tensor]:
    """The lease's tensors, as bytes (copied out of the mapping)."""
    flat = open_handle(lease.handle)
    return {spec.name: flat[spec.offset:spec.offset + ITEM_SIZES[spec.dtype]
                            * math.prod(spec.shape)].clone()
            for spec in lease.tensors or []}


@in_loop
async def test_an_entry_evicted_for_room_comes_back_from_host_memory_as_it_was(make_node):
    node = make_node(max_bytes=str(ENTRY))  # room for one entry on the device
    session = await node.hello()
    first = await node.lease("a", session)
    await node.release(first, session)
    await node.release(await node.lease("b", session), session)  # evicts a, for room
    assert await node.names() == {"b"} and await node.names("host") == {"a"}
    before = reads(node)
    again = await node.lease("a", session)
    assert await node.names() == {"a"} and await node.names("host") == {"b"}
    # The CPU's copy is the entry itself, moved back: the same shared-memory file, no read.
    assert again.handle["path"] == first.handle["path"]
    assert reads(node)["read"] == before["read"]
    assert torch.equal(tensors_of(again)["w"], tensors_of(first)["w"])
    stats = host_stats(node)
    assert (stats.hits, stats.entries, stats.used) == (1, 1, ENTRY)
    assert node.stats().loads == 3 and node.stats().evictions == 2


@in_loop
async def test_a_converted_entry_comes_back_converted_without_converting_again(make_node):
    node = make_node(max_bytes="4MiB")  # room for one converted SD 1.5 LoRA (3.1 MiB)
    shutil.copy(FIXTURES / SD15_LORA, node.loras / SD15_LORA)
    node.lora("filler", units=300)  # 1.2 MiB: with the LoRA, more than the budget
    session = await node.hello()
    first = await node.ask(Acquire(path=SD15_LORA, layout="sd"), session)
    expected = tensors_of(first)
    await node.release(first, session)
    await node.release(await node.lease("filler", session), session)
    assert await node.names("host") == {SD15_LORA.removesuffix(".safetensors")}
    before = reads(node)
    again = await node.ask(Acquire(path=SD15_LORA, layout="sd"), session)
    assert reads(node)["read"] == before["read"]
    assert reads(node)["convert"] == before["convert"] == 1
    assert again.tensors == first.tensors
    got = tensors_of(again)
    assert got.keys() == expected.keys() and len(expected) > 100
    assert all(torch.equal(got[name], expected[name]) for name in expected)


@in_loop
async def test_the_host_tier_keeps_its_most_recent_copies_within_its_budget(make_node):
    node = make_node(max_bytes=str(ENTRY), host_max_bytes=str(2 * ENTRY))
    session = await node.hello()
    for name in "abcd":
        await node.release(await node.lease(name, session), session)
    assert await node.names() == {"d"} and await node.names("host") == {"b", "c"}
    stats = host_stats(node)
    assert (stats.used, stats.budget, stats.evictions) == (2 * ENTRY, 2 * ENTRY, 1)
    held = {p.name for p in node.transport.directory.glob("*.bin")}
    assert len(held) == 3  # the evicted copy's memory is freed, not just forgotten


@in_loop
async def test_host_max_bytes_0_keeps_no_copies(make_node):
    node = make_node(max_bytes=str(ENTRY), host_max_bytes="0")
    session = await node.hello()
    await node.release(await node.lease("a", session), session)
    await node.release(await node.lease("b", session), session)
    assert await node.names("host") == set()
    assert [t.tier for t in node.service.stats().tiers] == []
    await asyncio.sleep(0.05)  # the free runs on the device's thread
    assert len(list(node.transport.directory.glob("*.bin"))) == 1


@in_loop
async def test_evict_and_clear_drop_host_copies_too(make_node):
    node = make_node(max_bytes=str(ENTRY))
    session = await node.hello()
    for name in "abc":
        await node.release(await node.lease(name, session), session)
    assert await node.names("host") == {"a", "b"}
    result = await node.ask(Evict(path=node.lora("a")))
    assert (result.evicted, result.copies) == (0, 1) and await node.names("host") == {"b"}
    result = await node.ask(Clear())
    assert (result.evicted, result.copies) == (1, 1)
    assert await node.names("host") == set() and await node.names() == set()
    await asyncio.sleep(0.05)
    assert list(node.transport.directory.glob("*.bin")) == []


@in_loop
async def test_a_full_tmpfs_frees_host_copies_before_refusing(make_node):
    """Host copies share the CPU's tmpfs: when it is full they go first, oldest first."""
    node = make_node(capacity=2 * ENTRY, cache_size=0)  # each release demotes its entry
    session = await node.hello()
    for name in "ab":
        await node.release(await node.lease(name, session), session)
    assert await node.names("host") == {"a", "b"}
    lease = await node.lease("c", session)
    assert await node.names() == {"c"} and await node.names("host") == {"b"}
    assert torch.equal(tensors_of(lease)["w"], torch.zeros(ENTRY, dtype=torch.uint8))


def gpu_node(tmp_path: Path, segments: int | None = None, **settings: Any) -> Node:
    """A service with the CPU and a GPU stand-in (shared memory under a GPU's name), whose
    memory holds ``segments`` segments when given (else as many as the budget)."""
    loras = tmp_path / "loras"
    loras.mkdir()
    config = load_config({"lora_dirs": [str(loras)], "session_ttl": TTL, **settings},
                         environ={})
    gpu = TightGpu(tmp_path / "gpu", segments) if segments else LookalikeGpu(tmp_path / "gpu")
    service = CacheService(config, [Shm(tmp_path / "cpu"), gpu])
    return Node(service, loras)


def test_a_gpu_entry_evicted_for_room_is_copied_to_host_memory_and_uploaded_back(tmp_path):
    node = gpu_node(tmp_path, max_bytes=str(LookalikeGpu.SEGMENT))  # one entry per device

    async def scenario() -> None:
        session = await node.hello()
        first = await node.ask(Acquire(path=node.lora("a", seed=1), device=GPU), session)
        expected = tensors_of(first)
        await node.release(first, session)
        await node.release(await node.ask(Acquire(path=node.lora("b"), device=GPU), session),
                           session)
        for _ in range(100):  # the copy is made on the device's thread
            if await node.names("host") == {"a"}:
                break
            await asyncio.sleep(0.02)
        assert await node.names("host") == {"a"}
        before = reads(node, GPU)
        again = await node.ask(Acquire(path=node.lora("a"), device=GPU), session)
        after = reads(node, GPU)
        assert after["read"] == before["read"] and after["upload"] == before["upload"] + 1
        assert again.handle["path"] != first.handle["path"]  # a new device buffer, uploaded
        assert torch.equal(tensors_of(again)["w"], expected["w"])
        await node.release(again, session)
        # The upload left a's copy in the host tier; b, evicted for a, joins it. A CPU lease
        # of the same file and layout takes the host copy of b itself.
        for _ in range(100):
            if await node.names("host") == {"a", "b"}:
                break
            await asyncio.sleep(0.02)
        assert await node.names("host") == {"a", "b"}
        cpu_before = reads(node, "cpu")
        on_cpu = await node.ask(Acquire(path=node.lora("b")), session)
        assert reads(node, "cpu")["read"] == cpu_before["read"]
        assert await node.names("host") == {"a"} and await node.names() == {"a", "b"}
        assert torch.equal(tensors_of(on_cpu)["w"], torch.zeros(ENTRY, dtype=torch.uint8))

    try:
        asyncio.run(scenario())
    finally:
        node.service.close()


class TightGpu(LookalikeGpu):
    """A GPU stand-in whose memory holds ``segments`` segments: allocating more fails with
    CACHE_FULL, as cudaMalloc's out-of-memory does."""

    def __init__(self, directory: Path, segments: int) -> None:
        super().__init__(directory)
        self.capacity = segments * self.SEGMENT

    def allocate(self, nbytes: int, name: str) -> ShmBuffer:
        held = sum(p.stat().st_size for p in self.directory.glob("*.bin"))
        if held + self.footprint(nbytes) > self.capacity:
            raise LoraCacheError(ErrorCode.CACHE_FULL, "out of memory")
        return super().allocate(nbytes, name)


def test_a_gpu_entry_is_copied_out_and_freed_before_the_load_that_evicted_it(tmp_path):
    """The victim's copy to host memory runs before the new entry is allocated: a device
    with room for exactly its budget never holds both."""
    node = gpu_node(tmp_path, segments=1, max_bytes=str(LookalikeGpu.SEGMENT))
    asyncio_run_on(node, two_gpu_loads_then, ["a"], ["b"])
    # the copy holds the packed bytes, not the device's whole segment
    assert host_stats(node).used == ENTRY


@pytest.mark.parametrize("dropping, kept", [("clear", False), ("evict a", False),
                                             ("evict b", True)])
def test_an_evict_or_clear_during_a_copy_to_host_memory_keeps_no_copy_of_its_file(
        tmp_path, dropping, kept):
    node = gpu_node(tmp_path, max_bytes=str(LookalikeGpu.SEGMENT))

    async def scenario() -> None:
        session = await node.hello()
        await node.release(await node.ask(Acquire(path=node.lora("a"), device=GPU), session),
                           session)
        node.lora("b")
        gpu = node.service.devices[GPU]
        gpu.remove([gpu.cache.entries[next(iter(gpu.cache.entries))]], demote=True)
        request = Clear() if dropping == "clear" else Evict(path=f"{dropping[-1]}.safetensors")
        dropped = await node.ask(request)
        assert (dropped.evicted, dropped.copies) == (0, 0)  # the copy is under way, not kept
        await asyncio.gather(*gpu._demotions)
        assert await node.names("host") == ({"a"} if kept else set())
        await asyncio.sleep(0.05)  # a discarded copy is freed on the device's thread
        assert len(list((tmp_path / "cpu").glob("*.bin"))) == (1 if kept else 0)
        assert gpu._drop_log == []  # forgotten once no copy is under way

    try:
        asyncio.run(scenario())
    finally:
        node.service.close()


async def wait_for_host(node: Node, names: set[str]) -> None:
    for _ in range(100):
        if await node.names("host") == names:
            return
        await asyncio.sleep(0.02)
    assert await node.names("host") == names


def test_the_host_tier_takes_at_most_half_of_its_tmpfs(make_node, monkeypatch):
    """Host copies share the tmpfs with the CPU's entries and torch's CUDA IPC files."""
    real = shutil.disk_usage
    small = 64 << 20  # a tmpfs far smaller than this host's memory

    def disk_usage(path: Any) -> Any:
        usage = real(path)
        return usage._replace(total=small) if "shm" in str(path) else usage

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    node = make_node(host_max_bytes="100%")
    assert host_stats(node).budget == small // 2 < node.transport.total_memory()


def test_a_gpu_copy_already_in_host_memory_moves_to_the_recent_end(tmp_path):
    """Evicting a GPU entry whose host copy is there already copies nothing, and marks the
    copy used now: the next copy that needs room drops another."""
    node = gpu_node(tmp_path, max_bytes=str(LookalikeGpu.SEGMENT),
                    host_max_bytes=str(2 * ENTRY))

    async def scenario() -> None:
        session = await node.hello()

        async def on_gpu(name: str) -> None:
            await node.release(await node.ask(Acquire(path=node.lora(name), device=GPU),
                                              session), session)
            await asyncio.gather(*node.service.devices[GPU]._demotions)

        def copies() -> list[str]:  # least recently used first
            return [Path(copy.path).stem for copy in node.service.host.copies.values()]

        for name in "aba":  # a; b (a copied out); a again, from its copy (b copied out)
            await on_gpu(name)
        assert copies() == ["a", "b"]
        await on_gpu("c")  # a leaves the GPU: its copy is there, now used most recently
        assert copies() == ["b", "a"]
        await on_gpu("d")  # c is copied out: room for two drops the least recent, b
        assert copies() == ["a", "c"]

    try:
        asyncio.run(scenario())
    finally:
        node.service.close()


def test_a_gpu_out_of_memory_copies_its_victim_to_host_memory_and_retries(tmp_path):
    """The budget has room but the device does not (other processes hold memory): the idle
    victim goes to host memory rather than being dropped, and the load goes through."""
    node = gpu_node(tmp_path, segments=1, max_bytes=str(2 * LookalikeGpu.SEGMENT))
    asyncio_run_on(node, two_gpu_loads_then, ["a"], ["b"])


async def two_gpu_loads_then(node: Node, host: list[str], device: list[str]) -> None:
    """Lease and release a, then b, on the GPU; then the host tier holds ``host`` and the
    devices ``device``."""
    session = await node.hello()
    for name in "ab":
        await node.release(await node.ask(Acquire(path=node.lora(name), device=GPU), session),
                           session)
    await asyncio.gather(*node.service.devices[GPU]._demotions)
    assert await node.names("host") == set(host) and await node.names() == set(device)


def asyncio_run_on(node: Node, scenario: Any, *args: Any) -> None:
    """Run ``scenario(node, *args)`` on an event loop of its own, closing the service after."""
    try:
        asyncio.run(scenario(node, *args))
    finally:
        node.service.close()
