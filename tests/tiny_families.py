"""Tiny SDXL, Flux and SD3 pipelines built from configs (no model hub), images from them without
tokenizers, and LoRA files for them in the formats real trainers write.

The configs follow diffusers' own pipeline tests, shrunk further where it costs nothing. The
SD 1.x pipeline and the generic helpers (``peft_layers``, ``save``) are in :mod:`tests.tiny`.
"""

from __future__ import annotations

import re

import torch

from examples.tiny_models import CONV_TARGETS, TE_TARGETS, UNET_TARGETS, peft_layers

VOCAB = 100
IDS = torch.arange(8).unsqueeze(0) % VOCAB  # fixed "prompt" token ids


def clip_config(**overrides):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(**{
        "bos_token_id": 0, "eos_token_id": 2, "hidden_size": 32, "intermediate_size": 37,
        "layer_norm_eps": 1e-05, "num_attention_heads": 4, "num_hidden_layers": 2,
        "pad_token_id": 1, "vocab_size": VOCAB, "hidden_act": "gelu", "projection_dim": 32,
        **overrides})


def t5_encoder():
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0,
        dropout_rate=0.0))


def _flow_vae(latent_channels: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,),
                         layers_per_block=1, latent_channels=latent_channels, norm_num_groups=1,
                         use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                         scaling_factor=1.5035)


def _ready(pipe, dtype: torch.dtype):
    """Models built from configs are in training mode: evaluation mode, so images repeat."""
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype=dtype)


# ------------------------------------------------------------------------------------ SDXL


def tiny_sdxl_pipeline(dtype: torch.dtype = torch.float32, seed: int = 0):
    """SDXL-shaped: a UNet with ``text_time`` added conditioning, linear projections and two
    transformer layers in its second block; CLIPTextModel + CLIPTextModelWithProjection."""
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 time ids x 8 + the pooled 32
        cross_attention_dim=64,  # the two encoders' hidden states side by side
        norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3,
                        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
                        latent_channels=4, norm_num_groups=8)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(clip_config()),
        text_encoder_2=CLIPTextModelWithProjection(clip_config()), tokenizer=None,
        tokenizer_2=None, unet=unet, scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
        force_zeros_for_empty_prompt=True)
    return _ready(pipe, dtype)


def sdxl_image(pipe, steps: int = 2) -> torch.Tensor:
    """One image; both text encoders run (as ``encode_prompt`` would) on fixed token ids."""
    with torch.no_grad():
        first = pipe.text_encoder(IDS, output_hidden_states=True)
        second = pipe.text_encoder_2(IDS, output_hidden_states=True)
        embeds = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        return _denoise(pipe, embeds, second.text_embeds, steps, size=16)


def _denoise(pipe, embeds: torch.Tensor, pooled: torch.Tensor, steps: int,
             size: int) -> torch.Tensor:
    """The pipeline run from prompt embeddings, with zero negatives and a fixed seed."""
    out = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled,
               negative_prompt_embeds=torch.zeros_like(embeds),
               negative_pooled_prompt_embeds=torch.zeros_like(pooled),
               num_inference_steps=steps, output_type="pt", height=size, width=size,
               generator=torch.Generator().manual_seed(0))
    return out.images


def sdxl_lora_peft(pipe, rank: int = 4, seed: int = 1,
                   convs: bool = False) -> dict[str, torch.Tensor]:
    """Diffusers/PEFT format for UNet and both text encoders."""
    unet = peft_layers(pipe.unet, UNET_TARGETS + (CONV_TARGETS if convs else []), rank, seed)
    te = peft_layers(pipe.text_encoder, TE_TARGETS, rank, seed + 1)
    te2 = peft_layers(pipe.text_encoder_2, TE_TARGETS, rank, seed + 2)
    return {**{f"unet.{k}": v for k, v in unet.items()},
            **{f"text_encoder.{k}": v for k, v in te.items()},
            **{f"text_encoder_2.{k}": v for k, v in te2.items()}}


def sdxl_to_kohya(peft_sd: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """kohya-ss SDXL format (``lora_unet_*``, ``lora_te1_*``, ``lora_te2_*``, ``.alpha``),
    written by diffusers' own ``convert_state_dict_to_kohya``."""
    from diffusers.utils import convert_state_dict_to_kohya

    kohya = convert_state_dict_to_kohya(peft_sd)
    assert {k.split("_", 2)[1] for k in kohya} == {"unet", "te1", "te2"}, sorted(kohya)[:3]
    for key in [k for k in kohya if k.endswith(".alpha")]:
        kohya[key] = torch.tensor(alpha)
    return kohya


def kohya_with_alphas(peft_sd: dict[str, torch.Tensor], alphas: tuple[float, ...]
                      ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """kohya-ss format (any family with kohya files: ``lora_unet_``, ``lora_te1_``...) with a
    different alpha per layer (``alphas`` in turn), and the alpha of each module
    (``<component>.<module path>``), to compute the expected weights directly."""
    from diffusers.utils import convert_state_dict_to_kohya

    modules = sorted({k.rsplit(".lora_", 1)[0] for k in peft_sd})
    kohya, module_alphas = {}, {}
    for index, module in enumerate(modules):
        part = {k: v for k, v in peft_sd.items() if k.startswith(module + ".lora_")}
        converted = convert_state_dict_to_kohya(part)
        alpha = float(alphas[index % len(alphas)])
        for key in [k for k in converted if k.endswith(".alpha")]:
            converted[key] = torch.tensor(alpha)
        assert len(converted) == 3 and not kohya.keys() & converted.keys(), sorted(converted)
        kohya.update(converted)
        module_alphas[module] = alpha
    return kohya, module_alphas


def to_sgm_names(kohya: dict[str, torch.Tensor],
                 layers_per_block: int = 2) -> dict[str, torch.Tensor]:
    """kohya UNet names in the original (SGM/LDM) layout, as many SDXL trainers write them:
    ``lora_unet_down_blocks_1_attentions_0_...`` -> ``lora_unet_input_blocks_4_1_...``."""
    per_block = layers_per_block + 1
    inner = {"resnets": 0, "attentions": 1}

    def rename(key: str) -> str:
        if match := re.match(r"lora_unet_down_blocks_(\d+)_(resnets|attentions)_(\d+)_", key):
            block, kind, layer = int(match[1]), match[2], int(match[3])
            return f"lora_unet_input_blocks_{1 + block * per_block + layer}_{inner[kind]}_" + key[
                match.end():]
        if match := re.match(r"lora_unet_up_blocks_(\d+)_(resnets|attentions)_(\d+)_", key):
            block, kind, layer = int(match[1]), match[2], int(match[3])
            return f"lora_unet_output_blocks_{block * per_block + layer}_{inner[kind]}_" + key[
                match.end():]
        if match := re.match(r"lora_unet_mid_block_(resnets|attentions)_(\d+)_", key):
            index = 1 if match[1] == "attentions" else 2 * int(match[2])
            return f"lora_unet_middle_block_{index}_" + key[match.end():]
        assert not key.startswith("lora_unet_"), key
        return key

    renamed = {rename(k): v for k, v in kohya.items()}
    assert len(renamed) == len(kohya)
    return renamed


# ------------------------------------------------------------------------------------ Flux


def tiny_flux_pipeline(dtype: torch.dtype = torch.float32, seed: int = 0):
    """Flux-shaped: one double and one single block (inner dim 32), CLIP + T5 encoders."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8])
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_flow_vae(1),
                        text_encoder=CLIPTextModel(clip_config()), tokenizer=None,
                        text_encoder_2=t5_encoder(), tokenizer_2=None, transformer=transformer)
    return _ready(pipe, dtype)


def flux_image(pipe, steps: int = 2) -> torch.Tensor:
    """One image; CLIP gives the pooled embedding and T5 the sequence, as in ``encode_prompt``."""
    with torch.no_grad():
        pooled = pipe.text_encoder(IDS).pooler_output
        embeds = pipe.text_encoder_2(IDS)[0]
        out = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, num_inference_steps=steps,
                   output_type="pt", height=16, width=16, guidance_scale=1.0,
                   generator=torch.Generator().manual_seed(0))
    return out.images


FLUX_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                "to_add_out", "proj_mlp", "proj_out", "ff.net.0.proj", "ff.net.2",
                "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
                "norm1_context.linear", "norm.linear", "norm_out.linear", "x_embedder",
                "context_embedder", "linear_1", "linear_2"]


def flux_lora_peft(pipe, rank: int = 4, seed: int = 1,
                   text_encoder: bool = True) -> dict[str, torch.Tensor]:
    """Diffusers/PEFT format: ``transformer.<module>.lora_A.weight`` and (CLIP only, the Flux
    loader has no T5 LoRAs) ``text_encoder.<module>...``."""
    tr = peft_layers(pipe.transformer, FLUX_TARGETS, rank, seed)
    lora = {f"transformer.{k}": v for k, v in tr.items()}
    if text_encoder:
        te = peft_layers(pipe.text_encoder, TE_TARGETS, rank, seed + 1)
        lora.update({f"text_encoder.{k}": v for k, v in te.items()})
    return lora


# Kohya (sd-scripts) Flux names of the tiny transformer's layers, as (name, out, in). The single
# blocks' fused ``linear1`` is left out: diffusers splits it with Flux-dev's hard-coded sizes.
def _flux_kohya_layers(dim: int = 32, mlp: int = 128) -> list[tuple[str, int, int]]:
    layers = []
    for stream in ("img", "txt"):
        prefix = f"lora_unet_double_blocks_0_{stream}_"
        layers += [(prefix + "attn_qkv", 3 * dim, dim), (prefix + "attn_proj", dim, dim),
                   (prefix + "mlp_0", mlp, dim), (prefix + "mlp_2", dim, mlp),
                   (prefix + "mod_lin", 6 * dim, dim)]
    layers += [("lora_unet_single_blocks_0_linear2", dim, dim + mlp),
               ("lora_unet_single_blocks_0_modulation_lin", 3 * dim, dim)]
    for name in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj"):
        layers += [(f"lora_te1_text_model_encoder_layers_{i}_{name}", 32, 32) for i in range(2)]
    layers += [(f"lora_te1_text_model_encoder_layers_{i}_mlp_fc1", 37, 32) for i in range(2)]
    layers += [(f"lora_te1_text_model_encoder_layers_{i}_mlp_fc2", 32, 37) for i in range(2)]
    return layers


def flux_lora_kohya(rank: int = 6, seed: int = 3) -> dict[str, torch.Tensor]:
    """sd-scripts Flux format (``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight``,
    ``lora_te1_...``) with a different alpha per layer."""
    generator = torch.Generator().manual_seed(seed)
    lora = {}
    for i, (name, out, inp) in enumerate(_flux_kohya_layers()):
        lora[f"{name}.lora_down.weight"] = 0.3 * torch.randn(rank, inp, generator=generator)
        lora[f"{name}.lora_up.weight"] = 0.3 * torch.randn(out, rank, generator=generator)
        lora[f"{name}.alpha"] = torch.tensor(float(1 + i % 5))
    return lora


# ------------------------------------------------------------------------------------- SD3


def tiny_sd3_pipeline(dtype: torch.dtype = torch.float32, seed: int = 0):
    """SD3-shaped: one joint block, a 2x2 patch embedding (a Conv2d), CLIP x2 + T5."""
    from diffusers import (FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
        pooled_projection_dim=64, out_channels=4)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_flow_vae(4),
        text_encoder=CLIPTextModelWithProjection(clip_config()), tokenizer=None,
        text_encoder_2=CLIPTextModelWithProjection(clip_config()), tokenizer_2=None,
        text_encoder_3=t5_encoder(), tokenizer_3=None)
    return _ready(pipe, dtype)


def sd3_image(pipe, steps: int = 2) -> torch.Tensor:
    """One image; the three encoders' outputs are combined as ``encode_prompt`` does."""
    with torch.no_grad():
        first = pipe.text_encoder(IDS, output_hidden_states=True)
        second = pipe.text_encoder_2(IDS, output_hidden_states=True)
        t5 = pipe.text_encoder_3(IDS)[0]
        clip = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        embeds = torch.cat([clip, t5], dim=-2)
        pooled = torch.cat([first.text_embeds, second.text_embeds], dim=-1)
        return _denoise(pipe, embeds, pooled, steps, size=32)


SD3_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
               "to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
               "ff_context.net.2", "norm1.linear", "norm1_context.linear", "context_embedder",
               "pos_embed.proj", "proj_out"]


def sd3_lora_peft(pipe, rank: int = 4, seed: int = 1) -> dict[str, torch.Tensor]:
    """Diffusers/PEFT format for the transformer (including the patch-embedding Conv2d) and
    both CLIP encoders (the SD3 loader has no T5 LoRAs)."""
    tr = peft_layers(pipe.transformer, SD3_TARGETS, rank, seed)
    te = peft_layers(pipe.text_encoder, TE_TARGETS, rank, seed + 1)
    te2 = peft_layers(pipe.text_encoder_2, TE_TARGETS, rank, seed + 2)
    return {**{f"transformer.{k}": v for k, v in tr.items()},
            **{f"text_encoder.{k}": v for k, v in te.items()},
            **{f"text_encoder_2.{k}": v for k, v in te2.items()}}
