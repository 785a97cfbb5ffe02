"""SDXL, Flux and SD3: fusing through the daemon equals diffusers' own fusing (the oracle), and
real LoRA key sets convert to layers of the real models."""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import shutil
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch

from loracache.client import delete_adapters, get_active_adapters, load_and_fuse_lora
from loracache.client.fuser import Factors
from loracache.client.pipelines import fusable_module
from loracache.shared.canonical import canonical_tensors
from loracache.shared.errors import ErrorCode, LoraCacheError
from loracache.shared.families import ALPHA, DOWN, UNMATCHED, UP
from tests.support import REPO, Daemon
from tests.tiny import save, tiny_sd_pipeline
from tests.tiny_families import (flux_image, flux_lora_kohya, flux_lora_peft, sd3_image,
                                 sd3_lora_peft, sdxl_image, sdxl_lora_peft, sdxl_to_kohya,
                                 tiny_flux_pipeline, tiny_sd3_pipeline, tiny_sdxl_pipeline)

FIXTURES = REPO.parent / "shared" / "fixtures"  # see its README
KEYSETS = FIXTURES / "keysets"


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def family_lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("loras")


@pytest.fixture(scope="module")
def family_daemon(family_lora_dir: Path) -> Iterator[Daemon]:
    """One real daemon for the module (tests release every lease they take)."""
    daemon = Daemon(family_lora_dir, "--max-bytes", "1GiB")
    yield daemon
    daemon.cleanup()


@dataclasses.dataclass(frozen=True)
class FamilyCase:
    build: Callable
    image: Callable
    lora_components: tuple[str, ...]  # the components the family's LoRA files touch here


CASES = {
    "sdxl": FamilyCase(tiny_sdxl_pipeline, sdxl_image, ("unet", "text_encoder", "text_encoder_2")),
    "flux": FamilyCase(tiny_flux_pipeline, flux_image, ("transformer", "text_encoder")),
    "sd3": FamilyCase(tiny_sd3_pipeline, sd3_image,
                      ("transformer", "text_encoder", "text_encoder_2")),
}


@pytest.fixture(scope="module")
def pipelines() -> dict:
    """One tiny pipeline per family, built once; tests work on deep copies."""
    return {name: case.build() for name, case in CASES.items()}


# ------------------------------------------------------------------------------- helpers


def weights(pipe) -> dict[str, torch.Tensor]:
    """Every tensor of every model component (so changes anywhere are seen)."""
    return {f"{name}.{k}": v.detach().clone() for name, module in pipe.components.items()
            if isinstance(module, torch.nn.Module) for k, v in module.state_dict().items()}


def assert_same_weights(ours: dict, reference: dict, rtol: float = 1e-5) -> None:
    assert ours.keys() == reference.keys()
    for key, expected in reference.items():
        scale = max(1.0, float(expected.abs().max()))
        diff = float((ours[key].float() - expected.float()).abs().max())
        assert diff <= rtol * scale, f"{key}: max difference {diff}"


def changed(after: dict, before: dict) -> set[str]:
    return {k for k, v in after.items() if not torch.equal(v, before[k])}


def diffusers_fused(pipe, path, scale: float, name: str = "x"):
    reference = copy.deepcopy(pipe)
    reference.load_lora_weights(str(path), adapter_name=name)
    reference.fuse_lora(lora_scale=scale)
    reference.unload_lora_weights()
    return reference


# ------------------------------------------------------------------------ 1. the oracle

FORMATS = {
    "sdxl-peft": ("sdxl", lambda pipe: sdxl_lora_peft(pipe)),
    "sdxl-peft-locon": ("sdxl", lambda pipe: sdxl_lora_peft(pipe, convs=True)),
    "sdxl-kohya": ("sdxl", lambda pipe: sdxl_to_kohya(sdxl_lora_peft(pipe, rank=8), alpha=4.0)),
    "sdxl-kohya-locon": ("sdxl", lambda pipe: sdxl_to_kohya(sdxl_lora_peft(pipe, convs=True),
                                                            alpha=2.0)),
    "flux-peft": ("flux", lambda pipe: flux_lora_peft(pipe)),
    "flux-kohya": ("flux", lambda pipe: flux_lora_kohya()),
    "sd3-peft": ("sd3", lambda pipe: sd3_lora_peft(pipe)),
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_fused_weights_and_image_equal_diffusers(pipelines, family_daemon, family_lora_dir, fmt):
    family, make = FORMATS[fmt]
    case = CASES[family]
    pipe = copy.deepcopy(pipelines[family])
    path = save(make(pipe), family_lora_dir / f"{fmt}.safetensors")
    reference = diffusers_fused(pipe, path, 0.7)
    original = weights(pipe)
    expected = weights(reference)
    touched = changed(expected, original)
    # The oracle itself must have fused into every component the file has layers for.
    assert {k.split(".")[0] for k in touched} == set(case.lora_components)
    with family_daemon.client() as client:
        load_and_fuse_lora(pipe, path, adapter_name="x", lora_scale=0.7, client=client)
        ours = weights(pipe)
        assert_same_weights(ours, expected)
        assert changed(ours, original) == touched
        assert torch.allclose(case.image(pipe), case.image(reference), atol=1e-5)
        assert get_active_adapters(pipe) == ["x"]
        delete_adapters(pipe)
        assert family_daemon.stats()["leases"] == 0


# ------------------------------------------------- 2. real key sets against real models

SD15_UNET = {"sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8}
SDXL_UNET = {
    "sample_size": 128, "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048, "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816}
FLUX_DEV = {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
            "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
            "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": (16, 56, 56)}
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
          "num_hidden_layers": 12, "projection_dim": 768, "hidden_act": "quick_gelu",
          "vocab_size": 49408, "max_position_embeddings": 77}
CLIP_BIG_G = {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20,
              "num_hidden_layers": 32, "projection_dim": 1280, "hidden_act": "gelu",
              "vocab_size": 49408, "max_position_embeddings": 77}


@functools.cache
def real_model(family: str, component: str) -> torch.nn.Module:
    """A component of the real model of ``family``, on the meta device (no memory)."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    builders = {
        ("sd", "unet"): lambda: UNet2DConditionModel(**SD15_UNET),
        ("sdxl", "unet"): lambda: UNet2DConditionModel(**SDXL_UNET),
        ("flux", "transformer"): lambda: FluxTransformer2DModel(**FLUX_DEV),
        ("sdxl", "text_encoder_2"): lambda: CLIPTextModelWithProjection(
            CLIPTextConfig(**CLIP_BIG_G)),
    }
    build = builders.get((family, component))
    if build is None and component == "text_encoder":
        build = lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L))  # noqa: E731
    assert build is not None, (family, component)
    with torch.device("meta"):
        return build()


def numel(shape: list[int]) -> int:
    n = 1
    for size in shape:
        n *= size
    return n


# Random values for every synthesised tensor, as views into one pool: the key sets hold up to
# 172M numbers, and filling that many pages would dominate the test.
POOL_SIZE = 1 << 22


@functools.cache
def pool(dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(POOL_SIZE, generator=generator) * 0.02).to(dtype)


def fingerprint(down: torch.Tensor) -> float:
    """A per-layer alpha derived from the layer's down matrix, so a canonical alpha can be
    checked against the canonical down it came with (bf16/fp16-representable)."""
    return float((down.float().abs().mean() * 1000).to(down.dtype))


def synthesise(keyset: str, default_dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """A state dict with the key set's names, shapes and dtypes, and random values."""
    data = json.loads((KEYSETS / f"{keyset}.keys.json").read_text())
    specs = data.get("state_dict_keys", data)
    tensors = {}
    for index, (key, spec) in enumerate(specs.items()):
        if isinstance(spec, dict) and "shape" not in spec:
            continue  # file metadata kept in the key set ("metadata_key_for_stripped_models")
        shape = spec["shape"] if isinstance(spec, dict) else spec
        dtype = (getattr(torch, spec["dtype"].removeprefix("torch."))
                 if isinstance(spec, dict) else default_dtype)
        if key.endswith(".alpha"):
            continue  # set below, from the layer's down matrix
        n = numel(shape)
        offset = (index * 7919) % (POOL_SIZE - n)
        tensors[key] = pool(dtype)[offset:offset + n].view(shape)
    for key, spec in specs.items():
        if key.endswith(".alpha"):
            down = tensors[key.removesuffix(".alpha") + ".lora_down.weight"]
            tensors[key] = torch.tensor(fingerprint(down), dtype=down.dtype)
    return tensors


def layers(canonical: dict[str, torch.Tensor]) -> dict[str, Factors]:
    found = {}
    for key, down in canonical.items():
        if key.endswith(DOWN):
            layer = key.removesuffix(DOWN)
            alpha = canonical.get(layer + ALPHA)
            found[layer] = Factors(down, canonical[layer + UP],
                                   None if alpha is None else float(alpha))
    return found


# keyset -> (family, layers per component, whether alphas stay separate); None: refused
KEYSET_CASES = {
    "invokeai_sd15_kohya_shinkai_makoto_offset": ("sd", {"unet": 192, "text_encoder": 72}, True),
    "invokeai_sdxl_kohya_AlienStyle": (
        "sdxl", {"unet": 722, "text_encoder": 72, "text_encoder_2": 192}, True),
    # kohya Flux: the fused qkv and linear1 layers are split (3 and 4 layers), alpha folded in
    "invokeai_flux_lora_kohya_format": ("flux", {"transformer": 494}, False),
    "invokeai_flux_lora_diffusers_format": ("flux", {"transformer": 494}, False),
    # XLabs: qkv_lora1/2 become to_q/k/v and add_q/k/v_proj
    "invokeai_flux_lora_xlabs_format": ("flux", {"transformer": 24}, False),
}


@pytest.mark.parametrize("keyset", KEYSET_CASES)
def test_real_keyset_converts_to_layers_of_the_real_model(keyset):
    family, expected_counts, has_alphas = KEYSET_CASES[keyset]
    source = synthesise(keyset)
    canonical = canonical_tensors(source, family)
    assert not [k for k in canonical if k.startswith(UNMATCHED)]
    found = layers(canonical)
    counts: dict[str, int] = {}
    for layer, factors in found.items():
        component, _, path = layer.partition(".")
        counts[component] = counts.get(component, 0) + 1
        module = fusable_module(real_model(family, component), path)
        assert module is not None, f"{layer} names no Linear/Conv2d of the real {family} model"
        assert factors.fits(module.weight), (layer, tuple(module.weight.shape),
                                             tuple(factors.down.shape), tuple(factors.up.shape))
        if has_alphas:
            assert factors.alpha == fingerprint(factors.down), layer
        else:
            assert factors.alpha is None, layer
    assert counts == expected_counts
    # Every number of the file is used: the factors add up to the file's size (a split layer
    # shares its down matrix and divides its up matrix).
    assert sum(f.up.numel() for f in found.values()) == sum(
        v.numel() for k, v in source.items() if k.endswith(("lora_up.weight", "lora_B.weight",
                                                            ".up.weight")))


def _delta(factors: Factors) -> torch.Tensor:
    return factors.scale(1.0) * (factors.up.float().flatten(1) @ factors.down.float().flatten(1))


def test_kohya_flux_split_layers_keep_the_products():
    """sd-scripts' fused qkv / linear1 layers: the split layers' deltas, stacked, are the
    file's delta scaled by alpha / rank (diffusers folds the alpha into the factors)."""
    source = synthesise("invokeai_flux_lora_kohya_format")
    found = layers(canonical_tensors(source, "flux"))

    def file_delta(name: str) -> torch.Tensor:
        down = source[f"{name}.lora_down.weight"].float()
        scale = float(source[f"{name}.alpha"]) / down.shape[0]
        return scale * (source[f"{name}.lora_up.weight"].float() @ down)

    block = "transformer.transformer_blocks.0."
    stacked = torch.cat([_delta(found[block + f"attn.to_{x}"]) for x in "qkv"])
    torch.testing.assert_close(stacked, file_delta("lora_unet_double_blocks_0_img_attn_qkv"),
                               rtol=2e-2, atol=1e-6)
    single = "transformer.single_transformer_blocks.0."
    stacked = torch.cat([_delta(found[single + name]) for name in
                         ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")])
    torch.testing.assert_close(stacked, file_delta("lora_unet_single_blocks_0_linear1"),
                               rtol=2e-2, atol=1e-6)
    torch.testing.assert_close(_delta(found[block + "norm1.linear"]),
                               file_delta("lora_unet_double_blocks_0_img_mod_lin"),
                               rtol=2e-2, atol=1e-6)


def test_xlabs_flux_qkv_becomes_q_k_v():
    source = synthesise("invokeai_flux_lora_xlabs_format")
    found = layers(canonical_tensors(source, "flux"))
    block = "transformer.transformer_blocks.10."
    prefix = "double_blocks.10.processor."
    for stream, names in (("1", ("attn.to_q", "attn.to_k", "attn.to_v")),
                          ("2", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"))):
        stacked = torch.cat([_delta(found[block + name]) for name in names])
        expected = (source[f"{prefix}qkv_lora{stream}.up.weight"].float()
                    @ source[f"{prefix}qkv_lora{stream}.down.weight"].float())
        torch.testing.assert_close(stacked, expected, rtol=2e-2, atol=1e-6)
    torch.testing.assert_close(_delta(found[block + "attn.to_add_out"]),
                               source[f"{prefix}proj_lora2.up.weight"].float()
                               @ source[f"{prefix}proj_lora2.down.weight"].float(),
                               rtol=2e-2, atol=1e-6)


def test_flux_peft_adapter_model_is_refused_naming_the_format():
    """A PEFT ``adapter_model.safetensors`` (``base_model.model.<diffusers module>.lora_A``):
    diffusers takes any ``base_model`` key for a fal Kontext LoRA (BFL module names) and fails
    on a missing key. The refusal must say which format this is, not which key was missing."""
    source = synthesise("invokeai_flux_peft_adapter_model")
    with pytest.raises(LoraCacheError) as caught:
        canonical_tensors(source, "flux")
    assert caught.value.code is ErrorCode.UNSUPPORTED_FORMAT
    assert "peft" in caught.value.message.lower(), caught.value.message


# --------------------------------------------------- 3. a real unsupported file, via the daemon


def test_cloneofsimo_safeloras_file_is_refused_by_the_daemon(family_daemon, family_lora_dir):
    path = family_lora_dir / "analog_svd_rank4.safetensors"
    shutil.copyfile(FIXTURES / "cloneofsimo_analog_svd_rank4.safetensors", path)
    pipe = tiny_sd_pipeline()
    original = weights(pipe)
    with family_daemon.client() as client:
        with pytest.raises(LoraCacheError) as caught:
            load_and_fuse_lora(pipe, path, adapter_name="x", client=client)
        assert caught.value.code is ErrorCode.UNSUPPORTED_FORMAT
        assert "safeloras" in caught.value.message
        assert get_active_adapters(pipe) == []
    assert not changed(weights(pipe), original)
    assert family_daemon.stats()["leases"] == 0
