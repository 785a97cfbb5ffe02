"""LoRAs in the formats real trainers write, made from the tiny pipelines' PEFT LoRAs
(examples/tiny_models.py), and an SD 1.5-shaped pipeline."""

from __future__ import annotations

import torch


def to_kohya(peft_sd: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """kohya-ss format (``lora_unet_..._to_q.lora_down.weight``, ``.alpha``) via diffusers."""
    from diffusers.utils import convert_state_dict_to_kohya

    kohya = {}
    for component, prefix in (("unet", "lora_unet"), ("text_encoder", "lora_te")):
        part = {k[len(component) + 1:]: v for k, v in peft_sd.items()
                if k.startswith(component + ".")}
        if not part:
            continue
        for key, value in convert_state_dict_to_kohya(part).items():
            kohya[f"{prefix}_{key.removeprefix('lora_unet_').removeprefix('lora_te_')}"
                  if not key.startswith(prefix) else key] = value
    for key in [k for k in kohya if k.endswith(".alpha")]:
        kohya[key] = torch.tensor(alpha)
    return kohya


def to_legacy_diffusers(peft_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The old diffusers format: ``unet.<module>.lora.down.weight`` (UNet layers only)."""
    return {k.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up."): v
            for k, v in peft_sd.items() if k.startswith("unet.")}


SD15_UNET = dict(
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
    attention_head_dim=8, sample_size=64,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


def sd15_shaped_pipeline(dtype: torch.dtype = torch.float32):
    """A StableDiffusionPipeline whose UNet has SD 1.5's real shapes and random weights (the
    other components are absent). Built on the meta device first: default init is slow."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
    unet = unet.to_empty(device="cpu").to(dtype)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.normal_(0, 0.02, generator=generator)
    return StableDiffusionPipeline(unet=unet, vae=None, text_encoder=None, tokenizer=None,
                                   scheduler=None, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
