"""``loracache serve``: flags, and the one place a configuration error becomes an exit."""

from __future__ import annotations

import argparse
import functools
import sys

from .config import FLAGS, SETTINGS, ConfigError, load_config, render_config
from .logs import configure_logging

FLAG_HELP = {
    "socket": "Unix socket path (default: the per-user socket, or /run/loracache/daemon.sock "
              "when it exists)",
    "lora_dirs": "directory to serve LoRA files from (repeatable); the daemon reads nothing "
                 "outside these",
    "allow_sources": "URL prefix LoRAs may be fetched from (repeatable): https://host/path/ "
                     "or s3://bucket/prefix/; needs --cache-dir",
    "devices": "comma-separated: cpu, cuda, cuda:<index>, cuda:<GPU-uuid>, all (default: all)",
    "max_bytes": "cache budget per device: bytes, 8GiB, or 25%% of the device's memory "
                 "(default: 25%%)",
}


REPEATED_METAVAR = {"lora_dirs": "DIR", "allow_sources": "URL"}


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: a value given before the command (``loracache --socket S serve``) stays.
    parser.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                        help="TOML configuration file (default: $LORACACHE_CONFIG, else "
                             "/etc/loracache/config.toml when it exists)")
    parser.add_argument("--print-config", action="store_true", default=argparse.SUPPRESS,
                        help="print the effective configuration with the source of each value, "
                             "and exit")
    for setting in SETTINGS:
        if setting.from_file_only:
            continue
        if setting.name in FLAGS:  # repeatable
            parser.add_argument(setting.flag, action="append", dest=setting.name,
                                default=argparse.SUPPRESS, metavar=REPEATED_METAVAR[setting.name],
                                help=FLAG_HELP[setting.name])
            continue
        help_text = FLAG_HELP.get(setting.name, setting.help.replace("%", "%%"))
        parser.add_argument(setting.flag, dest=setting.name, metavar=setting.name.upper(),
                            default=argparse.SUPPRESS, help=f"{help_text} [env {setting.env}]")


def serve(args: argparse.Namespace) -> int:
    flags = {s.name: getattr(args, s.name, None) for s in SETTINGS}
    load = functools.partial(load_config, flags, config_file=getattr(args, "config", None))
    try:
        config = load()
        if getattr(args, "print_config", False):
            print(render_config(config), end="")
            return 0
        configure_logging(config.log_level)
        from .server import run  # torch and the transports load only to serve

        run(config, load)  # SIGHUP calls load() again
    except ConfigError as exc:
        print(f"loracache serve: {exc}", file=sys.stderr)
        return 2
    return 0
