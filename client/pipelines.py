"""What the fuser needs to know about a diffusers pipeline: its family, and which module a
canonical layer name points at."""

from __future__ import annotations

import torch
from torch import nn

from loracache.shared.families import FAMILIES, Family


def family_of(pipeline: object) -> Family:
    """The family of ``pipeline``, from the LoRA loader mixin its class inherits."""
    mixins = {cls.__name__ for cls in type(pipeline).__mro__}
    for family in FAMILIES.values():
        if family.mixin in mixins:
            return family
    raise ValueError(f"{type(pipeline).__name__} is not a pipeline loracache can fuse LoRAs "
                     f"into; supported are pipelines with one of these LoRA loaders: "
                     f"{', '.join(f.mixin for f in FAMILIES.values())}")


def component(pipeline: object, name: str) -> nn.Module | None:
    """A pipeline component, unwrapped from ``torch.compile`` (its weights are the same)."""
    module = getattr(pipeline, name, None)
    if not isinstance(module, nn.Module):
        return None
    return getattr(module, "_orig_mod", module)


def fusable_module(root: nn.Module, path: str) -> nn.Linear | nn.Conv2d | None:
    """The Linear or Conv2d at ``path`` under ``root``, or None.

    Text encoders are named with or without their ``text_model.`` prefix depending on the
    class; PEFT-wrapped layers are fused into their base layer.
    """
    for candidate in (path, path.removeprefix("text_model.")):
        module = _submodule(root, candidate)
        if module is None:
            continue
        base = module._modules.get("base_layer")  # PEFT's wrapper: fuse into its base layer
        if base is not None:
            module = base
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            return module
    return None


def is_quantized(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is stored quantized: an integer tensor (bitsandbytes), a tensor
    subclass (torchao, GGUF, bitsandbytes' parameters) or float8 (diffusers' layerwise
    casting). A LoRA cannot be fused into it without losing most of it."""
    return (not weight.is_floating_point() or weight.element_size() == 1
            or type(weight) not in (torch.Tensor, nn.Parameter))


def _submodule(root: nn.Module, path: str) -> nn.Module | None:
    """``root.get_submodule(path)`` or None, through the module dictionaries directly: a LoRA
    names hundreds of layers, and attribute lookups through nn.Module and diffusers' models
    cost more than the fuse of a small layer on a GPU."""
    module = root
    for name in path.split("."):
        child = module._modules.get(name)
        if child is None:  # a wrapper that forwards attributes (torch.compile): ask it
            try:
                return root.get_submodule(path)
            except AttributeError:
                return None
        module = child
    return module


def device_of(pipeline: object, family: Family) -> torch.device:
    """Where the pipeline's denoiser lives: LoRAs are leased on that device."""
    denoiser = component(pipeline, family.denoiser)
    if denoiser is None:
        raise ValueError(f"the pipeline has no {family.denoiser}")
    return next(denoiser.parameters()).device
