"""``loracache doctor``: run in a worker's environment (its user, container, GPUs), it checks
what sharing needs there and prints the fix for each failure. Exit 0 when all hold, else 1.

The checks, in order (a failed one stops those that need it):

1. the daemon's socket exists and this user may open it;
2. the daemon answers (and which torch it runs);
3. this process's torch can open the daemon's CUDA IPC handles (when it serves GPUs);
4. per device the daemon serves: a GPU is visible here by its UUID (a worker that sees some of
   the daemon's GPUs skips the others: it claimed its own), and a real test lease
   (``probe``) maps, holds the bytes the daemon wrote, and goes back. Mapping needs the
   daemon's shared-memory files (CPU entries; CUDA reference counters) to be visible and
   writable here: the same /dev/shm (IPC namespace) and membership of the daemon's group.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from loracache.shared.errors import ErrorCode, LoraCacheError
from loracache.shared.ipc_compat import check_importer, torch_release

from .client import LoraCacheClient
from .socket_access import unreachable

CONNECT_TIMEOUT = 5.0


@dataclasses.dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    skipped: bool = False  # nothing to check from here; neither passed nor failed

    def print(self) -> None:
        mark = "skip" if self.skipped else "ok  " if self.ok else "FAIL"
        print(f"{mark}  {self.name}: {self.detail}")
        if not self.ok and self.fix:
            print(f"      fix: {self.fix}")


def run(socket_path: Path) -> int:
    checks: list[Check] = []
    for check in _checks(socket_path):
        check.print()
        checks.append(check)
    failed = [c for c in checks if not c.ok]
    skipped = sum(c.skipped for c in checks)
    print(f"{len(checks) - len(failed) - skipped} of {len(checks) - skipped} checks passed"
          + (f" ({skipped} skipped)" if skipped else "")
          + ("" if not failed else "; sharing will not work from here until the fixes above "
             "are made (workers fall back to loading LoRAs themselves)"))
    return 1 if failed else 0


def _checks(socket_path: Path):
    yield (socket_check := _socket(socket_path))
    if not socket_check.ok:
        return
    try:
        client = LoraCacheClient(socket_path, connect_timeout=CONNECT_TIMEOUT, heartbeat=False)
    except LoraCacheError as exc:
        yield Check("daemon", False, exc.message,
                    "start it (`systemctl start loracache`, or `loracache serve`) and check its "
                    "log (`journalctl -u loracache`)")
        return
    with client:
        yield Check("daemon", True, f"instance {client.instance} serves "
                    f"{', '.join(client.devices)} (torch {client.daemon_torch or 'unknown'})")
        if any(device != "cpu" for device in client.devices):
            yield _torch_check(client.daemon_torch)
        visibility, usable = _visibility(client.devices, _local_index)
        yield from visibility
        for device in usable:
            yield _probe(client, device)


def _socket(path: Path) -> Check:
    problem = unreachable(path)
    if problem is None:
        return Check("socket", True, str(path))
    return Check("socket", False, problem.why, problem.fix or (
        "start the daemon, or point LORACACHE_SOCKET (or --socket) at its socket; in a "
        "container, mount the daemon's socket directory (/run/loracache)"))


def _torch_check(daemon_torch: str) -> Check:
    name = "torch"
    try:
        check_importer(daemon_torch, torch_release())
    except LoraCacheError as exc:
        return Check(name, False, exc.message.split("; supported")[0],
                     "install a torch here whose IPC handles match the daemon's (see the "
                     "README's supported releases)")
    return Check(name, True, f"{torch_release() or 'unknown'} here opens the handles of the "
                 f"daemon's {daemon_torch or 'unknown'}")


def _visibility(devices: Sequence[str], local_index: Callable[[str], int | None]
                ) -> tuple[list[Check], list[str]]:
    """A check per GPU the daemon serves, and the devices to test a lease on: the CPU and the
    GPUs seen here. A worker that sees some GPUs (it claimed one of several, as a pod or
    CUDA_VISIBLE_DEVICES does) is not failed for the others: it never asks for them, and the
    workers that see them check them. Seeing none fails."""
    gpus = {device: local_index(device.removeprefix("cuda:")) for device in devices
            if device != "cpu"}
    seen = [device for device in devices if device == "cpu" or gpus.get(device) is not None]
    if gpus and all(index is None for index in gpus.values()):
        return [Check(device, False, "this process does not see that GPU",
                      "make it visible to the worker: CUDA_VISIBLE_DEVICES (by index or UUID), "
                      "or the container's GPUs (--gpus, NVIDIA_VISIBLE_DEVICES)")
                for device in gpus], seen
    return [Check(device, True, f"visible here as cuda:{index}") if index is not None
            else Check(device, True, "not visible here, so not used by this worker (workers "
                       "that see it check it)", skipped=True)
            for device, index in gpus.items()], seen


def _local_index(uuid: str) -> int | None:
    """This process's ordinal for the GPU ``uuid``, or None where it does not see it."""
    from loracache.shared.transport.cuda_ipc import local_index

    try:
        return local_index(uuid)
    except LoraCacheError:
        return None


def _probe(client: LoraCacheClient, device: str) -> Check:
    from loracache.shared.transport import probe_pattern

    name = f"{device} test lease"
    started = time.monotonic()
    try:
        lease = client.probe(device)
    except LoraCacheError as exc:
        fix = "" if exc.code is ErrorCode.MAPPING_FAILED else "see the daemon's log"
        return Check(name, False, exc.message, fix)
    try:
        exact = bool((lease.tensors["probe"].cpu() == probe_pattern()).all())
    finally:
        lease.release()
    if not exact:
        return Check(name, False, "mapped, but the bytes differ from what the daemon wrote",
                     "report this with `loracache stats --json` and the daemon's log")
    return Check(name, True, f"mapped, read and released in "
                 f"{(time.monotonic() - started) * 1000:.1f} ms")
