"""What the daemon's in-process tests share."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import pytest

from loracache.shared.transport.shm import ShmTransport
from tests.daemon.service_node import Node, node_factory


@pytest.fixture
def transport() -> Iterator[ShmTransport]:
    """The real shared-memory transport, in a /dev/shm directory of the test's own."""
    root = Path(tempfile.mkdtemp(prefix="lc-unit-", dir="/dev/shm"))
    yield ShmTransport(root / "cpu")
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def make_node(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    """Services configured by settings (as load_config takes them), closed after the test."""
    yield from node_factory(tmp_path)
