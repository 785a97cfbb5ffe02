"""Tiny diffusers pipelines built from configs (no model hub) and random LoRAs for them, in
diffusers' PEFT format: what the demo runs on, and what the tests build their own formats from.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import save_file


def tiny_sd_pipeline(dtype: torch.dtype = torch.float32, seed: int = 0, smallest: bool = False):
    """An SD 1.x-shaped pipeline: UNet with attention and convolutions, CLIP text encoder.

    ``smallest``: one cross-attention block per side, for tests that loop a thousand times.
    """
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    blocks = dict(block_out_channels=(32,), layers_per_block=1,
                  down_block_types=("CrossAttnDownBlock2D",),
                  up_block_types=("CrossAttnUpBlock2D",)) if smallest else dict(
        block_out_channels=(32, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    unet = UNet2DConditionModel(**blocks, sample_size=16, in_channels=4, out_channels=4,
                                cross_attention_dim=32, norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3,
                        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
                        latent_channels=4, norm_num_groups=8)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37,
        layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=2, pad_token_id=1,
        vocab_size=100))
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=None,
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype=dtype)


def image(pipe, steps: int = 2) -> torch.Tensor:
    """One image from fixed token ids (the text encoder runs; no tokenizer is needed)."""
    ids = torch.arange(8).unsqueeze(0) % 100
    with torch.no_grad():
        embeds = pipe.text_encoder(ids)[0]
        out = pipe(prompt_embeds=embeds, negative_prompt_embeds=torch.zeros_like(embeds),
                   num_inference_steps=steps, output_type="pt", height=32, width=32,
                   generator=torch.Generator().manual_seed(0))
    return out.images


UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
CONV_TARGETS = ["conv1", "conv2"]


def peft_layers(model: torch.nn.Module, targets: list[str], rank: int, seed: int,
                alpha: float | None = None) -> dict[str, torch.Tensor]:
    """A random LoRA for ``model`` in PEFT keys (``<module>.lora_A.weight``), made by PEFT."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    torch.manual_seed(seed)
    model = copy.deepcopy(model).float()
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=targets,
                        init_lora_weights=False)
    inject_adapter_in_model(config, model, adapter_name="x")
    return {k: v.detach().clone() * 0.3 for k, v in
            get_peft_model_state_dict(model, adapter_name="x").items()}


def sd_lora_peft(pipe, rank: int = 4, seed: int = 1,
                 convs: bool = False) -> dict[str, torch.Tensor]:
    """Diffusers/PEFT format: ``unet.<module>.lora_A.weight``, ``text_encoder.<module>...``."""
    unet = peft_layers(pipe.unet, UNET_TARGETS + (CONV_TARGETS if convs else []), rank, seed)
    te = peft_layers(pipe.text_encoder, TE_TARGETS, rank, seed + 1)
    return {**{f"unet.{k}": v for k, v in unet.items()},
            **{f"text_encoder.{k}": v for k, v in te.items()}}


def save(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path
