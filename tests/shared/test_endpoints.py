"""Where the daemon listens: the socket path rules and the ZeroMQ endpoint."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from loracache.shared import endpoints
from loracache.shared.endpoints import MAX_IPC_PATH, default_socket_path, endpoint


def test_endpoint_of_an_absolute_path() -> None:
    assert endpoint("/run/loracache/daemon.sock") == "ipc:///run/loracache/daemon.sock"
    assert endpoint(Path("/tmp/x.sock")) == "ipc:///tmp/x.sock"


def test_endpoint_of_a_relative_path_is_absolute(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert endpoint("d.sock") == f"ipc://{os.getcwd()}/d.sock"


def test_path_of_107_bytes_is_accepted() -> None:
    path = "/" + "a" * (MAX_IPC_PATH - 1)
    assert MAX_IPC_PATH == 107
    assert endpoint(path) == f"ipc://{path}"


def test_path_of_108_bytes_is_refused() -> None:
    with pytest.raises(ValueError, match="longer than 107 bytes"):
        endpoint("/" + "a" * MAX_IPC_PATH)


def test_limit_counts_bytes_not_characters() -> None:
    path = "/" + "é" * 60  # 61 characters, 121 bytes
    with pytest.raises(ValueError):
        endpoint(path)


def test_environment_variable_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LORACACHE_SOCKET", "/somewhere/else.sock")
    monkeypatch.setattr(endpoints, "SYSTEM_SOCKET", _existing(tmp_path / "system.sock"))
    assert default_socket_path() == Path("/somewhere/else.sock")


def test_system_socket_when_it_exists(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("LORACACHE_SOCKET", raising=False)
    system = _existing(tmp_path / "system.sock")
    monkeypatch.setattr(endpoints, "SYSTEM_SOCKET", system)
    assert default_socket_path() == system


@pytest.mark.parametrize("value", [None, ""], ids=["unset", "empty"])
def test_per_user_socket_otherwise(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                   value: str | None) -> None:
    if value is None:
        monkeypatch.delenv("LORACACHE_SOCKET", raising=False)
    else:
        monkeypatch.setenv("LORACACHE_SOCKET", value)
    monkeypatch.setattr(endpoints, "SYSTEM_SOCKET", tmp_path / "missing.sock")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    expected = tmp_path / "run" / f"loracache-{os.getuid()}" / "daemon.sock"
    assert default_socket_path() == expected


def test_per_user_socket_without_xdg_runtime_dir(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    monkeypatch.delenv("LORACACHE_SOCKET", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # forget the cached temp dir
    monkeypatch.setattr(endpoints, "SYSTEM_SOCKET", tmp_path / "missing.sock")
    assert default_socket_path() == tmp_path / f"loracache-{os.getuid()}" / "daemon.sock"


def _existing(path: Path) -> Path:
    path.touch()
    return path
