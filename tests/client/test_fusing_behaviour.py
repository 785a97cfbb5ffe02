"""How fusing behaves beyond matching the oracle: real fixtures, no copies, drift, compiled
models, the local fallback, and the API's contract."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

import loracache.client.sourcing as sourcing
from loracache.client import (ErrorCode, LoraCacheError, delete_adapters, get_active_adapters,
                              load_and_fuse_lora, set_and_fuse_adapters, unfuse_lora)
from tests.support import REPO
from examples.tiny_models import image, save, sd_lora_peft, tiny_sd_pipeline
from examples.model_shapes import sd15_pipeline
from tests.tiny import to_kohya

FIXTURES = REPO / "tests" / "fixtures"  # see its README for provenance


def unet_lora(pipe, rank: int, seed: int) -> dict[str, torch.Tensor]:
    """A random LoRA on every Linear of the UNet's attention blocks, in PEFT keys."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in pipe.unet.named_modules():
        if isinstance(module, torch.nn.Linear) and ".attentions." in name:
            tensors[f"unet.{name}.lora_A.weight"] = torch.randn(
                rank, module.in_features, generator=generator) * 0.1
            tensors[f"unet.{name}.lora_B.weight"] = torch.randn(
                module.out_features, rank, generator=generator) * 0.1
    return tensors


def test_real_diffusers_fixture_fuses_like_diffusers(daemon, lora_dir):
    path = shutil.copy(FIXTURES / "diffusers_pr8283_sd15_pokemon_lora.safetensors", lora_dir)
    pipe = sd15_pipeline()
    params = dict(pipe.unet.named_parameters())
    with daemon.client() as client:
        load_and_fuse_lora(pipe, path, "pokemon", lora_scale=0.9, client=client, restore="backup")
        layers = pipe._loracache.adapters["pokemon"].layers
        assert len(layers) == 128
        ours = {f"{key.removeprefix('unet.')}.weight": params[f"{key.removeprefix('unet.')}.weight"]
                .detach().clone() for key in layers}
        delete_adapters(pipe)  # backup mode: the original bits are back
    pipe.load_lora_weights(str(path), adapter_name="pokemon")
    pipe.fuse_lora(lora_scale=0.9)
    pipe.unload_lora_weights()
    params = dict(pipe.unet.named_parameters())
    for name, fused in ours.items():
        expected = params[name].detach()
        assert float((fused - expected).abs().max()) <= 1e-5 * max(1.0, float(expected.abs().max()))


def test_the_worker_keeps_no_copy_of_the_lora(daemon, lora_dir):
    pipe = tiny_sd_pipeline()
    path = save(unet_lora(pipe, rank=2048, seed=3), lora_dir / "big.safetensors")
    size = os.path.getsize(path)
    assert size > 40 << 20
    grown = {mode: memory_grown(daemon, path, mode) for mode in ("shared", "copies")}
    print(f"anonymous memory grown by fusing a {size >> 20} MiB LoRA: from the shared copy "
          f"{grown['shared'] >> 20} MiB, with private copies {grown['copies'] >> 20} MiB")
    assert grown["shared"] < 0.1 * size  # fused from the daemon's copy
    assert grown["copies"] > 0.9 * size  # memory_efficient=False: the old, copying behaviour


def memory_grown(daemon, path, mode: str) -> int:
    """How much a worker process's own memory grows by loading ``path`` (tests/memory_worker)."""
    result = subprocess.run(
        [sys.executable, str(REPO / "tests" / "memory_worker.py"), str(daemon.socket), str(path),
         mode], capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-2000:]
    return int(json.loads(result.stdout.splitlines()[-1])["grown"])


def test_parameters_keep_identity_and_factors_are_views_of_the_lease(daemon, lora_dir):
    pipe = tiny_sd_pipeline()
    path = save(sd_lora_peft(pipe), lora_dir / "a.safetensors")
    before = {k: (id(v), v.data_ptr()) for k, v in pipe.unet.named_parameters()}
    with daemon.client() as client:
        load_and_fuse_lora(pipe, path, "a", client=client)
        adapter = pipe._loracache.adapters["a"]
        mapped = list(adapter.lease.tensors.values())[0].untyped_storage().data_ptr()
        for factors in adapter.layers.values():
            assert factors.down.untyped_storage().data_ptr() == mapped
            assert factors.up.untyped_storage().data_ptr() == mapped
        assert {k: (id(v), v.data_ptr()) for k, v in pipe.unet.named_parameters()} == before
        delete_adapters(pipe)


def test_drift_after_1000_cycles_is_no_worse_than_diffusers(daemon, lora_dir):
    # The smallest UNet and a UNet-only LoRA: drift is per weight, and diffusers' fuse_lora
    # walks every module of every component on each of its thousand calls.
    pipe = tiny_sd_pipeline(dtype=torch.float16, smallest=True)
    lora = {k: v for k, v in sd_lora_peft(pipe, rank=8).items() if k.startswith("unet.")}
    path = save(to_kohya(lora, alpha=4.0), lora_dir / "a.safetensors")
    original = {k: v.detach().clone() for k, v in pipe.unet.state_dict().items()}
    reference = tiny_sd_pipeline(dtype=torch.float16, smallest=True)
    with daemon.client() as client:
        load_and_fuse_lora(pipe, path, "a", client=client)
        unfuse_lora(pipe)
        for _ in range(999):
            set_and_fuse_adapters(pipe, ["a"])
            unfuse_lora(pipe)
        ours = drift(original, pipe.unet.state_dict())
        delete_adapters(pipe)
    reference.load_lora_weights(str(path), adapter_name="a")
    for _ in range(1000):
        reference.fuse_lora(components=["unet"])
        reference.unfuse_lora(components=["unet"])
    reference.unload_lora_weights()
    theirs = drift(original, reference.unet.state_dict())
    print(f"fp16 drift after 1000 fuse/unfuse cycles: loracache max {ours[0]:.3g} "
          f"mean {ours[1]:.3g}; diffusers max {theirs[0]:.3g} mean {theirs[1]:.3g}")
    assert ours[0] <= theirs[0] and ours[1] <= theirs[1]


def drift(original: dict, now: dict) -> tuple[float, float]:
    diffs = [(now[k].float() - v.float()).abs() for k, v in original.items()]
    return max(float(d.max()) for d in diffs), float(torch.cat([d.flatten() for d in diffs]).mean())


def test_switching_adapters_on_a_compiled_unet_does_not_recompile(daemon, lora_dir):
    pipe = tiny_sd_pipeline()
    a = save(sd_lora_peft(pipe, seed=1), lora_dir / "a.safetensors")
    b = save(sd_lora_peft(pipe, seed=2), lora_dir / "b.safetensors")
    pipe.unet = torch.compile(pipe.unet, backend="eager")
    sample, t, text = torch.randn(1, 4, 16, 16), torch.tensor([10]), torch.randn(1, 8, 32)
    with daemon.client() as client:
        load_and_fuse_lora(pipe, a, "a", client=client)
        load_and_fuse_lora(pipe, b, "b", client=client)
        set_and_fuse_adapters(pipe, ["a"])
        with torch.no_grad():
            first = pipe.unet(sample, t, text).sample
        with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
            set_and_fuse_adapters(pipe, ["b"])
            second = pipe.unet(sample, t, text).sample
            set_and_fuse_adapters(pipe, ["a", "b"], [0.5, 0.5])
            pipe.unet(sample, t, text)
        assert not torch.allclose(first, second)
        delete_adapters(pipe)
    torch._dynamo.reset()


@pytest.fixture
def no_daemon(tmp_path, monkeypatch):
    monkeypatch.setenv("LORACACHE_SOCKET", str(tmp_path / "nobody.sock"))
    sourcing.clear_lora_cache()
    monkeypatch.setattr(sourcing, "_warned_fallback", False)
    yield tmp_path / "nobody.sock"
    sourcing.clear_lora_cache()


def test_fallback_loads_locally_with_one_warning(no_daemon, lora_dir, caplog):
    pipe, expected = tiny_sd_pipeline(), tiny_sd_pipeline()
    path = save(sd_lora_peft(pipe), lora_dir / "a.safetensors")
    with caplog.at_level(logging.WARNING, logger="loracache.client"):
        load_and_fuse_lora(pipe, path, "a")
        load_and_fuse_lora(pipe, path, "b", lora_scale=0.0)
    (warning,) = [r.message for r in caplog.records if r.name == "loracache.client"]
    assert "without sharing" in warning and str(no_daemon) in warning
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        expected.load_lora_weights(str(path), adapter_name="a")
    expected.fuse_lora()
    expected.unload_lora_weights()
    assert torch.allclose(image(pipe), image(expected), atol=1e-5)
    with pytest.raises(LoraCacheError) as error:
        load_and_fuse_lora(pipe, path, "c", fallback="error")
    assert error.value.code is ErrorCode.DAEMON_UNAVAILABLE
    with pytest.raises(LoraCacheError) as error:  # only the daemon fetches: no local fallback
        load_and_fuse_lora(pipe, "hf://org/repo/a.safetensors", "d")
    assert error.value.code is ErrorCode.DAEMON_UNAVAILABLE


def test_loads_use_the_daemon_again_once_it_is_back(no_daemon, start_daemon, lora_dir):
    pipe = tiny_sd_pipeline()
    path = save(sd_lora_peft(pipe), lora_dir / "a.safetensors")
    load_and_fuse_lora(pipe, path, "local")
    assert pipe._loracache.adapters["local"].lease is None
    daemon = start_daemon(env={"LORACACHE_SOCKET": str(no_daemon)})
    assert daemon.socket != no_daemon  # the fixture's daemon has its own socket: link it
    os.symlink(daemon.socket, no_daemon)
    load_and_fuse_lora(pipe, path, "shared")
    assert pipe._loracache.adapters["shared"].lease is not None
    assert daemon.stats().leases == 1
    delete_adapters(pipe)
    assert daemon.stats().leases == 0


def test_contract_errors(daemon, lora_dir):
    pipe = tiny_sd_pipeline()
    path = save(sd_lora_peft(pipe), lora_dir / "a.safetensors")
    other = tiny_sd_pipeline()
    other.unet = None  # a LoRA whose UNet layers match no module
    with daemon.client() as client:
        load_and_fuse_lora(pipe, path, "a", client=client)
        with pytest.raises(ValueError, match="loaded already"):
            load_and_fuse_lora(pipe, path, "a", client=client)
        with pytest.raises(ValueError, match="restore"):
            load_and_fuse_lora(pipe, path, "b", client=client, restore="magic")
        assert get_active_adapters(pipe) == ["a"]
        set_and_fuse_adapters(pipe, ["a", "missing"], [1.0, 2.0])  # unknown names are skipped
        assert get_active_adapters(pipe) == ["a"]
        delete_adapters(pipe, "a")
        assert get_active_adapters(pipe) == [] and daemon.stats().leases == 0


def test_unfusing_needs_no_daemon_after_the_client_is_closed(daemon, lora_dir):
    """clear_lora_cache() (or closing the client) leaves fused adapters that can still be taken
    out: the lease's mapping outlives the client, and unfusing asks nothing of the daemon."""
    pipe = tiny_sd_pipeline(smallest=True)
    original = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    path = save(sd_lora_peft(pipe), lora_dir / "a.safetensors")
    client = daemon.client()
    load_and_fuse_lora(pipe, path, "a", client=client)
    client.close()
    unfuse_lora(pipe)
    delete_adapters(pipe)
    for key, weight in pipe.unet.state_dict().items():
        assert torch.allclose(weight, original[key], atol=1e-6), key
