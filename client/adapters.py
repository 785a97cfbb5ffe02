"""diffusers' unfused LoRA API over shared LoRAs: load with loracache, use with diffusers.

    from loracache.client import load_lora_weights

    load_lora_weights(pipe, "/loras/style.safetensors", "style")  # was pipe.load_lora_weights
    pipe.set_adapters(["style", "detail"], [0.8, 0.5])           # diffusers' own, unchanged

The LoRA is leased in its family's canonical layout, cast by the daemon to the pipeline's dtype,
and handed to diffusers' own loaders (``load_lora_adapter``, ``load_lora_into_text_encoder``)
with ``low_cpu_mem_usage``: PEFT then assigns the leased tensors as the LoRA layers' weights
instead of copying them, so every worker's layers are views of the node's one copy. The
LoraConfig is written from the file's own ranks and alphas, so scales equal diffusers'.

The weights that are views of the lease hold it (:mod:`.weight_leases`). Those views are never
written into: a hotswap first gives the adapter's weights storage of their own (once; after
``enable_lora_hotswap`` they have it already, padded), then copies the new factors in, as
diffusers does, so compiled graphs keep their addresses.
"""

from __future__ import annotations

import collections
import logging
import os
import re
from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import nn

from loracache.shared.canonical import alpha_values
from loracache.shared.dtypes import TORCH_DTYPES
from loracache.shared.families import ALPHA, DOWN, UNMATCHED, UP, Family
from loracache.shared.families import CAST_DTYPES as CAST_DTYPE_NAMES

from .client import LoraCacheClient
from .lease import SHARED_STORAGES, Lease
from .pipelines import component, family_of
from .sourcing import LoraTensors, canonical_tensors_for, check_fallback, named_source
from .weight_leases import RELEASER, WeightLease, storage_of, weight_of

log = logging.getLogger("loracache.client")

FACTOR_NAMES = ("lora_A", "lora_B")
CAST_DTYPES = {TORCH_DTYPES[name] for name in CAST_DTYPE_NAMES}  # what the daemon casts to


def load_lora_weights(pipeline: Any, source: str | os.PathLike[str] | Mapping[str, torch.Tensor],
                      adapter_name: str | None = None, *, client: LoraCacheClient | None = None,
                      hotswap: bool = False, fallback: str = "local", **kwargs: Any) -> None:
    """``pipeline.load_lora_weights(source, adapter_name, hotswap=...)``, with the LoRA's
    weights shared by every worker on the node instead of copied into this one.

    ``source``: a file (under one of the daemon's LoRA directories), a URL the daemon may fetch
    (``https://``, ``s3://``, ``hf://``), a folder or Hub repository with ``weight_name`` (and
    ``subfolder``, ``revision``) as diffusers takes them, or a state dict (loaded here, not
    shared). ``fallback`` is :func:`loracache.client.load_and_fuse_lora`'s. Afterwards use
    diffusers as always: ``set_adapters``, ``disable_lora``, ``enable_lora``, ``fuse_lora``,
    ``delete_adapters``, ``unload_lora_weights``; but hotswap through this function, never
    diffusers' own ``load_lora_weights(..., hotswap=True)``, which would write into the copy
    every worker shares.
    """
    check_fallback(fallback)
    family = family_of(pipeline)
    source = named_source(source, kwargs)
    denoiser = component(pipeline, family.denoiser)
    if denoiser is None:
        raise ValueError(f"the pipeline has no {family.denoiser}")
    if adapter_name is None:
        from diffusers.utils.peft_utils import get_adapter_name

        adapter_name = get_adapter_name(denoiser)
    RELEASER.look(follow_renewals=True)  # weights gone, copied or on a renewed lease
    sourced = canonical_tensors_for(pipeline, family, source, client, fallback,
                                    dtype=_cast_dtype(pipeline, family))
    before = {(id(layer), weight_of(layer).data_ptr())
              for layer in _lora_layers(pipeline, family, adapter_name)}
    try:
        parts = _peft_parts(pipeline, family, sourced.tensors)
        if hotswap and any(name != family.denoiser for name in parts):
            raise ValueError("At the moment, hotswapping is not supported for text encoders, "
                             "please pass `hotswap=False`.")  # diffusers' words, before any swap
        if hotswap:  # the swap writes into the adapter's weights: they must be this process's
            _take_own_copies(pipeline, family, adapter_name)
        for name, (state_dict, config) in parts.items():
            _load_component(pipeline, family, name, state_dict, config, adapter_name, hotswap)
    finally:  # also after a failure part-way: the components loaded keep their views
        if sourced.lease is not None:
            loaded = [layer for layer in _lora_layers(pipeline, family, adapter_name)
                      if (id(layer), weight_of(layer).data_ptr()) not in before]
            _hold(sourced, loaded)


# ------------------------------------------------------------------------------- internals


def _cast_dtype(pipeline: Any, family: Family) -> torch.dtype | None:
    """The dtype the daemon casts the factors to: the pipeline's, where all its components
    that take LoRAs share one PEFT would use as is; else None (PEFT casts per layer)."""
    dtypes = {getattr(module, "dtype", None) for module in
              (component(pipeline, name) for name in family.components) if module is not None}
    dtype = dtypes.pop() if len(dtypes) == 1 else None
    return dtype if dtype in CAST_DTYPES else None


def _peft_parts(pipeline: Any, family: Family, tensors: Mapping[str, torch.Tensor]
                ) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]]:
    """Per component with layers: its state dict in diffusers' PEFT keys
    (``<component>.<module>.lora_A.weight``) and the LoraConfig of its ranks and alphas.

    The tensors are new tensor objects over the lease's memory: PEFT may swap a weight's
    contents with the tensor given (a hotswap to a larger rank), which must not reach the
    views the lease and other leases of this process share.
    """
    unmatched = [key.removeprefix(UNMATCHED) for key in tensors if key.startswith(UNMATCHED)]
    if unmatched:
        log.warning("%d key(s) of this LoRA belong to no %s component and are ignored: %s",
                    len(unmatched), family.name, ", ".join(unmatched[:8]))
    alphas = alpha_values(tensors)
    parts: dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]] = {}
    for name in family.components:
        prefix = f"{name}."
        layers = [key[:-len(DOWN)] for key in tensors
                  if key.startswith(prefix) and key.endswith(DOWN)]
        if not layers:
            continue
        root = component(pipeline, name)
        if root is None:
            log.warning("this LoRA has %d layers for %s, which the pipeline does not have; "
                        "they are ignored", len(layers), name)
            continue
        state_dict, ranks, layer_alphas = {}, {}, {}
        for layer in layers:
            down, up = tensors[layer + DOWN].detach(), tensors[layer + UP].detach()
            state_dict[f"{layer}.lora_A.weight"], state_dict[f"{layer}.lora_B.weight"] = down, up
            module = layer[len(prefix):]
            if not hasattr(root, "text_model"):  # diffusers names these without the prefix
                module = module.removeprefix("text_model.")
            ranks[module] = down.shape[0]
            layer_alphas[module] = alphas.get(layer + ALPHA, float(down.shape[0]))
        parts[name] = (state_dict, _lora_config(name, ranks, layer_alphas))
    return parts


def _lora_config(name: str, ranks: dict[str, int], alphas: dict[str, float]) -> dict[str, Any]:
    """The component's LoraConfig as diffusers' metadata (``<component>.<field>``): the most
    common rank and alpha, and every other module's exactly, by an anchored pattern (PEFT
    appends the ``$``)."""
    rank = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    config = {
        "r": rank, "lora_alpha": alpha, "target_modules": sorted(ranks),
        "rank_pattern": {"^" + re.escape(m): r for m, r in ranks.items() if r != rank},
        "alpha_pattern": {"^" + re.escape(m): a for m, a in alphas.items() if a != alpha},
    }
    return {f"{name}.{field}": value for field, value in config.items()}


def _load_component(pipeline: Any, family: Family, name: str, state_dict: dict[str, torch.Tensor],
                    config: dict[str, Any], adapter_name: str, hotswap: bool) -> None:
    """diffusers' own loading of one component, as its ``load_lora_weights`` calls it."""
    module: Any = component(pipeline, name)
    if name == family.denoiser:
        module.load_lora_adapter(state_dict, prefix=name, adapter_name=adapter_name,
                                 metadata=config, _pipeline=pipeline, low_cpu_mem_usage=True,
                                 hotswap=hotswap)
    else:
        pipeline.load_lora_into_text_encoder(
            state_dict, network_alphas=None, text_encoder=module, prefix=name,
            lora_scale=pipeline.lora_scale, adapter_name=adapter_name, _pipeline=pipeline,
            metadata=config, low_cpu_mem_usage=True, hotswap=hotswap)


def _lora_layers(pipeline: Any, family: Family, adapter_name: str,
                 components: tuple[str, ...] | None = None) -> list[nn.Module]:
    """The LoRA factors' layers (``lora_A[name]``, ``lora_B[name]``) of ``adapter_name`` in
    ``components`` (default: all)."""
    found = []
    for name in components or family.components:
        root = component(pipeline, name)
        for module in root.modules() if root is not None else ():
            for factor in FACTOR_NAMES:
                layers = getattr(module, factor, None)
                if isinstance(layers, nn.ModuleDict) and adapter_name in layers:
                    found.append(layers[adapter_name])
    return found


def _hold(sourced: LoraTensors, layers: list[nn.Module]) -> None:
    """Have the layers whose weights are views of the lease hold it; release it if none has
    (copied: a hotswap, padded for one, or cast by PEFT). The views are found against the
    tensors handed to PEFT, even if the lease was renewed since."""
    lease, tensors = cast(Lease, sourced.lease), sourced.tensors
    if lease.released or not tensors:  # the client closed meanwhile
        return
    by_address = {tensors[name].data_ptr(): name for name in tensors
                  if name.endswith((DOWN, UP))}
    storage = storage_of(tensors[next(iter(tensors))])
    views = {by_address[weight_of(layer).data_ptr()]: layer for layer in layers
             if storage_of(weight_of(layer)) == storage
             and weight_of(layer).data_ptr() in by_address}
    if views:
        RELEASER.hold(WeightLease(lease, sourced.generation, tensors, views))
    else:
        lease.release()


def _take_own_copies(pipeline: Any, family: Family, adapter_name: str) -> None:
    """Give every weight of the adapter in the denoiser (what a hotswap writes) that views the
    daemon's memory storage of its own, and release the leases no weight views any more."""
    with torch.no_grad():
        for layer in _lora_layers(pipeline, family, adapter_name, (family.denoiser,)):
            weight = weight_of(layer)
            if SHARED_STORAGES.holds(weight):
                weight.data = weight.data.clone()
    RELEASER.look()
