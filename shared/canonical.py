"""Canonical layouts: a LoRA converted into the form workers fuse.

The daemon converts each file once per family (``acquire(..., layout=<family>)``); a worker
falling back to loading a file itself, or given a state dict, converts with the same code.

The conversion reuses diffusers' own readers (the family mixin's ``lora_state_dict``, which knows
kohya/A1111, SGM block names, legacy diffusers and attention-processor keys, Flux kohya/XLabs,
...) and PEFT key conversions, then renames everything to the canonical names of
:mod:`loracache.shared.families`. Formats we cannot fuse exactly are refused with
UNSUPPORTED_FORMAT naming the format, never partially converted.
"""

from __future__ import annotations

import json
import re
import types
from collections.abc import Mapping
from typing import Any, Callable

import torch

from .errors import ErrorCode, LoraCacheError
from .families import ALPHA, DOWN, FAMILIES, UNMATCHED, UP, Family

ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' key for the saved LoraConfigs

# Formats recognised by a key fragment. Checked before conversion, because diffusers would
# silently drop some of them (DoRA) or fail with an unhelpful message.
UNSUPPORTED_KEYS = [
    ("hada_w1", "LyCORIS LoHa (Hadamard product)"),
    ("lokr_w1", "LyCORIS LoKr (Kronecker product)"),
    ("lora_mid", "LyCORIS LoCon with a Tucker core (lora_mid)"),
    ("oft_", "OFT / BOFT"),
    ("dora_scale", "DoRA (weight-decomposed LoRA)"),
    ("lora_magnitude_vector", "DoRA (weight-decomposed LoRA)"),
    (".diff", "full weight differences (.diff)"),
    (".lora_up.bias", "LoRA with bias terms"),
    ("lora_B.bias", "LoRA with bias terms"),
    ("query_norm.scale", "Flux Control LoRA (it replaces layers and changes their shapes)"),
]
OLD_DOWN_SUFFIXES = (".lora.down.weight", ".lora_linear_layer.down.weight", ".down.weight",
                     "_lora.down.weight")
SAFELORAS = re.compile(r"^[a-z_]+:\d+:(up|down)$")  # cloneofsimo/lora: "unet:12:up"

# Kohya SDXL/SD files may name UNet blocks the SGM way (input_blocks.4.1); diffusers maps them
# given the UNet's layers_per_block, which is 2 for every SD 1.x, 2.x and SDXL UNet.
SGM_UNET_CONFIG = types.SimpleNamespace(layers_per_block=2)
LOAD_KWARGS: dict[str, dict[str, Any]] = {
    "sd": {"unet_config": SGM_UNET_CONFIG},
    "sdxl": {"unet_config": SGM_UNET_CONFIG},
    "flux": {"return_alphas": True},
    "sd3": {},
}


def canonical_tensors(state_dict: dict[str, torch.Tensor], family_name: str,
                      metadata: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Convert a LoRA state dict into the canonical layout of ``family_name``.

    ``metadata`` is the file's safetensors metadata: diffusers stores the PEFT LoraConfig of
    each component there (``lora_adapter_metadata``), and its alphas then win.
    """
    family = FAMILIES[family_name]
    _refuse_unsupported(state_dict)
    converted, alphas = _read_with_diffusers(state_dict, family)
    configs = _adapter_configs(metadata)
    canonical: dict[str, torch.Tensor] = {}
    for component in family.components:
        prefix = f"{component}."
        part = {k[len(prefix):]: v for k, v in converted.items() if k.startswith(prefix)}
        if not part:
            continue
        try:
            layers = _component_layers(component, part, alphas, family)
            if component in configs:
                _apply_config_alphas(layers, component, configs[component])
            canonical.update(layers)
        except (ValueError, KeyError, IndexError) as exc:
            raise LoraCacheError(ErrorCode.UNSUPPORTED_FORMAT,
                                 f"cannot convert the {component} layers of this file for "
                                 f"{family.name}: {str(exc)[:300]}") from exc
    for key in converted:
        if not key.startswith(tuple(f"{c}." for c in family.components)):
            canonical[UNMATCHED + key] = converted[key]
    if not any(k.endswith(DOWN) for k in canonical):
        raise LoraCacheError(ErrorCode.UNSUPPORTED_FORMAT,
                             f"no LoRA layers for the {family.name} family found in the file "
                             f"(first keys: {', '.join(list(state_dict)[:3])})")
    return canonical


def alpha_values(tensors: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Every ``.alpha`` of a canonical layout as a number, read in one transfer: on a GPU each
    ``float()`` of a device scalar waits for the device, and a LoRA has hundreds of them."""
    keys = [key for key in tensors if key.endswith(ALPHA)]
    if not keys:
        return {}
    values = torch.stack([tensors[key].reshape(()).float() for key in keys]).tolist()
    return dict(zip(keys, values))


def cast_factors(canonical: dict[str, torch.Tensor],
                 dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The factors cast to ``dtype`` (the model's, for unfused use); alphas stay float32."""
    return {key: value if key.endswith(ALPHA) or not value.is_floating_point()
            else value.to(dtype) for key, value in canonical.items()}


MAX_RANK = 4096  # beyond the width of every layer of the families served


def _check_factors(name: str, down: torch.Tensor, up: torch.Tensor) -> None:
    """A pair of LoRA factors: down (rank, in, ...) and up (out, rank, 1, ...) with one rank."""
    if down.dim() not in (2, 4) or up.dim() != down.dim():
        raise LoraCacheError(ErrorCode.INVALID_LORA,
                             f"{name}: factors of {down.dim()} and {up.dim()} dimensions; a LoRA "
                             "layer has 2 (linear) or 4 (convolution) on both")
    rank = down.shape[0]
    if up.shape[1] != rank or not 0 < rank <= MAX_RANK:
        raise LoraCacheError(ErrorCode.INVALID_LORA,
                             f"{name}: down has rank {rank} and up {up.shape[1]}; they must be "
                             f"equal and between 1 and {MAX_RANK}")


def _refuse_unsupported(state_dict: dict[str, torch.Tensor]) -> None:
    keys = list(state_dict)
    peft_file = next((k for k in keys if k.startswith("base_model.model.")), None)
    if peft_file is not None:
        raise LoraCacheError(ErrorCode.UNSUPPORTED_FORMAT,
                             f"a PEFT adapter_model file (key {peft_file!r}) names modules of the "
                             "model PEFT wrapped, which diffusers pipelines do not share; save it "
                             "with diffusers' save_lora_weights or in kohya format")
    if keys and all(SAFELORAS.match(k) for k in keys):
        raise LoraCacheError(ErrorCode.UNSUPPORTED_FORMAT,
                             "cloneofsimo/lora 'safeloras' format (keys like 'unet:0:up', which "
                             "name modules by index only): convert it to diffusers or kohya keys")
    for fragment, name in UNSUPPORTED_KEYS:
        hit = next((k for k in keys if fragment in k), None)
        if hit is not None:
            raise LoraCacheError(ErrorCode.UNSUPPORTED_FORMAT,
                                 f"{name} is not supported (key {hit!r}); only plain LoRA and "
                                 "LoCon layers are fused")


def _read_with_diffusers(state_dict: dict[str, torch.Tensor],
                         family: Family) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    import diffusers.loaders

    mixin = getattr(diffusers.loaders, family.mixin)
    kwargs = LOAD_KWARGS[family.name]
    try:
        result = mixin.lora_state_dict(dict(state_dict), **kwargs)
    except (ValueError, KeyError, RuntimeError, IndexError) as exc:
        raise LoraCacheError(ErrorCode.UNSUPPORTED_FORMAT,
                             f"diffusers cannot read this file as a {family.name} LoRA: "
                             f"{str(exc)[:300]}") from exc
    if isinstance(result, tuple):
        converted, alphas = result[0], (result[1] or {})
    else:
        converted, alphas = result, {}
    return converted, {k: float(v) for k, v in alphas.items()}


def _adapter_configs(metadata: dict[str, str] | None) -> dict[str, dict[str, Any]]:
    """The per-component LoraConfig dicts diffusers saves as ``<component>.<field>`` keys."""
    raw = (metadata or {}).get(ADAPTER_METADATA_KEY)
    if not raw:
        return {}
    try:
        packed = json.loads(raw)
    except ValueError as exc:
        raise LoraCacheError(ErrorCode.INVALID_LORA,
                             f"{ADAPTER_METADATA_KEY} in the file's metadata is not JSON: "
                             f"{exc}") from exc
    configs: dict[str, dict[str, Any]] = {}
    for key, value in packed.items() if isinstance(packed, dict) else ():
        component, _, field = key.partition(".")
        configs.setdefault(component, {})[field] = value
    return configs


def _apply_config_alphas(layers: dict[str, torch.Tensor], component: str,
                         config: dict[str, Any]) -> None:
    """Replace alphas with those of a PEFT LoraConfig, as diffusers does when it has one.

    rsLoRA scales by alpha / sqrt(rank); that is stored as an equivalent plain alpha.
    """
    lora_alpha = config.get("lora_alpha")
    if lora_alpha is None:
        return
    patterns = config.get("alpha_pattern") or {}
    for key in [k for k in layers if k.endswith(DOWN)]:
        layer = key[:-len(DOWN)]
        module = layer[len(component) + 1:]
        alpha = float(next((v for pattern, v in patterns.items()
                            if _peft_pattern_matches(pattern, module)), lora_alpha))
        rank = layers[key].shape[0]
        if config.get("use_rslora"):
            alpha *= rank ** 0.5
        layers[layer + ALPHA] = torch.tensor(alpha, dtype=torch.float32)


def _peft_pattern_matches(pattern: str, module: str) -> bool:
    """PEFT's rule for rank_pattern/alpha_pattern keys: a regex anchored with ``^``, or a
    suffix of the module path at a dot boundary."""
    if pattern.startswith("^"):
        return re.match(pattern, module) is not None
    return re.match(rf"(.*\.)?({pattern})$", module) is not None


def _component_layers(component: str, part: dict[str, torch.Tensor], alphas: dict[str, float],
                      family: Family) -> dict[str, torch.Tensor]:
    to_peft = _peft_converter(component == family.denoiser)
    if not any("lora_A" in k for k in part):
        module_alphas = _module_alphas(component, part, alphas, to_peft)
        part = to_peft(part)
    else:
        module_alphas = _module_alphas(component, part, alphas, lambda p: p)
    layers: dict[str, torch.Tensor] = {}
    for key, down in part.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[:-len(".lora_A.weight")]
        up = part.get(f"{module}.lora_B.weight")
        if up is None:
            raise LoraCacheError(ErrorCode.INVALID_LORA,
                                 f"{component}.{module} has a down (A) matrix but no up (B)")
        name = f"{component}.{module}"
        _check_factors(name, down, up)
        layers[name + DOWN], layers[name + UP] = down, up
        if module in module_alphas:
            layers[name + ALPHA] = torch.tensor(module_alphas[module], dtype=torch.float32)
    leftover = [k for k in part if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if leftover:
        raise LoraCacheError(ErrorCode.UNSUPPORTED_FORMAT,
                             f"{component} has keys that are not LoRA factors: "
                             f"{', '.join(leftover[:5])}")
    return layers


def _peft_converter(denoiser: bool) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """diffusers' renaming to PEFT keys (``<module>.lora_A.weight``) for this component."""
    from diffusers.utils import (convert_state_dict_to_diffusers, convert_state_dict_to_peft,
                                 convert_unet_state_dict_to_peft)

    if denoiser:
        return convert_unet_state_dict_to_peft
    return lambda part: convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))


def _module_alphas(component: str, part: dict[str, Any], alphas: dict[str, float],
                   to_peft: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, float]:
    """Alphas by module path.

    diffusers names an alpha after the module or after the down-weight key as it was before
    the PEFT renaming (``attn1.processor.to_q_lora.down.weight.alpha``), so the same renaming
    is applied to the keys alone (values replaced by their index) to follow them.
    """
    keys = list(part)
    renamed = to_peft({key: index for index, key in enumerate(keys)}) if keys else {}
    module_of = {keys[index]: new.rsplit(".lora_", 1)[0] for new, index in renamed.items()}
    modules = set(module_of.values())
    by_module = {}
    prefix = f"{component}."
    for key, alpha in alphas.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):].removesuffix(".alpha")
        if name in modules:
            by_module[name] = alpha
            continue
        for old in (name, *(name + suffix for suffix in OLD_DOWN_SUFFIXES)):
            if old in module_of:
                by_module[module_of[old]] = alpha
                break
    return by_module
