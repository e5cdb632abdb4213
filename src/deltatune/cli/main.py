"""``deltatune`` command line: one sub-command per job, one-line errors, non-zero exit on failure.

Help, config errors and data errors answer before torch is imported: the command modules import
torch, transformers and the model code only inside ``run``, and only the sub-command being run gets
its full argument list (some list choices that need those imports). How idle OpenMP threads wait
is set before torch can load (unless the user set it; ``threads.openmp_environment``): ``train``
spins briefly and watches the machine, the decoding commands (``serve``, ``generate``, ``chat``) spin
longer, every other command sleeps.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from deltatune.cli import (
    bench,
    chat,
    classify,
    evaluate,
    export,
    generate,
    inspect_model,
    merge,
    serve,
    train,
)
from deltatune.errors import DeltaTuneError
from deltatune.runtime.threads import openmp_environment

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
    "serve": serve,
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; ``command`` gets its arguments, every other command only its help line."""
    parser = argparse.ArgumentParser(
        prog="deltatune",
        description="Parameter-efficient fine-tuning of transformers models (LoRA, peft-compatible files).",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        if name == command:
            module.add_parser(commands, name)
        else:
            commands.add_parser(name, help=module.HELP)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Top-level options take no value, so the first word that is not an option names the command.
    command = next((word for word in argv if not word.startswith("-")), None)
    waits_as = "bench --serve" if command == "bench" and "--serve" in argv else command  # it measures serve
    os.environ.update(openmp_environment(waits_as, os.environ))  # read once, when torch loads OpenMP
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    _show_library_log()
    try:
        return COMMANDS[args.command].run(args) or 0
    except (DeltaTuneError, FileNotFoundError, PermissionError) as exc:
        if args.debug:
            traceback.print_exc()
        print(f"deltatune {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        advice = _resume_advice(args) if args.command == "train" else ""
        print(f"deltatune {args.command}: interrupted{advice}", file=sys.stderr)
        return 130


def _show_library_log() -> None:
    """deltatune's own log lines (a layer training off the fused path, and why) on stderr, once per process."""
    logger = logging.getLogger("deltatune")
    if not any(isinstance(handler, _StderrHandler) for handler in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("deltatune: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a line is logged (a test's capture, a redirected stream)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _resume_advice(args: argparse.Namespace) -> str:
    """After an interrupted ``train``: the command that continues from its newest complete checkpoint,
    or how to make the run write checkpoints."""
    from deltatune.runtime.checkpoints import (
        checkpoint_step,
        latest_complete_checkpoint,
    )
    from deltatune.train.config import TrainConfig

    config_file = next((s for s in args.settings if "=" not in s), None)
    try:
        config = TrainConfig.from_sources(config_file, [s for s in args.settings if s is not config_file])
    except DeltaTuneError:  # interrupted while the config was being read
        return ""
    folder = Path(config.output_dir) / "checkpoints"
    last = latest_complete_checkpoint(folder)
    if last is None:
        return (
            f"; no checkpoint was written to {folder}, so it cannot resume (save_steps=N saves one every N "
            f"steps, for resume_from_checkpoint=last)"
        )
    kept = [s for s in args.settings if not s.startswith("resume_from_checkpoint=")]
    command = shlex.join(["deltatune", "train", *kept, "resume_from_checkpoint=last"])
    return f"; continue from {last} (step {checkpoint_step(last)}) with: {command}"


if __name__ == "__main__":
    sys.exit(main())
