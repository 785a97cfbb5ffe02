"""How devices are named: ``cpu``, or ``cuda:<uuid>`` with the UUID as ``nvidia-smi -L`` prints
it (``GPU-...``, or ``MIG-...`` for a MIG instance)."""

from __future__ import annotations


def bare_uuid(uuid: str) -> str:
    """A device UUID without its ``GPU-``/``MIG-`` prefix. CUDA reports both kinds bare and
    only NVML tells them apart, so a process without nvidia-ml-py may call a MIG instance
    ``GPU-...``: names are compared bare."""
    return uuid.removeprefix("GPU-").removeprefix("MIG-")


def same_device(a: str, b: str) -> bool:
    """Whether two device names (``cpu``, ``cuda:<uuid>``) name the same device."""
    if a == b:
        return True
    return (a.startswith("cuda:") and b.startswith("cuda:")
            and bare_uuid(a.removeprefix("cuda:")) == bare_uuid(b.removeprefix("cuda:")))
