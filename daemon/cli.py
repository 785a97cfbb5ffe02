"""``loracache serve``: flags, logging, and the one place a config error becomes an exit."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .config import ConfigError, DaemonConfig
from .server import run


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", help="socket path (default: $LORACACHE_SOCKET, else "
                                         "$XDG_RUNTIME_DIR/loracache-UID/daemon.sock)")
    parser.add_argument("--lora-dir", action="append", dest="lora_dirs", default=[],
                        metavar="DIR", help="directory to serve LoRA files from (repeatable); "
                                            "the daemon reads nothing outside these")
    parser.add_argument("--devices", help="comma-separated: cpu, cuda, cuda:<index>, "
                                          "cuda:<GPU-uuid>, all (default: all)")
    parser.add_argument("--max-bytes", help="cache budget per device: bytes, 8GiB, or 25%% of "
                                            "the device's memory (default: 25%%)")
    parser.add_argument("--cache-size", type=int, help="idle entries kept per device "
                                                       "(default: $LORACACHE_CACHE_SIZE or 10)")
    parser.add_argument("--session-ttl", type=float, help="seconds before a silent client's "
                                                          "leases are released (default: 30)")
    parser.add_argument("--acquire-timeout", type=float, help="seconds an acquire waits for room "
                                                              "before CACHE_FULL (default: 30)")
    parser.add_argument("--shm-dir", help="tmpfs directory for CPU entries (default: /dev/shm)")
    parser.add_argument("--log-level", default=os.environ.get("LORACACHE_LOG_LEVEL", "INFO"))


def serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = DaemonConfig.build(
            socket_path=args.socket, lora_dirs=args.lora_dirs,
            devices=args.devices.split(",") if args.devices else None,
            max_bytes=args.max_bytes, cache_size=args.cache_size, session_ttl=args.session_ttl,
            acquire_timeout=args.acquire_timeout, shm_dir=args.shm_dir)
        run(config)
    except ConfigError as exc:
        print(f"loracache serve: {exc}", file=sys.stderr)
        return 2
    return 0
