"""Whether this user may open the daemon's socket, and if not, what stops it. The daemon (and
systemd) make the socket 0660 in a 0750 directory, both in group loracache, so a user outside
the group cannot even tell whether the socket exists: the directory is what refuses it."""

from __future__ import annotations

import dataclasses
import grp
import os
import pwd
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Unreachable:
    why: str
    group: str | None = None  # the group whose members would get through, where that is the fix


def unreachable(socket: Path) -> Unreachable | None:
    """What keeps this user from the socket at ``socket``: a directory on the way it may not
    enter, no socket, or a socket it may not read and write. None when nothing does."""
    socket = socket.absolute()
    for path in (*reversed(socket.parents), socket):  # from / down, as the kernel walks it
        try:
            gid = path.stat().st_gid
        except FileNotFoundError:
            return Unreachable(f"the socket {socket} does not exist")
        needed = os.R_OK | os.W_OK if path == socket else os.X_OK
        if not os.access(path, needed):
            group = group_name(gid)
            return Unreachable(f"{path} is not open to user {user_name()} (it belongs to group "
                               f"{group})", group)
    return None


def user_name() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
