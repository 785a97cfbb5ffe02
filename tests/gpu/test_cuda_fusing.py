"""Fusing a LoRA leased over CUDA IPC into a pipeline on the GPU (`make test-gpu`)."""

from __future__ import annotations

import copy

import pytest
import torch

from loracache.client import delete_adapters, load_and_fuse_lora, unfuse_lora
from examples.tiny_models import save, sd_lora_peft, tiny_sd_pipeline
from tests.tiny import to_kohya

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fusing_from_a_cuda_lease_equals_diffusers(start_daemon, lora_dir, dtype):
    daemon = start_daemon("--devices", "cpu,cuda:0", "--max-bytes", "1GiB")
    pipe = tiny_sd_pipeline().to("cuda:0", dtype)
    path = save(to_kohya(sd_lora_peft(pipe.to("cpu", torch.float32), convs=True), alpha=2.0),
                lora_dir / "a.safetensors")
    pipe = pipe.to("cuda:0", dtype)
    reference = copy.deepcopy(pipe)
    reference.load_lora_weights(str(path), adapter_name="a")
    reference.fuse_lora(lora_scale=0.7)
    reference.unload_lora_weights()
    original = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with daemon.client() as client:
        load_and_fuse_lora(pipe, path, "a", lora_scale=0.7, client=client, restore="backup")
        adapter = pipe._loracache.adapters["a"]
        assert all(f.down.is_cuda for f in adapter.layers.values())  # leased on the GPU
        tolerance = 1e-5 if dtype == torch.float32 else 2e-3
        for key, expected in reference.unet.state_dict().items():
            assert torch.allclose(pipe.unet.state_dict()[key].float(), expected.float(),
                                  atol=tolerance), key
        unfuse_lora(pipe)
        assert all(torch.equal(pipe.unet.state_dict()[k], v) for k, v in original.items())
        delete_adapters(pipe)
        assert daemon.stats().leases == 0


def test_unfuse_after_the_daemon_restarts_uses_the_new_copy(start_daemon, lora_dir):
    """A daemon killed under a GPU worker takes its device memory with it; the worker leases
    the file again from the new daemon and unfuses from that copy, exactly."""
    import signal

    from tests.support import Worker

    pipe = tiny_sd_pipeline(smallest=True)
    save(sd_lora_peft(pipe), lora_dir / "a.safetensors")
    first = start_daemon("--devices", "cpu,cuda:0", "--max-bytes", "1GiB")
    worker = Worker(first.socket)
    try:
        for name in ("restarted", "original"):
            worker.call("pipeline", name=name, device="cuda:0")
        worker.call("fuse", name="restarted", path=str(lora_dir / "a.safetensors"),
                    adapter="a")
        first.stop(signal.SIGKILL)
        second = start_daemon("--devices", "cpu,cuda:0", "--max-bytes", "1GiB", reuse=first)
        worker.call("unfuse", name="restarted")
        assert worker.call("lease_generations", name="restarted") == [1]
        distance = worker.call("max_diff", a="restarted", b="original")
        assert distance["diff"] <= 1e-5 * max(1.0, distance["scale"])
        assert second.stats().leases == 1
    finally:
        worker.kill()
