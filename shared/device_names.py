"""How devices are named, in one place for the configuration, the server, the service and the
client: ``cpu``, or ``cuda:<uuid>`` with the UUID as ``nvidia-smi -L`` prints it (``GPU-...``,
or ``MIG-...`` for a MIG instance). Configuration and flags may also select devices with
``all``, ``cuda`` (every GPU) and ``cuda:<index>`` (an ordinal of the daemon's process).
"""

from __future__ import annotations

import re

UUID = r"(?:GPU|MIG)-[0-9a-fA-F-]+"
BARE_UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F-]+"  # as torch prints it
SELECTOR = re.compile(rf"all|cpu|cuda(?::(?:\d+|{UUID}|{BARE_UUID}))?")  # what `devices` takes
NAME = re.compile(rf"cpu|cuda:{UUID}")  # what the wire and the client use


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


def is_selector(text: str) -> bool:
    return SELECTOR.fullmatch(text) is not None


def is_name(text: str) -> bool:
    return NAME.fullmatch(text) is not None


def selects(selector: str, name: str, index: int | None = None) -> bool:
    """Whether ``selector`` picks the device named ``name`` (``index``: its ordinal in this
    process, for GPUs)."""
    if selector == "all" or selector == name:
        return True
    if name == "cpu" or selector == "cpu":
        return False
    return (selector == "cuda" or (index is not None and selector == f"cuda:{index}")
            or same_device(selector, name))
