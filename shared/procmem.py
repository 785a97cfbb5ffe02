"""Memory accounting from /proc: PSS, which splits each shared page among the processes that
map it (RSS counts a shared page in full in every process, so it cannot show sharing)."""

from __future__ import annotations

import os


def pss_bytes(pid: int | None = None) -> int:
    """Total PSS of process ``pid`` (default: this one), from ``/proc/PID/smaps_rollup``."""
    return _field_sum(f"/proc/{pid or os.getpid()}/smaps_rollup", lambda _: True, "Pss:")


def mapping_pss_bytes(path_part: str, pid: int | None = None) -> int:
    """PSS of the mappings of ``pid`` whose file path contains ``path_part``."""
    return _field_sum(f"/proc/{pid or os.getpid()}/smaps", lambda name: path_part in name, "Pss:")


def _field_sum(smaps: str, keep_mapping, field: str) -> int:
    total, keep = 0, False
    with open(smaps) as f:
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):  # a mapping's header line
                parts = line.split(None, 5)
                keep = keep_mapping(parts[5].strip() if len(parts) == 6 else "")
            elif head == field and keep:
                total += int(line.split()[1]) * 1024
    return total


def anonymous_bytes(pid: int | None = None) -> int:
    """Memory of ``pid`` backed by no file: a private copy of a LoRA lands here, a mapping of
    the daemon's shared-memory file does not (even when no other process maps it yet)."""
    return _field_sum(f"/proc/{pid or os.getpid()}/smaps_rollup", lambda _: True, "Anonymous:")
