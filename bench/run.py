"""Run the benchmarks: ``python -m bench.run [--quick] [NAME ...]`` (all of them by default).

Each prints its table and writes bench/results/<name>.json. A benchmark that fails is reported
and the others still run; the exit status is 1 if any failed, 0 otherwise (a missed target is a
result, not a failure).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback

from .common import RESULTS_DIR, Report

BENCHMARKS = {
    "hit": "acquire + release of a cached LoRA vs a bare ZeroMQ + msgpack echo",
    "miss": "loading a 256 MiB LoRA into the cache vs safetensors.torch.load_file",
    "memory": "PSS of N workers leasing the same LoRAs vs each loading its own copies",
    "throughput": "acquires/s with 1, 4, 16 client processes; hit p50 with 10..10,000 entries",
    "fuse": "fuse and switch LoRAs on an SD 1.5 UNet vs diffusers and vs the bare GEMMs",
    "tiers": "re-acquire from the host tier vs the disk tier vs the source; a download through "
             "the daemon vs obstore's; N workers asking for one URL at once",
    "unfused": "set_adapters over shared LoRAs vs a fused switch; unfused vs fused steps; "
               "hotswap under torch.compile; memory of N workers holding the same adapters",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"benchmarks to run (default: all): {', '.join(BENCHMARKS)}")
    parser.add_argument("--quick", action="store_true",
                        help="a short run with few iterations, to check the benchmarks work")
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    reports: list[Report] = []
    failed: list[str] = []
    for name in args.names or list(BENCHMARKS):
        print(f"\n-- {name}: {BENCHMARKS[name]}{' (quick)' if args.quick else ''}", flush=True)
        started = time.monotonic()
        try:
            report = importlib.import_module(f"bench.{name}").run(args.quick)
        except Exception:
            traceback.print_exc()
            failed.append(name)
            continue
        report.print()
        print(f"   ({time.monotonic() - started:.0f} s; written to {report.save(args.quick)})",
              flush=True)
        reports.append(report)
    _summary(reports, failed)
    return 1 if failed else 0


def _summary(reports: list[Report], failed: list[str]) -> None:
    print("\n== targets")
    for report in reports:
        for target in report.targets:
            verdict = "met" if target.met else "MISSED"
            print(f"   {report.name:<10} {target.metric}: {target.value:.2f} "
                  f"(limit {target.limit:g}) {verdict}")
    for name in failed:
        print(f"   {name:<10} FAILED (see the traceback above)")
    print(f"results in {RESULTS_DIR}")


if __name__ == "__main__":
    sys.exit(main())
