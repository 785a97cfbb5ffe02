"""Model families: which diffusers LoRA loader reads their files, and which components a LoRA
for them may touch. Families are data; one generic converter and one generic fuser use them.

A family's layout is the *canonical* form of a LoRA for it, computed once in the daemon:
``<component>.<module path>.lora_down.weight`` (A, rank x in), ``...lora_up.weight`` (B,
out x rank) and, when the file has one, ``<component>.<module path>.alpha`` (a 0-dim float32).
``<module path>`` is the module's name inside that component, e.g.
``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``.
"""

from __future__ import annotations

import dataclasses

DOWN = ".lora_down.weight"
UP = ".lora_up.weight"
ALPHA = ".alpha"
UNMATCHED = "unmatched."  # prefix of keys the converter could place in no component


@dataclasses.dataclass(frozen=True)
class Family:
    name: str  # the layout name on the wire
    mixin: str  # the diffusers LoRA loader mixin of the family's pipelines
    denoiser: str  # the component that is not a text encoder: "unet" or "transformer"
    text_encoders: tuple[str, ...]

    @property
    def components(self) -> tuple[str, ...]:
        return (self.denoiser, *self.text_encoders)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("sd", "StableDiffusionLoraLoaderMixin", "unet", ("text_encoder",)),
    Family("sdxl", "StableDiffusionXLLoraLoaderMixin", "unet", ("text_encoder", "text_encoder_2")),
    Family("sd3", "SD3LoraLoaderMixin", "transformer", ("text_encoder", "text_encoder_2")),
    Family("flux", "FluxLoraLoaderMixin", "transformer", ("text_encoder",)),
)}

RAW = "raw"  # the file's own tensors, unconverted
LAYOUTS = (RAW, *FAMILIES)  # layout names without a dtype
# A family layout may name the dtype its factors are cast to (``"flux:BF16"``): a LoRA used
# unfused must have its model's dtype, or PEFT makes each worker its own cast copy.
CAST_DTYPES = ("F16", "BF16", "F32")


@dataclasses.dataclass(frozen=True)
class Layout:
    """A layout as ``acquire`` names it, parsed."""

    name: str  # RAW or a family's name
    dtype: str | None  # the safetensors name of the dtype factors are cast to, or None


def parse_layout(layout: str) -> Layout:
    """``raw``, ``<family>`` or ``<family>:<dtype>``; ValueError saying what is accepted."""
    name, colon, dtype = layout.partition(":")
    if name not in LAYOUTS or (colon and (name == RAW or dtype not in CAST_DTYPES)):
        raise ValueError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}, and a "
                         f"family's with a dtype to cast to, e.g. sdxl:F16 "
                         f"({', '.join(CAST_DTYPES)})")
    return Layout(name, dtype or None)
