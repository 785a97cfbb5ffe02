"""What keeps a user from the daemon's socket, told as the user meets it: each case is looked
at from a process of user ``nobody`` (the tests run as root, whom permissions never stop)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.support import CLI_AS_USER, REPO

NOBODY = 65534
OTHER_GROUP = 12345  # a group with no name, that nobody is not in

# As root: import, open the daemon's directory to nobody only by effective ids (seteuid), then
# become nobody in group argv[2] and look at each path of argv[3:].
LOOK = """
import json, os, sys
from pathlib import Path
from loracache.client import LoraCacheClient, LoraCacheError
from loracache.client.socket_access import unreachable
from loracache.shared import endpoints
from tests.support import become

def look(path):
    problem = unreachable(Path(path))
    return None if problem is None else {"why": problem.why, "fix": problem.fix}

root, group, paths = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
os.setgroups([])
os.setegid(65534)
os.seteuid(65534)
by_effective_ids = look(root / "closed" / "s.sock")
os.seteuid(0)
os.setegid(0)
become(f"65534:{group}")
seen = {path: look(path) for path in paths}
endpoints.SYSTEM_SOCKET = root / "closed" / "daemon.sock"  # the service's, in its 0750 dir
try:
    LoraCacheClient(connect_timeout=1)
    default = None
except LoraCacheError as exc:
    default = {"code": exc.code.name, "message": exc.message}
print(json.dumps({"seen": seen, "effective": by_effective_ids, "default": default,
                  "fallback": str(endpoints.fallback_socket_path())}))
"""


def bound_socket(path: Path, mode: int, gid: int) -> None:
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.close()  # the file stays: enough to look at its permissions
    os.chown(path, 0, gid)
    path.chmod(mode)


@pytest.fixture(scope="module")
def tree():
    """``open/`` (0710, group root) with a socket 0620: the least a group member needs;
    ``private/`` (0700); ``closed/`` (0750, another group) with a socket; ``file`` (not a
    directory); ``loop`` (a link to itself); ``link.sock`` (a link into ``closed/``)."""
    root = Path(tempfile.mkdtemp(prefix="lc-access-", dir="/tmp"))
    root.chmod(0o755)
    for name, mode, gid in (("open", 0o710, 0), ("private", 0o700, 0),
                            ("closed", 0o750, OTHER_GROUP)):
        (root / name).mkdir()
        os.chown(root / name, 0, gid)
        (root / name).chmod(mode)
    bound_socket(root / "open" / "s.sock", 0o620, 0)
    bound_socket(root / "closed" / "s.sock", 0o660, OTHER_GROUP)
    (root / "file").write_text("")
    (root / "loop").symlink_to(root / "loop")
    (root / "link.sock").symlink_to(root / "closed" / "s.sock")
    yield root
    shutil.rmtree(root)


def look(root: Path, group: int, *names: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", LOOK, str(root), str(group), *(str(root / n) for n in names)],
        capture_output=True, text=True, timeout=120,
        env={k: v for k, v in os.environ.items() if not k.startswith("LORACACHE_")}
        | {"PYTHONPATH": str(REPO), "HOME": "/tmp"})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_what_a_group_member_meets(tree):
    """nobody in group root: the socket is reachable with search (not read) on the directory
    and write (not read) on the socket; everything else is told, never raised."""
    names = ("open/s.sock", "open/none.sock", "private/s.sock", "file/s.sock", "loop",
             "link.sock", "open")
    result = look(tree, 0, *names)
    seen = {name: result["seen"][str(tree / name)] for name in names}
    assert seen["open/s.sock"] is None
    assert seen["open/none.sock"]["why"] == f"the socket {tree}/open/none.sock does not exist"
    assert seen["private/s.sock"]["why"] == (f"{tree}/private is not open to user nobody (it "
                                             "belongs to group root, mode 0700)")
    assert "its group may not use it either" in seen["private/s.sock"]["fix"]  # not usermod
    assert seen["file/s.sock"]["why"] == (f"the socket {tree}/file/s.sock does not exist "
                                          f"({tree}/file is not a directory)")
    assert seen["loop"]["why"].startswith(f"cannot reach the socket {tree}/loop: ")
    # a link is followed: the directory named is the one that refuses, where the link points
    assert seen["link.sock"]["why"].startswith(f"{tree}/closed is not open to user nobody (it "
                                               f"belongs to group {OTHER_GROUP}, mode 0750)")
    assert f"usermod -aG {OTHER_GROUP} nobody" in seen["link.sock"]["fix"]
    assert seen["open"]["why"] == f"{tree}/open is not a socket"  # a directory named instead


def test_a_process_that_switched_its_effective_user_is_told_too(tree):
    result = look(tree, 0)
    assert result["effective"]["why"].startswith(f"{tree}/closed is not open to user nobody")


def test_the_default_socket_of_a_service_whose_directory_refuses_the_user(tree):
    """With no socket configured, the service's socket is chosen though this user cannot see
    into its directory, and the client says why it cannot connect (workers then fall back)."""
    result = look(tree, NOBODY)
    assert result["fallback"] == str(tree / "closed" / "daemon.sock")
    assert result["default"]["code"] == "DAEMON_UNAVAILABLE"
    message = result["default"]["message"]
    assert f"{tree}/closed is not open to user nobody" in message
    assert f"To use it: add the user to group {OTHER_GROUP}" in message  # not a generic hint


def test_a_daemon_started_where_its_user_may_not_make_the_socket_says_so(tree):
    """``loracache serve`` by a user outside the service's group, on the service's socket."""
    socket = tree / "closed" / "mine" / "daemon.sock"
    done = subprocess.run(
        [sys.executable, "-c", CLI_AS_USER, f"{NOBODY}:{NOBODY}", "serve", "--socket",
         str(socket), "--devices", "cpu", "--lora-dir", str(tree / "open")],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO), "HOME": "/tmp"})
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert (f"the socket {socket}: this user may not create or enter {socket.parent}"
            in done.stderr)
