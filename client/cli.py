"""The ``loracache`` command: run the daemon, and look at or manage a running one."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Callable

from loracache.shared.errors import ErrorCode, LoraCacheError

from .connection import LoraCacheClient


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loracache", description=__doc__)
    parser.add_argument("--socket", help="daemon socket (default: $LORACACHE_SOCKET, the system "
                                         "socket, or the per-user one)")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the daemon in the foreground")
    from loracache.daemon.cli import add_serve_arguments  # the CLI may use both sides

    add_serve_arguments(serve)
    for name, help_text in (("stats", "per-device cache counters"), ("ls", "cached entries")):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--json", action="store_true", help="print JSON instead of a table")
    preload = commands.add_parser("preload", help="load a LoRA into the cache")
    preload.add_argument("path")
    preload.add_argument("--device", default="cpu")
    preload.add_argument("--layout", default="raw")
    preload.add_argument("--pin", action="store_true", help="keep it from eviction")
    evict = commands.add_parser("evict", help="evict the unleased entries of a file")
    evict.add_argument("path")
    commands.add_parser("clear", help="evict every unleased entry")
    commands.add_parser("ping", help="exit 0 when the daemon answers, 1 when it does not")

    args = parser.parse_args(argv)
    if args.command == "serve":
        from loracache.daemon.cli import serve as run_serve

        return run_serve(args)
    return _with_client(args, COMMANDS[args.command])


def _with_client(args: argparse.Namespace, command: Callable[[LoraCacheClient, Any], int]) -> int:
    try:
        with LoraCacheClient(args.socket, heartbeat=False) as client:
            return command(client, args)
    except LoraCacheError as exc:
        print(f"loracache: {exc}", file=sys.stderr)
        return 2 if exc.code in (ErrorCode.DAEMON_UNAVAILABLE, ErrorCode.TIMEOUT) else 1


def _stats(client: LoraCacheClient, args: argparse.Namespace) -> int:
    stats = client.stats()
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    print(f"daemon {stats['instance']} (pid {stats['pid']}), up {human_duration(stats['uptime_s'])}"
          f", {stats['sessions']} session(s), {stats['leases']} lease(s)")
    rows = [[d["device"], human_bytes(d["budget"]), human_bytes(d["used"]),
             human_bytes(d["pinned_bytes"]), d["entries"], d["leases"], d["hits"], d["misses"],
             d["loads"], d["evictions"]] for d in stats["devices"]]
    print_table(["DEVICE", "BUDGET", "USED", "PINNED", "ENTRIES", "LEASES", "HITS", "MISSES",
                 "LOADS", "EVICTIONS"], rows)
    return 0


def _ls(client: LoraCacheClient, args: argparse.Namespace) -> int:
    entries = client.list()
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    rows = [[e["path"], e["device"], e["layout"], human_bytes(e["nbytes"]), e["leases"],
             "yes" if e["pinned"] else "", human_duration(e["idle_s"])] for e in entries]
    print_table(["PATH", "DEVICE", "LAYOUT", "SIZE", "LEASES", "PINNED", "IDLE"], rows)
    return 0


def _preload(client: LoraCacheClient, args: argparse.Namespace) -> int:
    entry = client.preload(args.path, device=args.device, layout=args.layout, pin=args.pin)
    print(f"{entry['path']} on {entry['device']}: {human_bytes(entry['nbytes'])}"
          f"{', pinned' if entry['pinned'] else ''}")
    return 0


def _evict(client: LoraCacheClient, args: argparse.Namespace) -> int:
    result = client.evict(args.path)
    print(f"evicted {result['evicted']}, still leased {result['busy']}")
    return 0


def _clear(client: LoraCacheClient, args: argparse.Namespace) -> int:
    result = client.clear()
    print(f"evicted {result['evicted']}, still leased {result['busy']}")
    return 0


def _ping(client: LoraCacheClient, args: argparse.Namespace) -> int:
    started = time.monotonic()
    client.stats()
    print(f"ok: {client.socket_path} answered in {(time.monotonic() - started) * 1000:.1f} ms")
    return 0


COMMANDS: dict[str, Callable[[LoraCacheClient, Any], int]] = {
    "stats": _stats, "ls": _ls, "preload": _preload, "evict": _evict, "clear": _clear,
    "ping": _ping}


def human_bytes(n: float) -> str:
    if abs(n) < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if abs(n) < 1024 or unit == "GiB":
            break
    return f"{n:.1f} {unit}"


def human_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m{seconds % 60:02.0f}s"
    return f"{seconds // 3600:.0f}h{seconds % 3600 // 60:02.0f}m"


def print_table(header: list[str], rows: list[list[Any]]) -> None:
    cells = [header, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


if __name__ == "__main__":
    sys.exit(main())
