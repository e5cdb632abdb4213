"""``deltatune`` command line: one sub-command per job, one-line errors, non-zero exit on failure."""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence

from ..errors import DeltaTuneError
from . import bench, chat, classify, evaluate, export, generate, inspect_model, merge, train

COMMANDS = {
    "train": train,
    "merge": merge,
    "export": export,
    "generate": generate,
    "chat": chat,
    "eval": evaluate,
    "inspect": inspect_model,
    "classify": classify,
    "bench": bench,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deltatune",
        description="Parameter-efficient fine-tuning of transformers models (LoRA, peft-compatible files).",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        module.add_parser(commands, name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command].run(args) or 0
    except (DeltaTuneError, FileNotFoundError, PermissionError) as exc:
        if args.debug:
            traceback.print_exc()
        print(f"deltatune {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"deltatune {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
