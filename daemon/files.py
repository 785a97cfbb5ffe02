"""Which files the daemon may read, and what identifies a file's contents cheaply.

Only regular ``.safetensors`` files whose resolved path lies under an allowed root are read.
A file is identified by (path, device, inode, size, mtime_ns): rewriting it makes a new entry.
"""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path
from typing import NamedTuple

from loracache.shared.errors import ErrorCode, LoraCacheError

SUFFIX = ".safetensors"


class FileIdentity(NamedTuple):
    """A tuple, so that hashing it (every hit does) costs no Python code."""

    path: str  # resolved, absolute
    st_dev: int
    st_ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: str, st: os.stat_result) -> "FileIdentity":
        return cls(path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    @property
    def token(self) -> str:
        """What clients compare to tell whether a restarted daemon serves the same file."""
        return f"{self.st_dev}:{self.st_ino}:{self.size}:{self.mtime_ns}"


def confine(requested: str, roots: tuple[Path, ...]) -> str:
    """Resolve ``requested`` (absolute, or relative to a root) to a real path under a root.

    The file need not exist (``evict`` names files that may be gone).
    """
    if not requested or "\0" in requested:
        raise LoraCacheError(ErrorCode.BAD_REQUEST, "path must be a non-empty string without NUL")
    candidates = [requested] if os.path.isabs(requested) else [str(r / requested) for r in roots]
    resolved = [os.path.realpath(c) for c in candidates]
    inside = [p for p in resolved if any(_is_under(p, root) for root in roots)]
    if not inside:
        raise LoraCacheError(ErrorCode.FORBIDDEN_PATH,
                             f"{requested} resolves to {resolved[0]}, outside the allowed LoRA "
                             f"directories ({', '.join(map(str, roots))}); put the file under "
                             "one of them or add its directory with --lora-dir")
    return next((p for p in inside if os.path.exists(p)), inside[0])


def identify(requested: str, roots: tuple[Path, ...]) -> FileIdentity:
    """Confine ``requested`` and stat it; refuse anything but a regular .safetensors file."""
    path = confine(requested, roots)
    if not path.endswith(SUFFIX):
        raise LoraCacheError(ErrorCode.FORBIDDEN_PATH,
                             f"{path} is not a {SUFFIX} file; the daemon reads nothing else")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise LoraCacheError(ErrorCode.NOT_FOUND, f"{path} does not exist") from None
    except OSError as exc:
        raise LoraCacheError(ErrorCode.FORBIDDEN_PATH,
                             f"cannot stat {path}: {exc.strerror}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise LoraCacheError(ErrorCode.FORBIDDEN_PATH, f"{path} is not a regular file")
    return FileIdentity.of(path, st)


def open_identified(identity: FileIdentity) -> io.FileIO:
    """Open the file for reading and check it is still the one that was identified.

    O_NONBLOCK keeps a FIFO swapped in after the stat from hanging the loader thread.
    """
    try:
        fd = os.open(identity.path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise LoraCacheError(ErrorCode.NOT_FOUND,
                             f"cannot open {identity.path}: {exc.strerror}") from exc
    f = io.FileIO(fd, "rb")
    if FileIdentity.of(identity.path, os.fstat(fd)) != identity:
        f.close()
        raise LoraCacheError(ErrorCode.NOT_FOUND,
                             f"{identity.path} changed while it was being opened; retry")
    return f


def _is_under(path: str, root: Path) -> bool:
    return path == str(root) or path.startswith(str(root).rstrip("/") + "/")
