"""Whether this user may open the daemon's socket, and if not, what stops it and how to fix it.
The daemon (and systemd) make the socket 0660 in a 0750 directory, both in group loracache, so
a user outside the group cannot even tell whether the socket exists: the directory refuses it.
"""

from __future__ import annotations

import dataclasses
import grp
import os
import pwd
import stat
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Unreachable:
    why: str
    fix: str | None = None  # for permissions; None where no daemon's socket is there


def unreachable(socket: Path) -> Unreachable | None:
    """What keeps this user from connecting to ``socket``: a directory on the way it may not
    enter, no socket, or a socket it may not write. None when nothing does. Symbolic links are
    followed, so what is named is the directory that refuses, wherever the link points."""
    real = Path(os.path.realpath(socket))
    for path in (*reversed(real.parents), real):  # from / down, as the kernel walks it
        is_socket = path == real
        try:
            info = path.stat()
        except FileNotFoundError:
            return Unreachable(f"the socket {socket} does not exist")
        except OSError as exc:  # a loop of links, or a directory that changed under us
            return Unreachable(f"cannot reach the socket {socket}: {exc.strerror}")
        if not is_socket and not stat.S_ISDIR(info.st_mode):
            return Unreachable(f"the socket {socket} does not exist ({path} is not a directory)")
        if is_socket and not stat.S_ISSOCK(info.st_mode):
            return Unreachable(f"{socket} is not a socket")
        needed = os.W_OK if is_socket else os.X_OK  # connecting writes; entering searches
        if not os.access(path, needed, effective_ids=_switched_ids()):
            return _refused(path, info, is_socket)
    return None


def _switched_ids() -> bool:
    """Whether to ask by effective ids: only where they differ from the real ones (seteuid).
    Asking by them always takes faccessat2, which some container runtimes' seccomp profiles
    refuse with EPERM: every path would then look closed."""
    return ((os.geteuid(), os.getegid()) != (os.getuid(), os.getgid())
            and os.access in os.supports_effective_ids)


def _refused(path: Path, info: os.stat_result, is_socket: bool) -> Unreachable:
    group = _group_name(info.st_gid)
    why = (f"{path} is not open to user {_user_name()} (it belongs to group {group}, mode "
           f"{stat.S_IMODE(info.st_mode):04o})")
    group_may = info.st_mode & (stat.S_IWGRP if is_socket else stat.S_IXGRP)
    if group_may and info.st_gid not in {os.getegid(), *os.getgroups()}:
        return Unreachable(why, f"add the user to group {group} (`usermod -aG {group} "
                           f"{_user_name()}`, then log in again), or run the worker in that group "
                           "(in a pod: securityContext.supplementalGroups)")
    return Unreachable(why, f"its group may not use it either: open {path} to the group of the "
                       "daemon's workers (the daemon makes it 0750 and its socket 0660)")


def _user_name() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
