"""The ``largeep`` command.

Each subcommand lives in its own module under ``largeep_plugin/commands/`` and exposes two functions:

    add_parser(subparsers) -> argparse.ArgumentParser   # registers the subcommand and its flags
    run(args) -> int                                     # runs it, returns the exit code

so that adding a subcommand never touches another one. Run ``largeep --help`` for the list.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from largeep_plugin.commands import register_subcommands
from largeep_plugin.tools.launch import WorldError, WorldInterrupted

# Subcommand modules, in the order ``--help`` lists them.
_COMMANDS = (
    "demo",
    "bench",
    "cluster",
    "simulate",
    "plan",
    "gpu_check",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="largeep",
        description="Large expert-parallel Mixture-of-Experts: demo, benchmarks, placement planning, "
        "performance model and an emulated multi-node cluster.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    register_subcommands(sub, [f"largeep_plugin.commands.{name}" for name in _COMMANDS], "_run")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args._argv = list(sys.argv[1:] if argv is None else argv)  # a subcommand that re-runs itself elsewhere needs it
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except WorldInterrupted as err:  # SIGTERM / SIGHUP: the ranks are already stopped
        print(f"largeep {args.command}: {err}", file=sys.stderr)
        return 128 + err.signum
    except WorldError as err:  # one line per rank; the tracebacks with LARGEEP_VERBOSE=1
        print(f"largeep {args.command}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
