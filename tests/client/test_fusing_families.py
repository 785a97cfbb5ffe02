"""SDXL, Flux and SD3: fusing through the daemon equals diffusers' own fusing (the oracle), and
real LoRA key sets convert to layers of the real models."""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import shutil
from typing import Callable

import pytest
import torch

from loracache.client import delete_adapters, get_active_adapters, load_and_fuse_lora
from loracache.client.fuser import Factors
from loracache.client.pipelines import fusable_module
from loracache.shared.canonical import canonical_tensors
from loracache.shared.errors import ErrorCode, LoraCacheError
from loracache.shared.families import ALPHA, DOWN, UNMATCHED, UP
from tests.client.test_fusing_oracle import assert_same_weights
from tests.support import REPO
from examples.tiny_models import save, sd_lora_peft, tiny_sd_pipeline
from tests.tiny_families import (flux_image, flux_lora_kohya, flux_lora_peft, kohya_with_alphas,
                                 sd3_image, sd3_lora_peft, sdxl_image, sdxl_lora_peft,
                                 sdxl_to_kohya, tiny_flux_pipeline, tiny_sd3_pipeline,
                                 tiny_sdxl_pipeline, to_sgm_names)

FIXTURES = REPO / "tests" / "fixtures"  # see its README for provenance
KEYSETS = FIXTURES / "keysets"


# ----------------------------------------------------------------------------- fixtures


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


def changed(after: dict, before: dict) -> set[str]:
    return {k for k, v in after.items() if not torch.equal(v, before[k])}


def diffusers_fused(pipe, path, scale: float, components: tuple[str, ...], name: str = "x"):
    """diffusers' fusing of ``components`` (named: Flux's ``fuse_lora`` fuses only the
    transformer by default, leaving a text encoder LoRA unfused, then dropped by unloading)."""
    reference = copy.deepcopy(pipe)
    reference.load_lora_weights(str(path), adapter_name=name)
    reference.fuse_lora(components=list(components), lora_scale=scale)
    reference.unload_lora_weights()
    return reference


# ------------------------------------------------------------------------ 1. the oracle

SGM_LOCON = ("unet.down_blocks.0.resnets.1.conv2.weight",
             "unet.up_blocks.0.resnets.2.conv1.weight", "unet.mid_block.resnets.1.conv1.weight",
             "unet.mid_block.attentions.0.proj_in.weight")
# format -> (family, LoRA file maker, weights the file must touch (beyond the usual attention))
FORMATS = {
    "sdxl-peft": ("sdxl", lambda pipe: sdxl_lora_peft(pipe), ()),
    "sdxl-peft-locon": ("sdxl", lambda pipe: sdxl_lora_peft(pipe, convs=True), SGM_LOCON),
    "sdxl-kohya": ("sdxl", lambda pipe: sdxl_to_kohya(sdxl_lora_peft(pipe, rank=8), alpha=4.0),
                   ()),
    "sdxl-kohya-locon": ("sdxl", lambda pipe: sdxl_to_kohya(sdxl_lora_peft(pipe, convs=True),
                                                            alpha=2.0), SGM_LOCON),
    # UNet blocks named the SGM/LDM way (input_blocks.4.1, middle_block.2, output_blocks.2.0)
    "sdxl-kohya-sgm-locon": ("sdxl", lambda pipe: to_sgm_names(sdxl_to_kohya(
        sdxl_lora_peft(pipe, convs=True), alpha=2.0)), SGM_LOCON),
    "flux-peft": ("flux", lambda pipe: flux_lora_peft(pipe), (
        "transformer.x_embedder.weight", "transformer.norm_out.linear.weight",
        "transformer.time_text_embed.timestep_embedder.linear_1.weight",
        "transformer.single_transformer_blocks.0.proj_mlp.weight")),
    # sd-scripts names, fused qkv split in three, alphas folded in by diffusers
    "flux-kohya": ("flux", lambda pipe: flux_lora_kohya(), (
        "transformer.transformer_blocks.0.attn.add_v_proj.weight",
        "transformer.transformer_blocks.0.ff_context.net.0.proj.weight",
        "transformer.single_transformer_blocks.0.proj_out.weight",
        "text_encoder.encoder.layers.1.mlp.fc2.weight")),
    # includes the 2x2 patch-embedding Conv2d
    "sd3-peft": ("sd3", lambda pipe: sd3_lora_peft(pipe), (
        "transformer.pos_embed.proj.weight", "transformer.context_embedder.weight")),
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_fused_weights_and_image_equal_diffusers(pipelines, module_daemon, module_lora_dir, fmt):
    family, make, must_touch = FORMATS[fmt]
    case = CASES[family]
    pipe = copy.deepcopy(pipelines[family])
    path = save(make(pipe), module_lora_dir / f"{fmt}.safetensors")
    reference = diffusers_fused(pipe, path, 0.7, case.lora_components)
    original = weights(pipe)
    expected = weights(reference)
    touched = changed(expected, original)
    # The oracle itself must have fused into every component the file has layers for.
    assert {k.split(".")[0] for k in touched} == set(case.lora_components)
    assert set(must_touch) <= touched, set(must_touch) - touched
    with module_daemon.client() as client:
        load_and_fuse_lora(pipe, path, adapter_name="x", lora_scale=0.7, client=client)
        ours = weights(pipe)
        assert_same_weights(ours, expected)
        assert changed(ours, original) == touched
        assert torch.allclose(case.image(pipe), case.image(reference), atol=1e-5)
        assert get_active_adapters(pipe) == ["x"]
        delete_adapters(pipe)
        assert_same_weights(weights(pipe), original)
        assert module_daemon.stats().leases == 0


def test_state_dict_source_is_left_unchanged(pipelines):
    """A LoRA given as a state dict is read, not rewritten: fusing it twice fuses the same.

    diffusers' kohya Flux converter scales the text-encoder factors by alpha / rank in place
    (``te_state_dict[...] *= scale_down``), so the caller's tensors must not be handed to it.
    """
    pipe = copy.deepcopy(pipelines["flux"])
    lora = flux_lora_kohya()
    before = {k: v.clone() for k, v in lora.items()}
    original = weights(pipe)
    load_and_fuse_lora(pipe, lora, adapter_name="x", lora_scale=0.7)
    first = weights(pipe)
    delete_adapters(pipe)
    assert_same_weights(weights(pipe), original)
    modified = sorted(k for k in lora if not torch.equal(lora[k], before[k]))
    load_and_fuse_lora(pipe, lora, adapter_name="x", lora_scale=0.7)
    second = weights(pipe)
    delete_adapters(pipe)
    assert not modified, f"{len(modified)} tensors of the caller's dict modified: {modified[:3]}"
    assert_same_weights(second, first)


def directly_fused(pipe, peft_sd: dict[str, torch.Tensor], module_alphas: dict[str, float],
                   scale: float) -> dict[str, torch.Tensor]:
    """The weights after fusing, computed from the definition: W + s * alpha / r * B @ A."""
    expected = weights(pipe)
    for module, alpha in module_alphas.items():
        down = peft_sd[f"{module}.lora_A.weight"].float()
        up = peft_sd[f"{module}.lora_B.weight"].float()
        weight = expected[f"{module}.weight"]
        delta = (up.flatten(1) @ down.flatten(1)).view(weight.shape) * scale * alpha / len(down)
        expected[f"{module}.weight"] = (weight.float() + delta).to(weight.dtype)
    return expected


ALPHAS = (1.0, 4.0, 8.0, 16.0, 3.0)
PER_LAYER_ALPHAS = {
    "sd-kohya": ("sd", lambda pipe: sd_lora_peft(pipe, rank=8, convs=True), None),
    "sdxl-kohya": ("sdxl", lambda pipe: sdxl_lora_peft(pipe, rank=8, convs=True), None),
    "sdxl-kohya-sgm": ("sdxl", lambda pipe: sdxl_lora_peft(pipe, rank=8, convs=True),
                       to_sgm_names),
}


@pytest.mark.parametrize("fmt", PER_LAYER_ALPHAS)
def test_kohya_per_layer_alphas_follow_the_file(pipelines, module_daemon, module_lora_dir, fmt):
    """kohya files whose layers have different alphas (resized or dynamic-rank LoRAs).

    The oracle is the definition, not diffusers: diffusers 0.42 names these UNet alphas after
    the old attention processors (``attn1.processor.to_k_lora.down.weight``) in PEFT's
    ``alpha_pattern``, and PEFT ignores them (RuntimeWarning), so diffusers fuses those layers
    with the most common alpha instead of their own.
    """
    family, make, rename = PER_LAYER_ALPHAS[fmt]
    pipe = tiny_sd_pipeline() if family == "sd" else copy.deepcopy(pipelines[family])
    peft_sd = make(pipe)
    kohya, module_alphas = kohya_with_alphas(peft_sd, ALPHAS)
    path = save(rename(kohya) if rename else kohya, module_lora_dir / f"alphas-{fmt}.safetensors")
    expected = directly_fused(pipe, peft_sd, module_alphas, 0.7)
    with module_daemon.client() as client:
        load_and_fuse_lora(pipe, path, adapter_name="x", lora_scale=0.7, client=client)
        assert_same_weights(weights(pipe), expected)
        delete_adapters(pipe)
        assert module_daemon.stats().leases == 0


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
    for key in specs:
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


# key set -> (family, canonical layers per component, whether alphas stay separate)
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


# Products are compared through a random projection, (B @ A) @ V = B @ (A @ V): the same
# check without materialising 21504 x 3072 matrices.
PROJECTION = torch.randn(16384, 8, generator=torch.Generator().manual_seed(1))


def projected(factors: Factors) -> torch.Tensor:
    down = factors.down.float()
    return factors.scale(1.0) * (factors.up.float() @ (down @ PROJECTION[:down.shape[1]]))


def file_projected(source: dict[str, torch.Tensor], name: str, up: str = ".lora_up.weight",
                   down: str = ".lora_down.weight") -> torch.Tensor:
    """The file's own product for layer ``name``, scaled by its alpha / rank if it has one."""
    a, b = source[name + down].float(), source[name + up].float()
    alpha = source.get(f"{name}.alpha")
    scale = 1.0 if alpha is None else float(alpha) / a.shape[0]
    return scale * (b @ (a @ PROJECTION[:a.shape[1]]))


def assert_same_product(ours: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to bf16 rounding of the factors (diffusers multiplies alpha into them)."""
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-2 * float(expected.abs().max()))


def test_kohya_flux_split_layers_keep_the_products():
    """sd-scripts' fused qkv / linear1 layers: the split layers' deltas, stacked, are the
    file's delta scaled by alpha / rank (diffusers folds the alpha into the factors)."""
    source = synthesise("invokeai_flux_lora_kohya_format")
    found = layers(canonical_tensors(source, "flux"))
    for i in (0, 18):
        block = f"transformer.transformer_blocks.{i}."
        file = f"lora_unet_double_blocks_{i}_"
        for stream, names in (("img", ("attn.to_q", "attn.to_k", "attn.to_v")),
                              ("txt", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"))):
            stacked = torch.cat([projected(found[block + name]) for name in names])
            assert_same_product(stacked, file_projected(source, file + stream + "_attn_qkv"))
        for name, module in (("img_attn_proj", "attn.to_out.0"),
                             ("txt_attn_proj", "attn.to_add_out"), ("img_mod_lin", "norm1.linear"),
                             ("txt_mlp_0", "ff_context.net.0.proj"), ("img_mlp_2", "ff.net.2")):
            assert_same_product(projected(found[block + module]),
                                file_projected(source, file + name))
    for i in (0, 37):
        single = f"transformer.single_transformer_blocks.{i}."
        stacked = torch.cat([projected(found[single + name]) for name in
                             ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")])
        assert_same_product(stacked,
                            file_projected(source, f"lora_unet_single_blocks_{i}_linear1"))
        assert_same_product(projected(found[single + "proj_out"]),
                            file_projected(source, f"lora_unet_single_blocks_{i}_linear2"))


def test_xlabs_flux_layers_keep_the_products():
    """XLabs: qkv_lora1/2 (image/text) become to_q/k/v and add_q/k/v_proj, proj_lora1/2 the
    two output projections; no alphas."""
    source = synthesise("invokeai_flux_lora_xlabs_format")
    found = layers(canonical_tensors(source, "flux"))
    for i in (0, 1, 10):
        block = f"transformer.transformer_blocks.{i}."
        prefix = f"double_blocks.{i}.processor."
        for stream, names in (("1", ("attn.to_q", "attn.to_k", "attn.to_v")),
                              ("2", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"))):
            stacked = torch.cat([projected(found[block + name]) for name in names])
            assert_same_product(stacked, file_projected(source, f"{prefix}qkv_lora{stream}",
                                                        ".up.weight", ".down.weight"))
        for stream, name in (("1", "attn.to_out.0"), ("2", "attn.to_add_out")):
            assert_same_product(projected(found[block + name]),
                                file_projected(source, f"{prefix}proj_lora{stream}",
                                               ".up.weight", ".down.weight"))


def test_flux_peft_adapter_model_is_refused_naming_the_format():
    """A PEFT ``adapter_model.safetensors`` (``base_model.model.<module>.lora_A``): diffusers
    takes any ``base_model`` key for a fal Kontext LoRA and fails on a missing key. The refusal
    must say which format this is, not which key was missing."""
    source = synthesise("invokeai_flux_peft_adapter_model")
    with pytest.raises(LoraCacheError) as caught:
        canonical_tensors(source, "flux")
    assert caught.value.code is ErrorCode.UNSUPPORTED_FORMAT
    assert "peft" in caught.value.message.lower(), caught.value.message


SD15_LAYER = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
FLUX_LAYER = "transformer.transformer_blocks.0.attn.to_q"


def _lycoris(layer: str, *suffixes: str):
    """Replace one layer of a kohya file by LyCORIS tensors with the given suffixes."""
    def edit(sd: dict[str, torch.Tensor]) -> None:
        down, up = sd.pop(f"{layer}.lora_down.weight"), sd.pop(f"{layer}.lora_up.weight")
        for suffix in suffixes:
            sd[f"{layer}.{suffix}"] = (down if suffix.endswith(("_a", "w1", "mid.weight"))
                                       else up)
    return edit


# One layer of a real file changed into another format: the whole file must be refused, by
# name, before diffusers sees it (diffusers, for one, drops DoRA scales with a warning and loads
# the rest). (key set, family, edit, words the message must contain)
REFUSED = {
    "loha": ("invokeai_sd15_kohya_shinkai_makoto_offset", "sd",
             _lycoris(SD15_LAYER, "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), "LoHa"),
    "lokr": ("invokeai_sd15_kohya_shinkai_makoto_offset", "sd",
             _lycoris(SD15_LAYER, "lokr_w1", "lokr_w2"), "LoKr"),
    "locon-tucker": ("invokeai_sd15_kohya_shinkai_makoto_offset", "sd",
                     lambda sd: sd.__setitem__(f"{SD15_LAYER}.lora_mid.weight",
                                               torch.zeros(128, 128, 3, 3)), "Tucker"),
    "kohya-dora": ("invokeai_sdxl_kohya_AlienStyle", "sdxl",
                   lambda sd: sd.__setitem__(
                       "lora_unet_input_blocks_4_1_proj_in.dora_scale", torch.ones(1, 640)),
                   "DoRA"),
    "peft-dora": ("invokeai_flux_lora_diffusers_format", "flux",
                  lambda sd: sd.__setitem__(f"{FLUX_LAYER}.lora_magnitude_vector",
                                            torch.ones(3072)), "DoRA"),
    "oft": ("invokeai_sd15_kohya_shinkai_makoto_offset", "sd",
            lambda sd: sd.__setitem__(f"{SD15_LAYER}.oft_blocks", torch.zeros(4, 80, 80)), "OFT"),
    "full-diff": ("invokeai_flux_lora_kohya_format", "flux",
                  lambda sd: sd.__setitem__("lora_unet_double_blocks_0_img_attn_norm_query_norm"
                                            ".diff", torch.zeros(128)), "differences"),
    "lora-bias": ("invokeai_flux_lora_diffusers_format", "flux",
                  lambda sd: sd.__setitem__(f"{FLUX_LAYER}.lora_B.bias", torch.zeros(3072)),
                  "bias"),
    "flux-control": ("invokeai_flux_lora_diffusers_format", "flux",
                     lambda sd: sd.__setitem__("double_blocks.0.img_attn.norm.query_norm.scale",
                                               torch.ones(128)), "Control"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_unsupported_formats_are_refused_by_name(case):
    keyset, family, edit, words = REFUSED[case]
    source = synthesise(keyset)
    edit(source)
    with pytest.raises(LoraCacheError) as caught:
        canonical_tensors(source, family)
    assert caught.value.code is ErrorCode.UNSUPPORTED_FORMAT
    assert words in caught.value.message, caught.value.message


# --------------------------------------------------- 3. a real unsupported file, via the daemon


def test_cloneofsimo_safeloras_file_is_refused_by_the_daemon(module_daemon, module_lora_dir):
    path = module_lora_dir / "analog_svd_rank4.safetensors"
    shutil.copyfile(FIXTURES / "cloneofsimo_analog_svd_rank4.safetensors", path)
    pipe = tiny_sd_pipeline()
    original = weights(pipe)
    with module_daemon.client() as client:
        with pytest.raises(LoraCacheError) as caught:
            load_and_fuse_lora(pipe, path, adapter_name="x", client=client)
        assert caught.value.code is ErrorCode.UNSUPPORTED_FORMAT
        assert "safeloras" in caught.value.message
        assert get_active_adapters(pipe) == []
    assert not changed(weights(pipe), original)
    assert module_daemon.stats().leases == 0
