"""diffusers' unfused LoRA API over shared LoRAs: load with loracache, use with diffusers.

    from loracache.client import load_lora_weights

    load_lora_weights(pipe, "/loras/style.safetensors", "style")  # was pipe.load_lora_weights
    pipe.set_adapters(["style", "detail"], [0.8, 0.5])           # diffusers' own, unchanged

The LoRA is leased in its family's canonical layout, cast by the daemon to the pipeline's dtype,
and handed to diffusers' own loaders (``load_lora_adapter``, ``load_lora_into_text_encoder``)
with ``low_cpu_mem_usage``: PEFT then assigns the leased tensors as the LoRA layers' weights
instead of copying them, so every worker's layers are views of the node's one copy. The
LoraConfig is written from the file's own ranks and alphas, so scales equal diffusers'.

Each LoRA weight that is a view of the lease holds it: once diffusers has dropped them all
(``delete_adapters``, ``unload_lora_weights``, the pipeline collected), the lease is released.
A hotswap copies the new factors into the adapter's existing weights, as diffusers does, so
compiled graphs keep their addresses; those weights are then the worker's own (one slot per
adapter name, padded to ``enable_lora_hotswap``'s rank), and the lease goes once copied.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import threading
import weakref
from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import nn

from loracache.shared.families import ALPHA, DOWN, UNMATCHED, UP, Family

from .client import LoraCacheClient
from .lease import Lease
from .pipelines import component, family_of
from .sourcing import canonical_tensors_for, check_fallback

log = logging.getLogger("loracache.client")

HOLDERS_ATTR = "_loracache_unfused"  # adapter name -> the _LeaseHolder of its weights
HUB_KWARGS = ("weight_name", "subfolder", "revision")  # diffusers' ways to name a file
REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
FACTOR_NAMES = ("lora_A", "lora_B")


def load_lora_weights(pipeline: Any, source: str | os.PathLike[str] | Mapping[str, torch.Tensor],
                      adapter_name: str | None = None, *, client: LoraCacheClient | None = None,
                      hotswap: bool = False, fallback: str = "local", **kwargs: Any) -> None:
    """``pipeline.load_lora_weights(source, adapter_name, hotswap=...)``, with the LoRA's
    weights shared by every worker on the node instead of copied into this one.

    ``source``: a file (under one of the daemon's LoRA directories), a URL the daemon may fetch
    (``https://``, ``s3://``, ``hf://``), a Hub repository with ``weight_name`` (and
    ``subfolder``, ``revision``) as diffusers takes them, or a state dict (loaded here, not
    shared). ``fallback`` is :func:`loracache.client.load_and_fuse_lora`'s. Afterwards use
    diffusers as always: ``set_adapters``, ``disable_lora``, ``enable_lora``, ``fuse_lora``,
    ``delete_adapters``, ``unload_lora_weights``.
    """
    check_fallback(fallback)
    family = family_of(pipeline)
    source = _named_source(source, kwargs)
    denoiser = component(pipeline, family.denoiser)
    if denoiser is None:
        raise ValueError(f"the pipeline has no {family.denoiser}")
    if adapter_name is None:
        from diffusers.utils.peft_utils import get_adapter_name

        adapter_name = get_adapter_name(denoiser)
    holders: dict[str, _LeaseHolder] = pipeline.__dict__.setdefault(HOLDERS_ATTR, {})
    dtype = next(denoiser.parameters()).dtype
    sourced = canonical_tensors_for(pipeline, family, source, client, fallback,
                                    dtype=dtype if dtype.is_floating_point else None)
    try:
        parts = _peft_parts(pipeline, family, sourced.tensors)
        if hotswap and any(name != family.denoiser for name in parts):
            raise ValueError("At the moment, hotswapping is not supported for text encoders, "
                             "please pass `hotswap=False`.")  # diffusers' words, before any swap
        if hotswap:  # the swap writes into the adapter's weights: they must be this process's
            _take_own_copies(pipeline, family, adapter_name, holders)
        for name, (state_dict, config) in parts.items():
            _load_component(pipeline, family, name, state_dict, config, adapter_name, hotswap)
    except BaseException:
        if sourced.lease is not None:
            sourced.lease.release()
        raise
    if sourced.lease is not None and sourced.lender is not None:
        views = _views_of(sourced.lease, _lora_weights(pipeline, family, adapter_name))
        if views:
            holders[adapter_name] = _LeaseHolder(sourced.lease, sourced.lender, views)
        else:  # copied (hotswap, padded for it, or cast by PEFT): the lease is done with
            sourced.lease.release()


# ------------------------------------------------------------------------------- internals


def _named_source(source: Any, kwargs: dict[str, Any]) -> Any:
    """The file ``source`` names with diffusers' keyword arguments: a folder or a Hub
    repository and ``weight_name``/``subfolder``/``revision``. Anything else is refused."""
    unknown = sorted(set(kwargs) - set(HUB_KWARGS) - {"low_cpu_mem_usage"})
    if unknown:
        raise TypeError(f"load_lora_weights() got unexpected keyword arguments {unknown}; it "
                        f"takes {', '.join(HUB_KWARGS)} to name a file, like diffusers'")
    if kwargs.get("low_cpu_mem_usage") is False:
        raise ValueError("low_cpu_mem_usage=False would copy the shared LoRA into this process; "
                         "loracache always assigns the shared tensors")
    weight_name, subfolder, revision = (kwargs.get(k) for k in HUB_KWARGS)
    if isinstance(source, Mapping) or not (weight_name or subfolder or revision):
        return source
    name = os.fspath(source)
    if os.path.isdir(name) or "://" in name or not REPO_ID.match(name):
        if revision:
            raise ValueError("revision= names a Hub revision; give a Hub repository id "
                             "(org/name) as the source, or an hf:// URL")
        return os.path.join(name, subfolder or "", weight_name or "")
    if not weight_name:
        raise ValueError(f"name the file in {name!r} with weight_name=, as the daemon fetches "
                         "one file (e.g. weight_name='pytorch_lora_weights.safetensors')")
    at = f"@{revision}" if revision else ""
    return f"hf://{name}{at}/" + "/".join(p for p in (subfolder, weight_name) if p)


def _peft_parts(pipeline: Any, family: Family, tensors: Mapping[str, torch.Tensor]
                ) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]]:
    """Per component with layers: its state dict in diffusers' PEFT keys
    (``<component>.<module>.lora_A.weight``) and the LoraConfig of its ranks and alphas."""
    unmatched = [key.removeprefix(UNMATCHED) for key in tensors if key.startswith(UNMATCHED)]
    if unmatched:
        log.warning("%d key(s) of this LoRA belong to no %s component and are ignored: %s",
                    len(unmatched), family.name, ", ".join(unmatched[:8]))
    alphas = _alphas(tensors)
    parts: dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]] = {}
    for name in family.components:
        prefix = f"{name}."
        layers = [key[:-len(DOWN)] for key in tensors
                  if key.startswith(prefix) and key.endswith(DOWN)]
        if not layers:
            continue
        if component(pipeline, name) is None:
            log.warning("this LoRA has %d layers for %s, which the pipeline does not have; "
                        "they are ignored", len(layers), name)
            continue
        state_dict, ranks, layer_alphas = {}, {}, {}
        for layer in layers:
            down, up = tensors[layer + DOWN], tensors[layer + UP]
            state_dict[f"{layer}.lora_A.weight"], state_dict[f"{layer}.lora_B.weight"] = down, up
            module = _module_name(pipeline, name, layer[len(prefix):])
            ranks[module] = down.shape[0]
            layer_alphas[module] = alphas.get(layer + ALPHA, float(down.shape[0]))
        parts[name] = (state_dict, _lora_config(name, ranks, layer_alphas))
    return parts


def _module_name(pipeline: Any, component_name: str, module: str) -> str:
    """The module's name as diffusers will look it up: text encoders without a
    ``text_model`` attribute are named without that prefix."""
    if component_name.startswith("text_encoder") and not hasattr(
            component(pipeline, component_name), "text_model"):
        return module.removeprefix("text_model.")
    return module


def _alphas(tensors: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Every ``.alpha`` as a number, read in one transfer (one device sync, not hundreds)."""
    keys = [key for key in tensors if key.endswith(ALPHA)]
    if not keys:
        return {}
    values = torch.stack([tensors[key].reshape(()).float() for key in keys]).tolist()
    return dict(zip(keys, values))


def _lora_config(name: str, ranks: dict[str, int], alphas: dict[str, float]) -> dict[str, Any]:
    """The component's LoraConfig as diffusers' metadata (``<component>.<field>``): the most
    common rank and alpha, and every other module's exactly, by an anchored pattern."""
    rank = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    config = {
        "r": rank, "lora_alpha": alpha, "target_modules": sorted(ranks),
        "rank_pattern": {_exactly(m): r for m, r in ranks.items() if r != rank},
        "alpha_pattern": {_exactly(m): a for m, a in alphas.items() if a != alpha},
    }
    return {f"{name}.{field}": value for field, value in config.items()}


def _exactly(module: str) -> str:
    """A PEFT pattern that matches this module only (PEFT appends the ``$``)."""
    return "^" + re.escape(module)


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


def _lora_weights(pipeline: Any, family: Family, adapter_name: str) -> list[nn.Parameter]:
    """The LoRA factors' parameters of ``adapter_name`` in every component."""
    weights = []
    for name in family.components:
        root = component(pipeline, name)
        for module in root.modules() if root is not None else ():
            for factor in FACTOR_NAMES:
                layers = getattr(module, factor, None)
                if isinstance(layers, nn.ModuleDict) and adapter_name in layers:
                    weights.append(cast(nn.Parameter, layers[adapter_name].weight))
    return weights


def _views_of(lease: Lease, weights: list[nn.Parameter]) -> list[nn.Parameter]:
    """The ``weights`` that are views of the lease's memory."""
    tensors = lease.tensors
    if not tensors:
        return []
    shared = tensors[next(iter(tensors))].untyped_storage().data_ptr()  # the entry's buffer
    return [w for w in weights if w.untyped_storage().data_ptr() == shared]


def _take_own_copies(pipeline: Any, family: Family, adapter_name: str,
                     holders: dict[str, _LeaseHolder]) -> None:
    """Give the adapter's weights that are views of a lease storage of their own (a copy) and
    release the lease: the hotswap copies the new factors into them."""
    holder = holders.pop(adapter_name, None)
    if holder is None:
        return
    with torch.no_grad():
        for weight in _views_of(holder.lease, _lora_weights(pipeline, family, adapter_name)):
            weight.data = weight.data.clone()
    holder.release()


class _LeaseHolder:
    """Releases a lease once the last of the LoRA weights that are views of it is collected."""

    def __init__(self, lease: Lease, lender: LoraCacheClient, views: list[nn.Parameter]) -> None:
        self.lease = lease
        self._lender = lender
        self._lock = threading.Lock()
        self._alive = len(views)
        self._finalizers = [weakref.finalize(view, self._collected) for view in views]
        for finalizer in self._finalizers:
            finalizer.atexit = False

    def _collected(self) -> None:
        with self._lock:
            self._alive -= 1
            last = self._alive == 0
        if last and not self._lender.closed:
            self._lender.release_soon(self.lease)

    def release(self) -> None:
        for finalizer in self._finalizers:
            finalizer.detach()
        self.lease.release()
