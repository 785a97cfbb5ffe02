"""CUDA IPC sharing across real processes (`make test-gpu`; fails where CUDA is not usable)."""

from __future__ import annotations

import glob
import os
import threading

import pytest
import torch
from safetensors.torch import load_file

from loracache.client import ErrorCode, LoraCacheError
from loracache.shared.protocol import Acquire, AcquireResult, DropResult, Release
from loracache.shared.transport.cuda_ipc import MIN_SEGMENT, SEGMENT_ROUNDING, device_uuid
from tests.support import Worker, digest, sized_lora, wait_until

pytestmark = pytest.mark.gpu
MiB = 1 << 20
NOBODY = 65534


def start_gpu_daemon(start_daemon, lora_dir, *args: str, **kwargs):
    """A daemon serving cuda:0 whose CUDA context exists already (a small file was loaded and
    evicted), so memory measured from now on is the entries' alone."""
    daemon = start_daemon("--devices", "cpu,cuda:0", "--max-bytes", "2GiB", "--session-ttl",
                          "2", *args, **kwargs)
    warm = sized_lora(lora_dir / "warm-up.safetensors", MiB, seed=99)
    with daemon.client(session=False) as client:
        client.preload(warm, device="cuda:0")
        assert client.evict(warm).evicted == 1
    return daemon


@pytest.fixture
def gpu_daemon(start_daemon, lora_dir):
    return start_gpu_daemon(start_daemon, lora_dir)


def free_memory() -> int:
    """Free memory of device 0 as the driver reports it (this process has its context)."""
    torch.cuda.init()
    return torch.cuda.mem_get_info(0)[0]


def device_stats(daemon) -> dict:
    name = f"cuda:{device_uuid(0)}"
    return daemon.stats().device(name)


def evict_and_wait_for_memory(daemon, path, free_before: int) -> None:
    """Wait for the leases to end (dead clients' expire), evict ``path``, and wait for the
    device to have its memory back (within 32 MiB of ``free_before``)."""
    wait_until(lambda: daemon.stats().leases == 0, timeout=20, interval=0.2)
    with daemon.client(session=False) as client:
        assert client.evict(path) == DropResult(evicted=1, busy=0)
    wait_until(lambda: free_memory() >= free_before - 32 * MiB, timeout=20, interval=0.2)
    assert device_stats(daemon).waiting_bytes == 0


def counter_files(daemon) -> list[str]:
    return glob.glob(f"/dev/shm/torch_{daemon.proc.pid}_*")


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
        assert stats.loads == 2 and stats.leases == 4  # the warm-up file, then this
        assert stats.used == leases[0]["nbytes"] == stats.allocated_bytes
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


def test_exports_map_one_segment_per_entry_and_no_event(gpu_daemon, lora_dir):
    """Small entries get segments of their own (a worker mapping one reaches no other), and
    handles need no interprocess event (the daemon synchronised after the upload)."""
    paths = [sized_lora(lora_dir / f"{name}.safetensors", MiB // 2, seed=i)
             for i, name in enumerate("ab")]
    device = f"cuda:{device_uuid(0)}"
    with gpu_daemon.client() as client:
        results: list[AcquireResult] = [client._request(Acquire(path=str(p), device=device))
                                        for p in paths]
        handles = [r.handle for r in results]
        for handle in handles:
            assert handle["size"] >= MIN_SEGMENT and handle["size"] % SEGMENT_ROUNDING == 0
            assert handle["offset"] == 0 and handle["event_sync"] is False
        assert handles[0]["handle"] != handles[1]["handle"]
        reserved = device_stats(gpu_daemon).reserved_bytes
        for result in results:  # never opened here: the daemon releases their counter slots
            client._request(Release(lease=result.lease, opened=False))
        assert client.evict(paths[0]).evicted == 1
        wait_until(lambda: device_stats(gpu_daemon).reserved_bytes <= reserved - MIN_SEGMENT,
                   timeout=10, interval=0.2)


def test_memory_returns_after_eviction_even_when_a_client_died(gpu_daemon, lora_dir):
    path = sized_lora(lora_dir / "big.safetensors", 256 * MiB)
    free_before = free_memory()
    worker = Worker(gpu_daemon.socket)
    worker.call("acquire", path=str(path), device="cuda:0")
    worker.kill()  # dies holding the lease and the IPC mapping
    evict_and_wait_for_memory(gpu_daemon, path, free_before)


def test_dead_sessions_ipc_counters_are_released(gpu_daemon, lora_dir):
    """Three workers die holding leases of one entry (three export counter slots, some past
    slot 0 of torch's counter file): the daemon releases each slot for them, so evicting the
    entry gives its memory back to the device."""
    path = sized_lora(lora_dir / "big.safetensors", 256 * MiB)
    free_before = free_memory()
    workers = [Worker(gpu_daemon.socket) for _ in range(3)]
    for worker in workers:
        worker.call("acquire", path=str(path), device="cuda:0")
        worker.call("acquire", path=str(path), device="cuda:0")  # a second slot, discarded
    assert device_stats(gpu_daemon).leases == 6
    for worker in workers:
        worker.kill()
    evict_and_wait_for_memory(gpu_daemon, path, free_before)
    gpu_daemon.wait_for_log("expired")


def test_a_worker_of_another_user_releases_its_mapping(gpu_daemon, lora_dir):
    """torch creates its counter files 0600; a worker of another user in the daemon's group
    must still be able to decrement its slot, or the memory never leaves torch's limbo."""
    path = sized_lora(lora_dir / "big.safetensors", 256 * MiB)
    free_before = free_memory()
    worker = Worker(gpu_daemon.socket, user=NOBODY, group=os.getgid())
    try:
        lease = worker.call("acquire", path=str(path), device="cuda:0")
        assert lease["digests"] == {k: digest(v) for k, v in load_file(path).items()}
        worker.call("release", lease=lease["lease"])
        evict_and_wait_for_memory(gpu_daemon, path, free_before)
    finally:
        worker.close()


def test_a_worker_without_the_daemons_dev_shm_is_refused_and_leaks_nothing(gpu_daemon,
                                                                          lora_dir):
    path = sized_lora(lora_dir / "a.safetensors", 16 * MiB)
    worker = Worker(gpu_daemon.socket, private_shm=True)
    try:
        with pytest.raises(LoraCacheError) as refused:
            worker.call("acquire", path=str(path), device="cuda:0")
        assert refused.value.code is ErrorCode.MAPPING_FAILED
        assert "reference counter" in refused.value.message
        wait_until(lambda: gpu_daemon.stats().leases == 0, timeout=5)
    finally:
        worker.close()
    free_before = free_memory()
    with gpu_daemon.client(session=False) as client:
        assert client.evict(path).evicted == 1
    wait_until(lambda: free_memory() >= free_before + 14 * MiB, timeout=20, interval=0.2)


def test_memory_still_mapped_after_eviction_is_counted_then_collected(gpu_daemon, lora_dir):
    """Views a worker keeps past its release keep the memory; stats show it as waiting, and
    the daemon frees it by itself once the worker lets go."""
    path = sized_lora(lora_dir / "big.safetensors", 128 * MiB)
    small = sized_lora(lora_dir / "small.safetensors", MiB, seed=1)
    worker = Worker(gpu_daemon.socket)
    try:
        lease = worker.call("acquire", path=str(path), device="cuda:0")
        worker.call("keep_views")
        worker.call("release", lease=lease["lease"])
        with gpu_daemon.client(session=False) as client:
            assert client.evict(path).evicted == 1
        stats = device_stats(gpu_daemon)
        assert stats.waiting_bytes >= 128 * MiB and stats.used == 0
        worker.call("drop_views")
        with gpu_daemon.client() as client:  # an export meanwhile frees the block, not its
            client.acquire(small, device="cuda:0").release()  # segment: still given back
        # (Device-wide free memory would also count the worker's own CUDA context.)
        wait_until(lambda: device_stats(gpu_daemon).waiting_bytes == 0, timeout=10,
                   interval=0.2)
        wait_until(lambda: device_stats(gpu_daemon).reserved_bytes
                   == device_stats(gpu_daemon).used, timeout=10, interval=0.2)
    finally:
        worker.close()


def test_a_hot_entry_keeps_bounded_bookkeeping(gpu_daemon, lora_dir):
    """20,050 leases of one entry by a worker that keeps it mapped. torch's counter files hold
    10,000 slots each: a daemon that kept every export's slot while the entry lives would hold
    three files; released exports are collected, so it holds the first (the kept lease's
    slot) and the current one. Evicting the entry still gives its memory back."""
    path = sized_lora(lora_dir / "hot.safetensors", 16 * MiB)
    free_before = free_memory()
    with gpu_daemon.client() as client:
        kept = client.acquire(path, device="cuda:0")
        for _ in range(20_050):
            client.acquire(path, device="cuda:0").release()
        wait_until(lambda: 1 <= len(counter_files(gpu_daemon)) <= 2, timeout=10, interval=0.2)
        kept.release()
    evict_and_wait_for_memory(gpu_daemon, path, free_before)


def test_concurrent_loads_exports_and_evictions(start_daemon, lora_dir):
    """Exports (event loop), loads, frees and collection (device thread) at once: four threads
    over six files with room for three, then every byte goes back."""
    paths = [sized_lora(lora_dir / f"{i}.safetensors", 32 * MiB, seed=i) for i in range(6)]
    daemon = start_gpu_daemon(start_daemon, lora_dir, "--max-bytes", "110MiB",
                              "--cache-size", "1")
    errors: list[BaseException] = []

    def churn(seed: int) -> None:
        try:
            with daemon.client() as client:
                for i in range(40):
                    path = paths[(seed * 7 + i) % len(paths)]
                    with client.acquire(path, device="cuda:0") as lease:
                        next(iter(lease.tensors.values())).float().sum().item()
        except BaseException as exc:  # noqa: BLE001  (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=churn, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert errors == [] or all(isinstance(e, LoraCacheError) and e.code is ErrorCode.CACHE_FULL
                               for e in errors)
    with daemon.client(session=False) as client:
        client.clear()
    # The daemon's allocator gives every segment back. (Not device-wide free memory: the
    # threads' kernels grew this process's own CUDA context.)
    wait_until(lambda: device_stats(daemon).reserved_bytes == 0, timeout=20, interval=0.2)
    assert device_stats(daemon).evictions > 0


def test_unknown_device_uuid_is_refused(gpu_daemon, lora_dir):
    path = sized_lora(lora_dir / "a.safetensors", MiB)
    with gpu_daemon.client() as client, pytest.raises(LoraCacheError) as error:
        client.acquire(path, device="cuda:GPU-00000000-0000-0000-0000-000000000000")
    assert error.value.code is ErrorCode.UNKNOWN_DEVICE


def test_a_gpu_whose_allocator_cannot_share_is_refused_at_start(start_daemon):
    with pytest.raises(RuntimeError) as refused:
        start_daemon("--devices", "cuda:0",
                     env={"PYTORCH_CUDA_ALLOC_CONF": "backend:cudaMallocAsync"})
    assert "exited with 2" in str(refused.value) and "cudaMallocAsync" in str(refused.value)


def test_device_out_of_memory_evicts_and_retries_then_cache_full(start_daemon, lora_dir):
    """A budget larger than the memory the GPU has free: a load that meets an out-of-memory
    error evicts idle entries and retries, then answers CACHE_FULL; the daemon keeps serving."""
    paths = [sized_lora(lora_dir / f"{name}.safetensors", 512 * MiB, seed=i)
             for i, name in enumerate("abcd")]
    gpu_daemon = start_gpu_daemon(start_daemon, lora_dir, "--max-bytes", "64GiB",
                                  "--acquire-timeout", "0")
    with gpu_daemon.client() as client:
        client.preload(paths[0], device="cuda:0")  # a: idle, 512 MiB
        # Room for one more entry and a half: b fits, c only once a is evicted.
        blocker = torch.empty(max(0, free_memory() - 800 * MiB), dtype=torch.uint8,
                              device="cuda:0")
        held = client.acquire(paths[1], device="cuda:0")  # a idle, b leased
        with client.acquire(paths[2], device="cuda:0"):  # no room: a is evicted, c loads
            assert device_stats(gpu_daemon).evictions >= 2  # the warm-up file, then a
            with pytest.raises(LoraCacheError) as full:  # b and c leased, nothing to evict
                client.acquire(paths[3], device="cuda:0")
            assert full.value.code is ErrorCode.CACHE_FULL
        held.release()
        client.acquire(paths[3], device="cuda:0").release()  # serving on, room made again
        del blocker
    gpu_daemon.wait_for_log("evicting")
