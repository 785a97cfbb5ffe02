"""Real diffusion models' shapes with random weights, built from their configs (no model hub):
for measuring and testing at full size. Building on the meta device and filling from one
random pool takes seconds, where default initialisation takes a minute or more."""

from __future__ import annotations

from typing import Any

import torch

SD15_UNET = dict(  # the UNet of runwayml/stable-diffusion-v1-5 (its config.json)
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
    attention_head_dim=8, in_channels=4, out_channels=4, sample_size=64, norm_num_groups=32,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                      "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                    "CrossAttnUpBlock2D"))
SDXL_UNET = dict(  # the UNet of stabilityai/stable-diffusion-xl-base-1.0 (its config.json)
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280), cross_attention_dim=2048,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
    use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, norm_num_groups=32)


def random_unet(config: dict[str, Any], dtype: torch.dtype, device: str) -> torch.nn.Module:
    """A UNet of ``config`` on the meta device (shapes only) or filled with small random values.

    Filling copies windows of one random pool at random offsets: memory-bound, about a second,
    where initialising each layer (or drawing 860 M normal values) takes tens of seconds.
    """
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config).to(dtype)
    if device == "meta":
        return unet
    unet.to_empty(device=device)
    generator = torch.Generator().manual_seed(0)
    params = list(unet.parameters())
    largest = max(p.numel() for p in params)
    pool = (torch.randn(2 * largest, generator=generator) * 0.02).to(dtype).to(device)
    offsets = torch.randint(0, largest, (len(params),), generator=generator).tolist()
    with torch.no_grad():
        for param, offset in zip(params, offsets):
            param.view(-1).copy_(pool[offset:offset + param.numel()])
    return unet.eval()


def sd15_pipeline(dtype: torch.dtype = torch.float32, device: str = "cpu") -> Any:
    """A StableDiffusionPipeline with only an SD 1.5-shaped UNet: both loracache (which finds
    the family from the pipeline's LoRA loader) and diffusers' LoRA loader work on it."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        unet=random_unet(SD15_UNET, dtype, device), vae=None, text_encoder=None,
        tokenizer=None, scheduler=None, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


def sdxl_pipeline(dtype: torch.dtype = torch.float32, device: str = "cpu") -> Any:
    """A StableDiffusionXLPipeline with only an SDXL-shaped UNet (2.6 G weights)."""
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
        unet=random_unet(SDXL_UNET, dtype, device), scheduler=None)
