"""The ``loracache`` command: run the daemon, and look at or manage a running one.

Every command finds the daemon the same way: ``--socket``, else ``$LORACACHE_SOCKET``, else the
``socket`` of the configuration file (``--config``, ``$LORACACHE_CONFIG``, or
/etc/loracache/config.toml), else the system socket or the per-user one. ``evict``, ``clear``
and ``preload --pin`` first look for an admin socket the same way (``$LORACACHE_ADMIN_SOCKET``,
``admin_socket``). Exit codes: 0 done, 1 the daemon refused (the message has its error code),
2 no daemon answered or bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime
from typing import Any, Callable

import msgspec

from loracache.shared.endpoints import admin_socket_path, default_socket_path
from loracache.shared.errors import ErrorCode, LoraCacheError
from loracache.shared.humanize import human_bytes, human_duration
from loracache.shared.protocol import StatsResult

from .client import LoraCacheClient

UNREACHABLE = 2  # also argparse's exit code for bad usage


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        from loracache.daemon.cli import serve  # the CLI may use both sides

        return serve(args)
    try:
        socket = args.socket or (admin_socket_path(args.config) if _is_admin(args) else None) \
            or default_socket_path(args.config)
    except ValueError as exc:
        print(f"loracache: {exc}", file=sys.stderr)
        return UNREACHABLE
    if args.command == "doctor":  # diagnoses the connection itself
        from pathlib import Path

        from .doctor import run

        return run(Path(socket))
    try:
        with LoraCacheClient(socket, heartbeat=False, session=False) as client:
            return COMMANDS[args.command](client, args)
    except LoraCacheError as exc:
        print(f"loracache: {exc}", file=sys.stderr)
        return UNREACHABLE if exc.code in (ErrorCode.DAEMON_UNAVAILABLE, ErrorCode.TIMEOUT) else 1
    except KeyboardInterrupt:  # the way out of --watch
        return 0


def _is_admin(args: argparse.Namespace) -> bool:
    """Commands that go to the admin socket when one is configured."""
    return args.command in ("evict", "clear") or (args.command == "preload" and args.pin)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loracache", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    where = argparse.ArgumentParser(add_help=False)  # accepted before or after the command
    for target, default in ((parser, None), (where, argparse.SUPPRESS)):
        target.add_argument("--socket", default=default, help="the daemon's socket")
        target.add_argument("--config", default=default, metavar="FILE",
                            help="configuration file to read the socket from")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from loracache.daemon.cli import add_serve_arguments  # light: no torch until it serves

    add_serve_arguments(commands.add_parser("serve", help="run the daemon in the foreground"))
    stats = commands.add_parser("stats", parents=[where], help="per-device cache counters")
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")
    stats.add_argument("--watch", type=float, metavar="SECONDS",
                       help="print again every SECONDS until interrupted")
    listing = commands.add_parser("ls", parents=[where],
                                  help="cached entries, in every tier (device, host, disk)")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    preload = commands.add_parser("preload", parents=[where], help="load a LoRA into the cache")
    preload.add_argument("path", help="file under one of the daemon's LoRA directories, or a "
                         "URL under its allow_sources")
    preload.add_argument("--device", default="cpu", help="cpu, cuda:<index> or cuda:<GPU-uuid>")
    preload.add_argument("--layout", default="raw",
                         help="raw, sd, sdxl, sd3 or flux, or a family with the dtype its "
                              "factors are cast to (sdxl:F16, flux:BF16)")
    preload.add_argument("--pin", action="store_true", help="keep it from eviction")
    evict = commands.add_parser("evict", parents=[where],
                                help="evict the unleased entries of a file, or all of them")
    what = evict.add_mutually_exclusive_group(required=True)
    what.add_argument("path", nargs="?", help="file whose entries to evict")
    what.add_argument("--all", action="store_true", help="every unleased entry")
    evict.add_argument("--device", default="", help="only on this device")
    clear = commands.add_parser("clear", parents=[where], help="evict every unleased entry")
    clear.add_argument("--device", default="", help="only on this device")
    commands.add_parser("doctor", parents=[where],
                        help="from a worker's environment: check the socket, the daemon, torch, "
                             "each GPU and a test lease on every device; print the fix for each "
                             "failure (exit 1 if any)")
    commands.add_parser("ping", parents=[where],
                        help="exit 0 when the daemon answers, 1 when it answers with an "
                             "error, 2 when nobody answers")
    return parser


def _stats(client: LoraCacheClient, args: argparse.Namespace) -> int:
    while True:
        stats = client.stats()
        if args.json:
            print(json.dumps(msgspec.to_builtins(stats), indent=None if args.watch else 2),
                  flush=True)
        else:
            if args.watch and sys.stdout.isatty():
                print("\033[H\033[2J", end="")  # clear the screen, like watch(1)
            print_stats(stats, watching=bool(args.watch))
        if not args.watch:
            return 0
        time.sleep(args.watch)


def print_stats(stats: StatsResult, watching: bool = False) -> None:
    errors = sum(stats.errors.values())
    print(f"{datetime.now():%H:%M:%S} " if watching else "", end="")
    print(f"daemon {stats.instance} (pid {stats.pid}), up {human_duration(stats.uptime_s)}, "
          f"{stats.sessions} session(s), {stats.leases} lease(s), {errors} error(s)"
          + (f", metrics on {stats.metrics}" if stats.metrics else ""))
    rows = []
    for d in stats.devices:
        times = d.load_seconds
        rows.append([d.device, human_bytes(d.budget), human_bytes(d.used),
                     human_bytes(d.pinned_bytes), d.entries, d.leases, d.sessions, d.hits,
                     d.misses, _percent(d.hit_rate), d.evictions, d.loads,
                     " / ".join(_seconds(p) for p in (times.p50, times.p90, times.p99))])
    print_table(["DEVICE", "BUDGET", "USED", "PINNED", "ENTRIES", "LEASES", "SESSIONS", "HITS",
                 "MISSES", "HIT RATE", "EVICTIONS", "LOADS", "LOAD p50 / p90 / p99"], rows)
    if stats.tiers:
        print()
        print_table(["TIER", "BUDGET", "USED", "ENTRIES", "HITS", "MISSES", "EVICTIONS"],
                    [[t.tier, human_bytes(t.budget), human_bytes(t.used), t.entries, t.hits,
                      t.misses, t.evictions] for t in stats.tiers])
    print_stages(stats)
    print_allocators(stats)
    sys.stdout.flush()


def print_stages(stats: StatsResult) -> None:
    """Where load time goes: a line per device and per tier that has loaded."""
    lines = [f"{d.device} loads, p50 / p90: " + ", ".join(
        f"{stage} {_seconds(t.p50)} / {_seconds(t.p90)}" for stage, t in d.stage_seconds.items())
        for d in stats.devices if d.stage_seconds]
    lines += [f"downloads, p50 / p90: {_seconds(t.load_seconds.p50)} / "
              f"{_seconds(t.load_seconds.p90)}"
              for t in stats.tiers if t.load_seconds is not None and t.load_seconds.count]
    if lines:
        print("", *lines, sep="\n")


def print_allocators(stats: StatsResult) -> None:
    """A line per GPU: what torch's allocator in the daemon holds beyond the cached entries."""
    for d in stats.devices:
        if d.allocated_bytes is not None:
            print(f"{d.device}: allocator holds {human_bytes(d.allocated_bytes)} "
                  f"({human_bytes(d.reserved_bytes or 0)} reserved), of which "
                  f"{human_bytes(d.waiting_bytes or 0)} of evicted entries that workers still "
                  "map")


def _ls(client: LoraCacheClient, args: argparse.Namespace) -> int:
    entries = client.list(tiers=True)
    if args.json:
        print(json.dumps(msgspec.to_builtins(entries), indent=2))
        return 0
    rows = [[e.source or e.path, e.tier, e.device, e.layout, human_bytes(e.nbytes), e.leases,
             "yes" if e.pinned else "", human_duration(e.idle_s) if e.tier == "device" else ""]
            for e in entries]
    print_table(["LORA", "TIER", "DEVICE", "LAYOUT", "SIZE", "LEASES", "PINNED", "IDLE"], rows)
    print_allocators(client.stats())
    return 0


def _preload(client: LoraCacheClient, args: argparse.Namespace) -> int:
    entry = client.preload(args.path, device=args.device, layout=args.layout, pin=args.pin)
    print(f"{entry.path} on {entry.device} ({entry.layout}): "
          f"{human_bytes(entry.nbytes)}{', pinned' if entry.pinned else ''}")
    return 0


def _evict(client: LoraCacheClient, args: argparse.Namespace) -> int:
    """``evict PATH``, ``evict --all`` and ``clear`` (which is ``evict --all``)."""
    every = getattr(args, "all", True)
    result = client.clear(args.device) if every else client.evict(args.path, args.device)
    print(f"evicted {result.evicted}, still leased {result.busy}"
          + (f", host copies dropped {result.copies}" if result.copies else ""))
    return 0


def _ping(client: LoraCacheClient, args: argparse.Namespace) -> int:
    started = time.monotonic()
    stats = client.stats()
    print(f"ok: {client.socket_path} answered in {(time.monotonic() - started) * 1000:.1f} ms "
          f"(daemon {stats.instance}, pid {stats.pid})")
    return 0


COMMANDS: dict[str, Callable[[LoraCacheClient, Any], int]] = {
    "stats": _stats, "ls": _ls, "preload": _preload, "evict": _evict, "clear": _evict,
    "ping": _ping}


def _percent(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:.0%}"


def _seconds(value: float | None) -> str:
    return "-" if value is None else human_duration(value)


def print_table(header: list[str], rows: list[list[Any]]) -> None:
    cells = [header, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


if __name__ == "__main__":
    sys.exit(main())
