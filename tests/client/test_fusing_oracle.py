"""Fusing through the daemon equals diffusers' own fusing (the oracle), for every format."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from loracache.client import (delete_adapters, get_active_adapters, load_and_fuse_lora,
                              set_and_fuse_adapters, unfuse_lora)
from examples.tiny_models import UNET_TARGETS, image, save, sd_lora_peft, tiny_sd_pipeline
from tests.tiny import to_kohya, to_legacy_diffusers

FORMATS = {
    "peft": lambda pipe: sd_lora_peft(pipe),
    "peft-locon": lambda pipe: sd_lora_peft(pipe, convs=True),
    "kohya": lambda pipe: to_kohya(sd_lora_peft(pipe, rank=8), alpha=4.0),
    "kohya-locon": lambda pipe: to_kohya(sd_lora_peft(pipe, convs=True), alpha=2.0),
    "legacy-diffusers": lambda pipe: to_legacy_diffusers(sd_lora_peft(pipe)),
}


def weights(pipe) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v.detach().clone() for name in ("unet", "text_encoder")
            for k, v in getattr(pipe, name).state_dict().items()}


def assert_same_weights(ours: dict, reference: dict, rtol: float = 1e-5) -> None:
    assert ours.keys() == reference.keys()
    for key, expected in reference.items():
        scale = max(1.0, float(expected.abs().max()))
        diff = float((ours[key].float() - expected.float()).abs().max())
        assert diff <= rtol * scale, f"{key}: max difference {diff}"


def diffusers_fused(pipe, path, scale: float, name: str = "x"):
    reference = copy.deepcopy(pipe)
    reference.load_lora_weights(str(path), adapter_name=name)
    reference.fuse_lora(lora_scale=scale)
    reference.unload_lora_weights()
    return reference


@pytest.mark.parametrize("fmt", FORMATS)
def test_fused_weights_and_image_equal_diffusers(daemon, lora_dir, fmt):
    pipe = tiny_sd_pipeline()
    path = save(FORMATS[fmt](pipe), lora_dir / f"{fmt}.safetensors")
    reference = diffusers_fused(pipe, path, 0.7)
    original = weights(pipe)
    with daemon.client() as client:
        load_and_fuse_lora(pipe, path, adapter_name="x", lora_scale=0.7, client=client)
        assert_same_weights(weights(pipe), weights(reference))
        assert weights(pipe).keys() == original.keys()
        assert torch.allclose(image(pipe), image(reference), atol=1e-5)
        assert get_active_adapters(pipe) == ["x"]
        delete_adapters(pipe)
        assert daemon.stats().leases == 0


def test_set_and_fuse_adapters_equals_diffusers_set_adapters(daemon, lora_dir):
    pipe = tiny_sd_pipeline()
    a = save(sd_lora_peft(pipe, seed=1), lora_dir / "a.safetensors")
    b = save(to_kohya(sd_lora_peft(pipe, seed=5, rank=8), alpha=2.0), lora_dir / "b.safetensors")
    reference = copy.deepcopy(pipe)
    with warnings.catch_warnings():  # PEFT warns about a second adapter: that is the point
        warnings.simplefilter("ignore", UserWarning)
        reference.load_lora_weights(str(a), adapter_name="a")
        reference.load_lora_weights(str(b), adapter_name="b")
    reference.set_adapters(["a", "b"], adapter_weights=[0.5, 1.3])
    reference.fuse_lora()
    reference.unload_lora_weights()
    with daemon.client() as client:
        load_and_fuse_lora(pipe, a, "a", client=client)
        load_and_fuse_lora(pipe, b, "b", lora_scale=0.2, client=client)
        set_and_fuse_adapters(pipe, ["a", "b"], [0.5, 1.3])
        assert_same_weights(weights(pipe), weights(reference))
        assert get_active_adapters(pipe) == ["a", "b"]
        delete_adapters(pipe)


@pytest.mark.parametrize("restore", ["subtract", "backup"])
def test_unfuse_restores_the_weights(daemon, lora_dir, restore):
    pipe = tiny_sd_pipeline(dtype=torch.float16)
    path = save(to_kohya(sd_lora_peft(pipe, convs=True), alpha=2.0), lora_dir / "a.safetensors")
    original = weights(pipe)
    pointers = {k: v.data_ptr() for k, v in pipe.unet.named_parameters()}
    with daemon.client() as client:
        load_and_fuse_lora(pipe, path, "a", client=client, restore=restore)
        fused = weights(pipe)
        changed = [k for k, v in fused.items() if not torch.equal(v, original[k])]
        assert len(changed) > 50
        unfuse_lora(pipe)
        assert get_active_adapters(pipe) == []
        after = weights(pipe)
        if restore == "backup":
            assert all(torch.equal(after[k], original[k]) for k in original)
        else:
            # The stated bound: one fp16 rounding when fusing and one when unfusing, each at
            # most half an ulp of the larger of the original and the fused value.
            for key in changed:
                magnitude = torch.maximum(original[key].float().abs(), fused[key].float().abs())
                ulp = (magnitude * 2**-10).clamp(min=2**-24)
                error = (after[key].float() - original[key].float()).abs()
                assert bool((error <= ulp).all()), (key, float((error / ulp).max()))
        assert {k: v.data_ptr() for k, v in pipe.unet.named_parameters()} == pointers
        delete_adapters(pipe)


@pytest.mark.parametrize("rslora", [False, True])
def test_saved_lora_config_alphas_are_honoured(daemon, lora_dir, rslora):
    """diffusers' save_lora_weights stores each component's LoraConfig in the file's metadata;
    its lora_alpha, alpha_pattern and use_rslora decide the scaling."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    pipe = tiny_sd_pipeline()
    peft_sd = sd_lora_peft(pipe)
    config = LoraConfig(r=4, lora_alpha=8, alpha_pattern={"to_k": 2}, use_rslora=rslora,
                        target_modules=UNET_TARGETS).to_dict()
    config = {k: list(v) if isinstance(v, set) else v for k, v in config.items()}
    StableDiffusionPipeline.save_lora_weights(
        lora_dir, unet_lora_layers={k[5:]: v for k, v in peft_sd.items() if k.startswith("unet.")},
        unet_lora_adapter_metadata=config, weight_name="meta.safetensors")
    path = lora_dir / "meta.safetensors"
    reference = diffusers_fused(pipe, path, 0.7)
    with daemon.client() as client:
        load_and_fuse_lora(pipe, path, "x", lora_scale=0.7, client=client)
        assert_same_weights(weights(pipe), weights(reference))
        delete_adapters(pipe)
