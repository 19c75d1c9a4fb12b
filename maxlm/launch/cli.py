"""`maxlm launch local --processes N --devices-per-process M CONFIG [key=value ...]`."""

from __future__ import annotations

import argparse
import sys

from maxlm.launch.local import LocalLaunch, run


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="maxlm launch", description="start maxlm's processes")
    sub = p.add_subparsers(dest="where", required=True)
    lo = sub.add_parser("local", help="N processes on this machine with fake CPU devices (the multi-host path)")
    lo.add_argument("--processes", type=int, default=2)
    lo.add_argument("--devices-per-process", type=int, default=4)
    lo.add_argument("--subcommand", default="train", help="the maxlm subcommand every process runs (default train)")
    lo.add_argument("--port", type=int, default=0, help="coordinator port on 127.0.0.1 (default: a free one)")
    lo.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    lo.add_argument("config")
    lo.add_argument("overrides", nargs="*")
    args, extra = p.parse_known_args(argv)
    if args.processes < 1 or args.devices_per_process < 1:
        p.error("--processes and --devices-per-process must be >= 1")
    launch = LocalLaunch([sys.executable, "-m", "maxlm", args.subcommand, args.config, *args.overrides, *extra],
                         args.processes, args.devices_per_process, port=args.port or 0)
    if args.dry_run:
        launch.port = launch.port or 12345
        print("\n".join(f"{line} &" for line in launch.commands()))
        return 0
    return run(launch)
