"""LoRAs in the formats real trainers write, made from the tiny pipelines' PEFT LoRAs
(examples/tiny_models.py)."""

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
