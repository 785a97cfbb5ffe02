"""Where a pipeline's LoRA tensors come from: leased from the daemon in the family's canonical
layout, or, when the daemon cannot lend them here, loaded in this process.

Both the fusing API (:mod:`.fusing`) and diffusers' unfused one (:mod:`.adapters`) take their
tensors from :func:`canonical_tensors_for`, through this process's shared default client.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import threading
from collections.abc import Mapping
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from loracache.shared.canonical import canonical_tensors, cast_factors
from loracache.shared.device_names import same_device
from loracache.shared.dtypes import SAFETENSORS_NAMES
from loracache.shared.errors import ErrorCode, LoraCacheError
from loracache.shared.families import Family

from .client import LoraCacheClient, device_name
from .lease import Lease
from .pipelines import device_of

log = logging.getLogger("loracache.client")

FALLBACKS = ("local", "error")
DEFAULT_CONNECT_TIMEOUT = 2.0  # a worker must not stall long on a daemon that is down
# Failures after which fallback="local" loads the file here: no daemon, or one whose memory
# this process cannot map (another IPC namespace, the GPU not visible, torch handle formats).
FALLBACK_CODES = (ErrorCode.DAEMON_UNAVAILABLE, ErrorCode.MAPPING_FAILED,
                  ErrorCode.VERSION_MISMATCH)


@dataclasses.dataclass
class LoraTensors:
    """A LoRA's canonical tensors, and the lease and client that lend them (None when the
    tensors are this process's own)."""

    tensors: Mapping[str, torch.Tensor]
    lease: Lease | None
    lender: LoraCacheClient | None
    generation: int = 0  # of the lease when ``tensors`` were taken from it


HUB_KWARGS = ("weight_name", "subfolder", "revision")  # diffusers' ways to name a file
REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def check_fallback(fallback: str) -> None:
    """ValueError unless ``fallback`` is one this module knows."""
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback must be one of {FALLBACKS}, not {fallback!r}")


def canonical_tensors_for(pipeline: Any, family: Family, source: Any,
                          client: LoraCacheClient | None, fallback: str,
                          dtype: torch.dtype | None = None) -> LoraTensors:
    """The canonical tensors of ``source`` (a path, a URL or a state dict) for ``pipeline``.

    ``dtype``: the factors cast to it (by the daemon, once per node), for layers that use
    them as they are rather than fusing them in float32.
    """
    if isinstance(source, Mapping):  # copied: diffusers' converters may scale tensors in place
        tensors = canonical_tensors({k: v.clone() for k, v in source.items()}, family.name)
        return LoraTensors(_cast(tensors, dtype), None, None)
    path = os.fspath(source)
    device = device_of(pipeline, family)
    layout = family.name if dtype is None else f"{family.name}:{SAFETENSORS_NAMES[dtype]}"
    try:
        lender = client or shared_client()
        # Lease on the pipeline's device when the daemon serves it (and this process could map
        # its memory there); else on the CPU, and the layers move what they use over.
        wanted = device_name(device) if device.type in ("cpu", "cuda") else "cpu"
        served = next((name for name in lender.devices if same_device(name, wanted)), None)
        wanted = served if served is not None and served not in lender.unmappable else "cpu"
        if wanted in lender.unmappable:  # nothing of the daemon's maps here: load it here
            raise LoraCacheError(ErrorCode.MAPPING_FAILED, "this process could not map the "
                                 f"daemon's memory on {', '.join(sorted(lender.unmappable))}")
        try:
            lease = lender.acquire(path, device=wanted, layout=layout)
        except LoraCacheError as exc:
            if (exc.code is not ErrorCode.BAD_REQUEST or layout == family.name
                    or "unknown layout" not in exc.message):
                raise
            # A daemon older than cast layouts (a rolling upgrade): uncast, PEFT casts here.
            lease = lender.acquire(path, device=wanted, layout=family.name)
        generation, leased = lease.snapshot()  # together: a renewal may change both
        return LoraTensors(leased, lease, lender, generation)
    except LoraCacheError as exc:
        if exc.code not in FALLBACK_CODES or fallback == "error" or "://" in path:
            raise  # a URL is fetched by the daemon only: there is nothing to load here
        _warn_fallback(exc)
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    return LoraTensors(_cast(canonical_tensors(load_file(path), family.name, metadata), dtype),
                   None, None)


def named_source(source: Any, kwargs: dict[str, Any]) -> Any:
    """The file ``source`` names with diffusers' keyword arguments: a folder or a Hub
    repository and ``weight_name``/``subfolder``/``revision``. Other arguments are refused."""
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


def _cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """``tensors`` with their factors in ``dtype`` (None: as they are)."""
    return tensors if dtype is None else cast_factors(tensors, dtype)


def clear_lora_cache() -> None:
    """Close this process's default client (its tables and mappings go with it).

    The LoRAs themselves live in the daemon, shared by every worker: evicting them is an
    operator's decision (``loracache evict``/``clear``), not a worker's.
    """
    global _default_client
    with _default_lock:
        if _default_client is not None:
            _default_client.close()
            _default_client = None


_default_client: LoraCacheClient | None = None
_default_lock = threading.Lock()
_warned_fallback = False


def shared_client() -> LoraCacheClient:
    """This process's client on the default socket, made on first use (again after failing)."""
    global _default_client
    with _default_lock:
        if _default_client is None or _default_client.closed:
            _default_client = LoraCacheClient(connect_timeout=DEFAULT_CONNECT_TIMEOUT)
        return _default_client


def _warn_fallback(exc: LoraCacheError) -> None:
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        log.warning("loading LoRAs in this process, without sharing: %s", exc.message)
