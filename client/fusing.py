"""onediffx.lora's API over shared LoRAs: switch by changing one import.

    from loracache.client import load_and_fuse_lora, unfuse_lora, set_and_fuse_adapters, ...

A LoRA given by path is leased from the daemon in its family's canonical layout and fused
straight from the shared tensors: the worker keeps no copy of them (``memory_efficient=True``).
The lease stays held while the adapter is loaded, because unfusing subtracts the same deltas.
Every change of the fused set goes through :func:`_fuse_exactly`, which rewrites each touched weight
once. The state lives on the pipeline object (``pipeline._loracache``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from loracache.shared.canonical import alpha_values
from loracache.shared.families import ALPHA, DOWN, UNMATCHED, UP, Family

from . import fuser
from .client import LoraCacheClient
from .lease import Lease
from .pipelines import component, family_of, fusable_module, is_quantized
from .sourcing import canonical_tensors_for, check_fallback

log = logging.getLogger("loracache.client")

STATE_ATTR = "_loracache"
RESTORE_MODES = ("subtract", "backup")


@dataclasses.dataclass
class Adapter:
    name: str
    layers: dict[str, fuser.Factors]  # canonical layer name -> factors
    weights: dict[str, torch.Tensor]  # canonical layer name -> the weight it updates
    lease: Lease | None  # None when the tensors are the worker's own (local, dict, copies)
    lender: LoraCacheClient | None = None  # the client that holds the lease
    generation: int = 0  # of the lease when ``layers`` were taken from it

    def refresh(self) -> None:
        """Take the factors from the lease again if it was renewed (the daemon restarted and
        lent the same file from a new copy): the old copy may be gone."""
        if self.lease is None or self.lease.released:
            return  # released (the client was closed): the factors held keep their memory
        generation, tensors = self.lease.snapshot()
        if generation == self.generation:
            return
        self.layers = {layer: fuser.Factors(tensors[layer + DOWN], tensors[layer + UP], f.alpha)
                       for layer, f in self.layers.items()}
        self.generation = generation


@dataclasses.dataclass
class PipelineLoras:
    restore: str
    adapters: dict[str, Adapter] = dataclasses.field(default_factory=dict)
    active: dict[str, float] = dataclasses.field(default_factory=dict)  # name -> fused weight
    backups: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # host copies


# ---------------------------------------------------------------------------------- the API


def load_and_fuse_lora(pipeline: Any, source: str | os.PathLike[str] | Mapping[str, torch.Tensor],
                       adapter_name: str | None = None, *, lora_scale: float = 1.0,
                       memory_efficient: bool = True, client: LoraCacheClient | None = None,
                       strict: bool = True, restore: str = "subtract",
                       fallback: str = "local") -> None:
    """Load a LoRA (a file path, through the daemon, or a state dict) and fuse it.

    ``restore="backup"`` keeps a host copy of each touched weight so unfusing restores it
    bit-exactly; ``"subtract"`` subtracts the same deltas. ``strict`` makes keys that match no
    module an error (else a warning). ``fallback="local"`` loads the file in this process when
    the daemon is unreachable or its memory cannot be mapped here (one warning per process);
    ``"error"`` raises instead. A URL (``https://``, ``s3://``, ``hf://``) is fetched by the
    daemon only: without one it raises whatever the fallback.
    """
    if restore not in RESTORE_MODES:
        raise ValueError(f"restore must be one of {RESTORE_MODES}, not {restore!r}")
    check_fallback(fallback)
    state = _state(pipeline, restore)
    name = adapter_name or f"default_{len(state.adapters)}"
    if name in state.adapters:
        raise ValueError(f"an adapter named {name!r} is loaded already; delete_adapters() it "
                         "first or choose another adapter_name")
    family = family_of(pipeline)
    sourced = canonical_tensors_for(pipeline, family, source, client, fallback)
    tensors, lease, lender = sourced.tensors, sourced.lease, sourced.lender
    try:
        adapter = _adapter(pipeline, family, name, tensors, lease, strict)
        adapter.lender = lender
        if not memory_efficient:  # the old behaviour: the worker keeps its own copies
            adapter.layers = {k: fuser.Factors(f.down.clone(), f.up.clone(), f.alpha)
                              for k, f in adapter.layers.items()}
            _release(adapter)
        state.adapters[name] = adapter
        _fuse_exactly(state, {**state.active, name: lora_scale})
    except BaseException:
        state.adapters.pop(name, None)
        if lease is not None:
            lease.release()
        raise


def unfuse_lora(pipeline: Any) -> None:
    """Take every fused adapter out of the weights; the adapters stay loaded."""
    state = getattr(pipeline, STATE_ATTR, None)
    if state is not None:
        _fuse_exactly(state, {})


def set_and_fuse_adapters(pipeline: Any, adapter_names: str | Sequence[str] | None = None,
                          adapter_weights: float | Sequence[float] | None = None) -> None:
    """Fuse exactly ``adapter_names`` (default: all loaded) with ``adapter_weights`` (default
    1.0; one number applies to all). Names that are not loaded are skipped with a warning."""
    state = getattr(pipeline, STATE_ATTR, None)
    if state is None:
        return
    names = list(state.adapters) if adapter_names is None else (
        [adapter_names] if isinstance(adapter_names, str) else list(adapter_names))
    if adapter_weights is None or isinstance(adapter_weights, (int, float)):
        weights = [1.0 if adapter_weights is None else float(adapter_weights)] * len(names)
    else:
        weights = [float(w) for w in adapter_weights]
        if len(weights) != len(names):
            raise ValueError(f"{len(names)} adapter names but {len(weights)} weights")
    unknown = [n for n in names if n not in state.adapters]
    if unknown:
        log.warning("set_and_fuse_adapters: no adapters named %s are loaded; skipped", unknown)
    _fuse_exactly(state, {n: w for n, w in zip(names, weights) if n in state.adapters})


def delete_adapters(pipeline: Any, adapter_names: str | Sequence[str] | None = None) -> None:
    """Unfuse and forget adapters (default: all), releasing their leases."""
    state = getattr(pipeline, STATE_ATTR, None)
    if state is None:
        return
    names = list(state.adapters) if adapter_names is None else (
        [adapter_names] if isinstance(adapter_names, str) else list(adapter_names))
    _fuse_exactly(state, {n: w for n, w in state.active.items() if n not in names})
    for name in names:
        adapter = state.adapters.pop(name, None)
        if adapter is not None:
            _release(adapter)


def get_active_adapters(pipeline: Any) -> list[str]:
    """Names of the adapters fused into the pipeline now."""
    state = getattr(pipeline, STATE_ATTR, None)
    return list(state.active) if state is not None else []


# ------------------------------------------------------------------------------- internals


def _state(pipeline: Any, restore: str) -> PipelineLoras:
    state = getattr(pipeline, STATE_ATTR, None)
    if state is None:
        state = PipelineLoras(restore=restore)
        setattr(pipeline, STATE_ATTR, state)
    elif state.restore != restore and state.adapters:
        raise ValueError(f"this pipeline fuses with restore={state.restore!r}; delete its "
                         f"adapters before switching to restore={restore!r}")
    state.restore = restore
    return state


def _fuse_exactly(state: PipelineLoras, wanted: dict[str, float]) -> None:
    """Make ``wanted`` (name -> weight) the fused set, rewriting each touched weight once and
    only the weights whose sum of terms changes; asking for the fused set again does nothing."""
    if wanted == state.active:
        return
    lenders = {id(a.lender): a.lender for a in state.adapters.values()
               if a.lease is not None and a.lender is not None and not a.lender.closed}
    for lender in lenders.values():
        lender.verify_session()  # a restarted daemon: lease again before using the factors
    for adapter in state.adapters.values():
        adapter.refresh()

    def terms(active: dict[str, float], key: str) -> list[fuser.Term]:
        return [(state.adapters[n].layers[key], w) for n, w in active.items()
                if key in state.adapters[n].layers]

    touched: dict[str, torch.Tensor] = {}
    for name in {*state.active, *wanted}:
        touched.update(state.adapters[name].weights)
    for key, weight in touched.items():
        old, new = terms(state.active, key), terms(wanted, key)
        if [(id(f), w) for f, w in old] == [(id(f), w) for f, w in new]:
            continue  # this weight already holds exactly what is wanted
        if state.restore == "subtract":
            fuser.update(weight, remove=old, add=new)
        elif new:
            if key not in state.backups:  # first change of this weight: keep the original
                state.backups[key] = weight.detach().to("cpu", copy=True)
            fuser.update(weight, remove=[], add=new, base=state.backups[key])
        else:  # nothing fused here any more: put the original bits back
            with torch.no_grad():
                weight.copy_(state.backups.pop(key))
    state.active = dict(wanted)


def _adapter(pipeline: Any, family: Family, name: str, tensors: Mapping[str, torch.Tensor],
             lease: Lease | None, strict: bool) -> Adapter:
    layers, weights, unmatched = {}, {}, []
    roots: dict[str, torch.nn.Module | None] = {}
    alphas = alpha_values(tensors)
    for key in tensors:
        if key.startswith(UNMATCHED):
            unmatched.append(key.removeprefix(UNMATCHED))
        if not key.endswith(DOWN):
            continue
        layer = key[:-len(DOWN)]
        component_name, _, path = layer.partition(".")
        if component_name not in roots:
            roots[component_name] = component(pipeline, component_name)
        root = roots[component_name]
        module = fusable_module(root, path) if root is not None else None
        factors = fuser.Factors(tensors[key], tensors[layer + UP], alphas.get(layer + ALPHA))
        if module is not None and is_quantized(module.weight):  # packed shapes fit nothing
            raise ValueError(f"{layer} is quantized ({type(module.weight).__name__}, "
                             f"{module.weight.dtype}): a LoRA cannot be fused into quantized "
                             "weights. Use it unfused: loracache.client.load_lora_weights("
                             "pipeline, source, adapter_name), then pipeline.set_adapters()")
        if module is None or not factors.fits(module.weight):
            unmatched.append(layer)
            continue
        layers[layer], weights[layer] = factors, module.weight
    if unmatched:
        message = (f"{len(unmatched)} LoRA layer(s) of {name!r} match no module of this "
                   f"{family.name} pipeline (or not its shape): {', '.join(unmatched[:8])}")
        if strict:
            raise ValueError(message + "; pass strict=False to fuse the rest")
        log.warning(message)
    return Adapter(name=name, layers=layers, weights=weights, lease=lease,
                   generation=lease.generation if lease is not None else 0)


def _release(adapter: Adapter) -> None:
    if adapter.lease is not None:
        adapter.lease.release()
        adapter.lease = None
