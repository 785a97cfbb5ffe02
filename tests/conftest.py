from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.support import Daemon


@pytest.fixture
def lora_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "loras"
    directory.mkdir()
    return directory


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    """A directory for a daemon's downloads (``--cache-dir``)."""
    directory = tmp_path / "cache"
    directory.mkdir()
    return directory


@pytest.fixture
def start_daemon(lora_dir: Path) -> Iterator[Callable[..., Daemon]]:
    """Start real daemon processes (flags as arguments); all are stopped after the test."""
    daemons: list[Daemon] = []

    def start(*args: str, **kwargs) -> Daemon:
        daemon = Daemon(lora_dir, *args, **kwargs)
        daemons.append(daemon)
        return daemon

    yield start
    for daemon in daemons:
        daemon.cleanup()


@pytest.fixture
def daemon(start_daemon: Callable[..., Daemon]) -> Daemon:
    return start_daemon("--max-bytes", "1GiB")


@pytest.fixture(scope="module")
def module_lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA directory shared by a module's tests."""
    return tmp_path_factory.mktemp("loras")


@pytest.fixture(scope="module")
def module_daemon(module_lora_dir: Path) -> Iterator[Daemon]:
    """One real daemon for a module's tests (each releases every lease it takes)."""
    daemon = Daemon(module_lora_dir, "--max-bytes", "1GiB")
    yield daemon
    daemon.cleanup()


@pytest.fixture
def locked_socket(daemon: Daemon) -> Iterator[Path]:
    """The daemon's socket reached through a directory of mode 0750 in root's group, as the
    daemon and systemd make /run/loracache: a user outside the group cannot even stat it."""
    home = Path(tempfile.mkdtemp(prefix="lc-locked-", dir="/tmp"))  # 0755, unlike tmp_path's
    home.chmod(0o755)
    (home / "loracache").mkdir(mode=0o750)
    (home / "loracache" / "daemon.sock").symlink_to(daemon.socket)
    yield home / "loracache" / "daemon.sock"
    shutil.rmtree(home)
