"""Path hardening through the live daemon: only regular ``.safetensors`` files whose resolved
path lies under a configured root are read; everything else is refused at once, with a reason.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest
import torch

from loracache.client import ErrorCode, LoraCacheClient, LoraCacheError
from tests.support import Daemon, write_lora

QUICK = 5.0  # seconds: a refusal is a stat, never a wait
OUTSIDE = "outside the allowed LoRA directories"
NOT_REGULAR = "is not a regular file"
NOT_SAFETENSORS = "is not a .safetensors file"


def refused(client: LoraCacheClient, path: str | Path, code: ErrorCode,
            *expected: str) -> LoraCacheError:
    """Acquire ``path``: it must fail quickly with ``code`` and a message holding ``expected``."""
    started = time.monotonic()
    with pytest.raises(LoraCacheError) as info:
        client.acquire(str(path)).release()
    elapsed = time.monotonic() - started
    error = info.value
    assert error.code is code, (str(path)[:200], error)
    for text in expected:
        assert text in error.message, (str(path)[:200], text, error.message[:500])
    assert elapsed < QUICK, f"{str(path)[:200]}: refused after {elapsed:.1f} s"
    return error


def loads(client: LoraCacheClient, path: str | Path, expected: torch.Tensor) -> str:
    """Acquire ``path`` and check its tensor ``w``; returns the entry's resolved path."""
    with client.acquire(str(path)) as lease:
        assert torch.equal(lease.tensors["w"], expected)
        return lease.entry.path


def assert_healthy(daemon: Daemon, lora_dir: Path) -> None:
    """The daemon still serves a valid file, and holds no lease afterwards."""
    good = torch.arange(6.0)
    write_lora(lora_dir / "healthy.safetensors", {"w": good})
    with daemon.client(heartbeat=False) as client:
        loads(client, "healthy.safetensors", good)
    stats = daemon.stats()
    assert stats.leases == 0
    assert daemon.cpu_stats().reserved == 0


def swap_symlink(link: Path, target: Path | str) -> None:
    """Atomically make ``link`` a symlink to ``target`` (replacing what was there)."""
    temporary = link.with_name(link.name + ".new")
    temporary.symlink_to(target)
    os.replace(temporary, link)


@pytest.fixture
def daemon(start_daemon) -> Daemon:
    return start_daemon("--max-bytes", "256MiB")


# ----------------------------------------------------------------------------------- symlinks


def test_symlinks_are_judged_by_their_target(daemon: Daemon, lora_dir: Path,
                                             tmp_path: Path) -> None:
    outside_dir = tmp_path / "outside"
    outside = write_lora(outside_dir / "x.safetensors", {"w": torch.ones(4)})
    inside = torch.arange(4.0)
    real = write_lora(lora_dir / "real.safetensors", {"w": inside})
    (lora_dir / "sub").mkdir()
    (lora_dir / "escape.safetensors").symlink_to(outside)
    (lora_dir / "hop.safetensors").symlink_to(lora_dir / "escape.safetensors")  # chain out
    (lora_dir / "outdir").symlink_to(outside_dir)  # a directory link leading out
    (lora_dir / "dangling-out.safetensors").symlink_to(outside_dir / "gone.safetensors")
    (lora_dir / "dangling-in.safetensors").symlink_to(lora_dir / "gone.safetensors")
    (lora_dir / "loop.safetensors").symlink_to(lora_dir / "loop.safetensors")
    (lora_dir / "alias.safetensors").symlink_to(real)  # absolute target inside
    (lora_dir / "sub" / "rel.safetensors").symlink_to("../real.safetensors")  # relative target
    (lora_dir / "subdir-link").symlink_to(lora_dir / "sub")  # a directory link inside
    with daemon.client() as client:
        error = refused(client, "escape.safetensors", ErrorCode.FORBIDDEN_PATH, OUTSIDE,
                        str(outside))
        assert "--lora-dir" in error.message  # it says how to allow a directory
        refused(client, "hop.safetensors", ErrorCode.FORBIDDEN_PATH, OUTSIDE, str(outside))
        refused(client, "outdir/x.safetensors", ErrorCode.FORBIDDEN_PATH, OUTSIDE)
        refused(client, lora_dir / "outdir" / "x.safetensors", ErrorCode.FORBIDDEN_PATH, OUTSIDE)
        refused(client, "dangling-out.safetensors", ErrorCode.FORBIDDEN_PATH, OUTSIDE)
        refused(client, "dangling-in.safetensors", ErrorCode.NOT_FOUND, "does not exist",
                str(lora_dir / "gone.safetensors"))
        refused(client, "loop.safetensors", ErrorCode.FORBIDDEN_PATH, "cannot stat",
                "loop.safetensors")
        refused(client, "missing.safetensors", ErrorCode.NOT_FOUND, "does not exist")

        resolved = str(real.resolve())
        assert loads(client, "alias.safetensors", inside) == resolved
        assert loads(client, "sub/rel.safetensors", inside) == resolved
        assert loads(client, "subdir-link/rel.safetensors", inside) == resolved
        assert loads(client, "real.safetensors", inside) == resolved
        # One file, one entry, however it was named.
        assert [e.path for e in client.list()] == [resolved]
        assert daemon.cpu_stats().entries == 1
    assert_healthy(daemon, lora_dir)


# ---------------------------------------------------------------------------------- traversal


def test_paths_leading_outside_every_root_are_refused(daemon: Daemon, lora_dir: Path,
                                                      tmp_path: Path) -> None:
    """``lora_dir`` is ``<tmp>/loras``; a sibling ``<tmp>/loras-evil`` shares its prefix."""
    outside = write_lora(tmp_path / "outside.safetensors", {"w": torch.ones(4)})
    sibling = write_lora(tmp_path / "loras-evil" / "a.safetensors", {"w": torch.ones(4)})
    inside = torch.arange(3.0)
    write_lora(lora_dir / "inside.safetensors", {"w": inside})
    (lora_dir / "sub").mkdir()
    with daemon.client() as client:
        for path in ["../outside.safetensors",
                     "./../outside.safetensors",
                     "sub/../../outside.safetensors",
                     "nonexistent/../../outside.safetensors",
                     "../loras-evil/a.safetensors",
                     "sub/../../loras-evil/a.safetensors",
                     str(outside),
                     str(sibling),
                     f"{lora_dir}/../loras-evil/a.safetensors",
                     f"{lora_dir}-evil/a.safetensors",
                     "/" + "../" * 20 + str(outside).lstrip("/"),
                     "/etc/passwd"]:
            refused(client, path, ErrorCode.FORBIDDEN_PATH, OUTSIDE)
        refused(client, "../outside.safetensors", ErrorCode.FORBIDDEN_PATH, str(outside))
        refused(client, str(sibling), ErrorCode.FORBIDDEN_PATH, str(sibling), str(lora_dir))
        # Detours that end inside the root are fine.
        for path in ["sub/../inside.safetensors", "./inside.safetensors",
                     f"{lora_dir}/../loras/inside.safetensors",
                     f"{lora_dir}/sub/../inside.safetensors"]:
            loads(client, path, inside)
    assert_healthy(daemon, lora_dir)


# ---------------------------------------------------------------------- what is not a LoRA file


def test_directories_other_suffixes_and_bad_strings_are_refused(daemon: Daemon,
                                                                lora_dir: Path) -> None:
    (lora_dir / "d.safetensors").mkdir()
    content = write_lora(lora_dir / "valid.safetensors", {"w": torch.ones(2)}).read_bytes()
    for name in ["a.bin", "a.safetensors.bak", "a.safetensors~", "safetensors", "a.pt"]:
        (lora_dir / name).write_bytes(content)
    with daemon.client() as client:
        refused(client, "d.safetensors", ErrorCode.FORBIDDEN_PATH, NOT_REGULAR, "d.safetensors")
        refused(client, lora_dir / "d.safetensors", ErrorCode.FORBIDDEN_PATH, NOT_REGULAR)
        for name in ["a.bin", "a.safetensors.bak", "a.safetensors~", "safetensors", "a.pt"]:
            refused(client, name, ErrorCode.FORBIDDEN_PATH, NOT_SAFETENSORS, name)
        refused(client, ".", ErrorCode.FORBIDDEN_PATH, NOT_SAFETENSORS)
        refused(client, str(lora_dir), ErrorCode.FORBIDDEN_PATH, NOT_SAFETENSORS)
        refused(client, "missing.safetensors", ErrorCode.NOT_FOUND, "does not exist",
                "missing.safetensors")
        refused(client, "valid.safetensors\0.txt", ErrorCode.BAD_REQUEST, "NUL")
        refused(client, "\0", ErrorCode.BAD_REQUEST, "NUL")
    assert_healthy(daemon, lora_dir)


def test_over_long_path_under_the_message_limit_is_forbidden(daemon: Daemon,
                                                             lora_dir: Path) -> None:
    """Longer than PATH_MAX (4096) but a legal request string: stat fails, FORBIDDEN_PATH."""
    components = "sub/" * 1050 + "a.safetensors"  # 4213 characters
    single = "a" * 4100 + ".safetensors"  # one over-long name
    with daemon.client() as client:
        for path in [components, single]:
            assert len(path) > 4096
            refused(client, path, ErrorCode.FORBIDDEN_PATH, "cannot stat", "File name too long")
        refused(client, "/" + components, ErrorCode.FORBIDDEN_PATH, OUTSIDE)
    assert_healthy(daemon, lora_dir)


def test_path_longer_than_the_message_limit_gets_a_quick_bad_request(daemon: Daemon,
                                                                     lora_dir: Path) -> None:
    """A path longer than the protocol's string limit (8 KiB) must get an answer, not leave the
    client waiting for its request timeout."""
    path = "a" * 10_000 + ".safetensors"
    with daemon.client(request_timeout=QUICK + 2) as client:
        refused(client, path, ErrorCode.BAD_REQUEST)
    assert_healthy(daemon, lora_dir)


# ---------------------------------------------------------------------------------------- FIFO


def test_fifo_is_refused_without_blocking_the_loaders(daemon: Daemon, lora_dir: Path) -> None:
    """A FIFO nobody writes to: opening it for reading would block. More refusals than the
    daemon has loader threads (4), alongside valid acquires that must all succeed."""
    os.mkfifo(lora_dir / "f.safetensors")
    (lora_dir / "to-fifo.safetensors").symlink_to(lora_dir / "f.safetensors")
    good = torch.arange(8.0)
    write_lora(lora_dir / "good.safetensors", {"w": good})
    jobs = ["f.safetensors", "to-fifo.safetensors", str(lora_dir / "f.safetensors")] * 3
    jobs += ["good.safetensors"] * 4
    with daemon.client() as client:

        def run(path: str) -> LoraCacheError | None:
            if path == "good.safetensors":
                loads(client, path, good)
                return None
            return refused(client, path, ErrorCode.FORBIDDEN_PATH, NOT_REGULAR, "f.safetensors")

        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
            outcomes = list(pool.map(run, jobs, timeout=60))
        assert sum(o is not None for o in outcomes) == 9
        for _ in range(6):  # and one after the other
            refused(client, "f.safetensors", ErrorCode.FORBIDDEN_PATH, NOT_REGULAR)
        loads(client, "good.safetensors", good)
    assert_healthy(daemon, lora_dir)


# ------------------------------------------------------------------------------- device files


@contextlib.contextmanager
def scratch_in_dev_shm() -> Iterator[Path]:
    """A private directory under /dev/shm, that is under the root /dev."""
    directory = Path(tempfile.mkdtemp(prefix="lc-paths-", dir="/dev/shm"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory)


def test_device_files_under_a_root_are_refused(start_daemon, lora_dir: Path,
                                               tmp_path: Path) -> None:
    """With /dev as a second root, devices and FIFOs there are still never opened."""
    daemon = start_daemon("--max-bytes", "256MiB", "--lora-dir", "/dev")
    (lora_dir / "null.safetensors").symlink_to("/dev/null")
    outside = write_lora(tmp_path / "outside.safetensors", {"w": torch.ones(2)})
    with scratch_in_dev_shm() as shm, daemon.client() as client:
        os.mkfifo(shm / "fifo.safetensors")
        specials = [shm / "fifo.safetensors"]
        try:  # a character device named like a LoRA (needs CAP_MKNOD; /dev/zero never ends)
            os.mknod(shm / "zero.safetensors", stat.S_IFCHR | 0o600, os.makedev(1, 5))
            specials.append(shm / "zero.safetensors")
        except PermissionError:
            pass
        (lora_dir / "special.safetensors").symlink_to(specials[-1])
        (shm / "escape.safetensors").symlink_to(outside)
        served = torch.arange(5.0)
        write_lora(shm / "ok.safetensors", {"w": served})

        refused(client, "null.safetensors", ErrorCode.FORBIDDEN_PATH, NOT_SAFETENSORS,
                "/dev/null")
        for device in ["/dev/null", "/dev/zero", "/dev/urandom", "/dev/shm", "null"]:
            refused(client, device, ErrorCode.FORBIDDEN_PATH, NOT_SAFETENSORS)
        for special in specials:
            refused(client, special, ErrorCode.FORBIDDEN_PATH, NOT_REGULAR, str(special))
        # Under a root by its resolved path, with the suffix, and still not a regular file.
        refused(client, "special.safetensors", ErrorCode.FORBIDDEN_PATH, NOT_REGULAR,
                str(specials[-1]))
        refused(client, shm / "escape.safetensors", ErrorCode.FORBIDDEN_PATH, OUTSIDE)
        # The second root is in effect: a regular file there loads.
        assert loads(client, shm / "ok.safetensors", served) == str(shm / "ok.safetensors")
        # The daemon's own shared-memory files are under /dev too: never served as LoRAs.
        (own,) = daemon.shm_files()
        refused(client, own, ErrorCode.FORBIDDEN_PATH, NOT_SAFETENSORS)
        (shm / "own.safetensors").symlink_to(own)
        refused(client, shm / "own.safetensors", ErrorCode.FORBIDDEN_PATH, NOT_SAFETENSORS)
        client.evict(str(shm / "ok.safetensors"))
    assert_healthy(daemon, lora_dir)


# ----------------------------------------------------------------- a file swapped for a symlink


def test_file_replaced_by_a_symlink_after_an_acquire(daemon: Daemon, lora_dir: Path,
                                                     tmp_path: Path) -> None:
    """A lease keeps its data whatever happens to the path; each later acquire follows the
    rules for what the path is now."""
    first, other, last = torch.arange(4.0), torch.arange(4.0) * 10, torch.arange(4.0) * 100
    path = write_lora(lora_dir / "a.safetensors", {"w": first})
    outside = write_lora(tmp_path / "outside.safetensors", {"w": torch.ones(4)})
    b = write_lora(lora_dir / "b.safetensors", {"w": other})
    os.mkfifo(lora_dir / "fifo.safetensors")
    with daemon.client() as client:
        held = client.acquire("a.safetensors")
        assert torch.equal(held.tensors["w"], first)

        swap_symlink(path, outside)
        refused(client, "a.safetensors", ErrorCode.FORBIDDEN_PATH, OUTSIDE, str(outside))
        assert torch.equal(held.tensors["w"], first)

        swap_symlink(path, b)
        with client.acquire("a.safetensors") as lease:
            assert torch.equal(lease.tensors["w"], other)
            assert lease.entry.path == str(b.resolve())
        assert torch.equal(held.tensors["w"], first)

        swap_symlink(path, lora_dir / "fifo.safetensors")
        refused(client, "a.safetensors", ErrorCode.FORBIDDEN_PATH, NOT_REGULAR)

        swap_symlink(path, lora_dir / "gone.safetensors")
        refused(client, "a.safetensors", ErrorCode.NOT_FOUND, "does not exist")

        path.unlink()
        write_lora(path, {"w": last})  # a regular file again, with new contents
        assert loads(client, "a.safetensors", last) == str(path.resolve())
        assert torch.equal(held.tensors["w"], first)
        assert daemon.stats().leases == 1
        held.release()
    assert_healthy(daemon, lora_dir)
