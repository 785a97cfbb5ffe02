"""CUDA IPC sharing across real processes (runs where CUDA is available: `make test-gpu`)."""

from __future__ import annotations


import pytest
import torch
from safetensors.torch import load_file

from loracache.client import ErrorCode, LoraCacheError
from loracache.shared.transport.cuda_ipc import device_uuid
from tests.support import Worker, digest, sized_lora, wait_until

pytestmark = pytest.mark.gpu
MiB = 1 << 20


@pytest.fixture
def gpu_daemon(start_daemon):
    return start_daemon("--devices", "cpu,cuda:0", "--max-bytes", "1GiB", "--session-ttl", "2")


def device_stats(daemon) -> dict:
    name = f"cuda:{device_uuid(0)}"
    return next(d for d in daemon.stats()["devices"] if d["device"] == name)


def evict_after_the_leases_expire(daemon, path, free_before: int) -> None:
    """Wait for dead clients' leases to expire, evict ``path``, and wait for the device to
    have its memory back (within 64 MiB of ``free_before``)."""
    wait_until(lambda: daemon.stats()["leases"] == 0, timeout=20, interval=0.2)
    with daemon.client() as client:
        assert client.evict(path) == {"evicted": 1, "busy": 0}
    wait_until(lambda: torch.cuda.mem_get_info(0)[0] >= free_before - 64 * MiB, timeout=20,
               interval=0.2)


def test_daemon_serves_the_gpu_by_uuid(gpu_daemon):
    with gpu_daemon.client() as client:
        assert f"cuda:{device_uuid(0)}" in client.devices


def test_four_processes_share_one_device_copy(gpu_daemon, lora_dir):
    path = sized_lora(lora_dir / "big.safetensors", 64 * MiB)
    expected = {k: digest(v) for k, v in load_file(path).items()}
    workers = [Worker(gpu_daemon.socket) for _ in range(4)]
    try:
        leases = [w.call("acquire", path=str(path), device="cuda:0") for w in workers]
        assert all(lease["digests"] == expected for lease in leases)
        assert len({lease["entry"] for lease in leases}) == 1
        stats = device_stats(gpu_daemon)
        assert stats["loads"] == 1 and stats["leases"] == 4
        assert stats["used"] == leases[0]["nbytes"]
        # Zero-copy: the workers' own allocators hold nothing; the memory is the daemon's.
        assert [w.call("cuda_allocated") for w in workers] == [0, 0, 0, 0]
    finally:
        for w in workers:
            w.close()


def test_in_process_views_are_on_the_device_and_exact(gpu_daemon, lora_dir):
    path = sized_lora(lora_dir / "a.safetensors", 4 * MiB)
    with gpu_daemon.client() as client, client.acquire(path, device="cuda:0") as lease:
        reference = load_file(path)
        for name, tensor in lease.tensors.items():
            assert tensor.device.type == "cuda"
            assert torch.equal(tensor.cpu(), reference[name])


def test_memory_returns_after_eviction_even_when_a_client_died(gpu_daemon, lora_dir):
    path = sized_lora(lora_dir / "big.safetensors", 256 * MiB)
    torch.cuda.init()
    free_before, _ = torch.cuda.mem_get_info(0)
    worker = Worker(gpu_daemon.socket)
    worker.call("acquire", path=str(path), device="cuda:0")
    worker.kill()  # dies holding the lease and the IPC mapping
    evict_after_the_leases_expire(gpu_daemon, path, free_before)


def test_unknown_device_uuid_is_refused(gpu_daemon, lora_dir):
    path = sized_lora(lora_dir / "a.safetensors", MiB)
    with gpu_daemon.client() as client, pytest.raises(LoraCacheError) as error:
        client.acquire(path, device="cuda:GPU-00000000-0000-0000-0000-000000000000")
    assert error.value.code is ErrorCode.UNKNOWN_DEVICE


def test_dead_sessions_ipc_counters_are_released(gpu_daemon, lora_dir):
    """Three workers die holding leases of one entry (three export counter slots): the daemon
    releases each slot for them, so evicting the entry gives its memory back to the device."""
    path = sized_lora(lora_dir / "big.safetensors", 256 * MiB)
    torch.cuda.init()
    free_before, _ = torch.cuda.mem_get_info(0)
    workers = [Worker(gpu_daemon.socket) for _ in range(3)]
    for worker in workers:
        worker.call("acquire", path=str(path), device="cuda:0")
    assert device_stats(gpu_daemon)["leases"] == 3
    for worker in workers:
        worker.kill()
    evict_after_the_leases_expire(gpu_daemon, path, free_before)
    assert "expired" in gpu_daemon.read_log()


def test_device_out_of_memory_evicts_and_retries_then_cache_full(start_daemon, lora_dir):
    """A budget larger than the memory the GPU has free: a load that meets an out-of-memory
    error evicts idle entries and retries, then answers CACHE_FULL; the daemon keeps serving."""
    paths = [sized_lora(lora_dir / f"{name}.safetensors", 512 * MiB, seed=i)
             for i, name in enumerate("abcd")]
    gpu_daemon = start_daemon("--devices", "cpu,cuda:0", "--max-bytes", "64GiB",
                              "--acquire-timeout", "0")
    with gpu_daemon.client() as client:
        client.preload(paths[0], device="cuda:0")  # the daemon's CUDA context exists now
        torch.cuda.init()
        free, _ = torch.cuda.mem_get_info(0)
        blocker = torch.empty(max(0, free - 1300 * MiB), dtype=torch.uint8, device="cuda:0")
        held = client.acquire(paths[1], device="cuda:0")  # a idle, b leased: ~1 GiB used
        with client.acquire(paths[2], device="cuda:0"):  # no room: a is evicted, c loads
            assert device_stats(gpu_daemon)["evictions"] >= 1
            with pytest.raises(LoraCacheError) as full:  # b and c leased, nothing to evict
                client.acquire(paths[3], device="cuda:0")
            assert full.value.code is ErrorCode.CACHE_FULL
        held.release()
        client.acquire(paths[3], device="cuda:0").release()  # serving on, room made again
        del blocker
    assert "evicting" in gpu_daemon.read_log()
