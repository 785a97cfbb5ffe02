"""Zero-copy sharing on CPU: exact bytes, one copy for many processes, read-only mappings."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from tests.support import Worker, digest, sized_lora, write_lora

MiB = 1 << 20


def test_tensors_are_bit_identical_to_load_file(daemon, lora_dir):
    g = torch.Generator().manual_seed(1)
    files = {
        "fp16.safetensors": {"a.lora_down.weight": torch.randn(8, 320, generator=g).half(),
                             "a.lora_up.weight": torch.randn(320, 8, generator=g).half()},
        "bf16.safetensors": {"x": torch.randn(4, 77, generator=g).bfloat16(),
                             "y": torch.randn(77, 4, generator=g).bfloat16()},
        "fp32.safetensors": {"conv.lora_down.weight": torch.randn(4, 3, 3, 3, generator=g),
                             "conv.lora_up.weight": torch.randn(5, 4, 1, 1, generator=g)},
        "mixed.safetensors": {"odd": torch.randn(3, 5, 7, generator=g).half(),
                              "scalar": torch.tensor(0.5),
                              "alpha": torch.tensor(8.0, dtype=torch.bfloat16),
                              "empty": torch.zeros(0, 4),
                              "ints": torch.arange(11, dtype=torch.int64),
                              "f64": torch.randn(13, generator=g).double()},
    }
    worker = Worker(daemon.socket)
    try:
        for name, tensors in files.items():
            write_lora(lora_dir / name, tensors)
            expected = {k: digest(v) for k, v in load_file(lora_dir / name).items()}
            assert worker.call("acquire", path=name)["digests"] == expected, name
    finally:
        worker.close()


def test_four_processes_share_one_copy(daemon, lora_dir):
    path = sized_lora(lora_dir / "big.safetensors", 64 * MiB)
    workers = [Worker(daemon.socket) for _ in range(4)]
    try:
        leases = [w.call("acquire", path=str(path)) for w in workers]
        nbytes = leases[0]["nbytes"]
        assert nbytes >= 64 * MiB and len({lease["entry"] for lease in leases}) == 1
        for w in workers:
            w.call("touch")
        shared = sum(w.call("pss", path_part=str(daemon.shm_root))["mapping"] for w in workers)
        assert shared <= 1.1 * nbytes, (shared, nbytes)
        assert shared >= 0.9 * nbytes  # the pages really are mapped, just once
        assert daemon.cpu_stats().used == nbytes
    finally:
        for w in workers:
            w.close()


def test_four_processes_loading_themselves_hold_four_copies(lora_dir):
    """The baseline the sharing test improves on, measured the same way (PSS)."""
    path = sized_lora(lora_dir / "big.safetensors", 64 * MiB)
    workers = [Worker() for _ in range(4)]
    try:
        before = [w.call("pss")["total"] for w in workers]
        for w in workers:
            w.call("load_file", path=str(path))
        grown = sum(w.call("pss")["total"] - b for w, b in zip(workers, before))
        assert grown >= 3.5 * 64 * MiB, grown
    finally:
        for w in workers:
            w.close()


def test_leases_in_one_process_share_one_mapping(daemon, lora_dir):
    sized_lora(lora_dir / "a.safetensors", MiB)
    with daemon.client() as client:
        first = client.acquire("a.safetensors")
        second = client.acquire("a.safetensors")
        name = next(iter(first.tensors))
        assert first.tensors[name].data_ptr() == second.tensors[name].data_ptr()
        assert first.id != second.id
        assert daemon.cpu_stats().leases == 2
        first.release()
        assert torch.equal(second.tensors[name], load_file(lora_dir / "a.safetensors")[name])
        second.release()
        assert daemon.cpu_stats().leases == 0


def test_client_mappings_are_read_only(daemon, lora_dir):
    sized_lora(lora_dir / "a.safetensors", MiB)
    with daemon.client() as client, client.acquire("a.safetensors") as lease:
        (shm_file,) = daemon.shm_files()
        with open("/proc/self/maps") as maps:
            perms = {line.split()[1] for line in maps if str(shm_file) in line}
        assert perms and all(p.startswith("r-") for p in perms), perms
        assert lease.tensors  # views exist while the mapping is checked
