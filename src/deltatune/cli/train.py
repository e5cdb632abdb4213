"""``deltatune train``: fine-tune a model; with no arguments, the embedded quick start."""

from __future__ import annotations

import argparse
import dataclasses
import textwrap

from ..train.config import TrainConfig

EXAMPLES = """\
examples:
  deltatune train                                  # embedded default: LoRA SFT of SmolLM2-135M on chatterbot
  deltatune train max_steps=200 r=16 learning_rate=5e-4
  deltatune train my_run.yaml output_dir=outputs/run2
"""


def add_parser(commands: argparse._SubParsersAction, name: str) -> None:
    keys = "\n".join(
        f"  {f.name:<16} {f.metadata['help']} (default: {f.default})" for f in dataclasses.fields(TrainConfig)
    )
    parser = commands.add_parser(
        name,
        help="fine-tune a model with LoRA",
        description="Fine-tune a model with LoRA and save a peft-compatible adapter.",
        epilog=EXAMPLES + "\nconfig keys:\n" + keys,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("settings", nargs="*", metavar="[CONFIG.yaml] [key=value]", help="a YAML file and/or overrides")


def run(args: argparse.Namespace) -> int:
    config_file = next((s for s in args.settings if "=" not in s), None)
    overrides = [s for s in args.settings if s is not config_file]
    config = TrainConfig.from_sources(config_file, overrides)
    # Imported here so that `deltatune --help` and config errors stay instant.
    from ..train.run import run_training

    result = run_training(config)
    print()
    print(f"held-out loss: {result.eval_loss_before:.4f} -> {result.eval_loss_after:.4f} "
          f"(reloaded adapter: {result.eval_loss_reloaded:.4f}; merged model max logit diff "
          f"{result.merged_max_logit_diff:.2e})")  # fmt: skip
    print(f"question:        {result.sample_question}")
    for label, text in (("before", result.answer_before), ("after", result.answer_after), ("merged", result.answer_merged)):
        print(f"answer {label + ':':<8} " + textwrap.shorten(text, 200))
    print(f"trained {result.train_seconds:.0f} s; adapter and metrics.json in {config.output_dir}")
    return 0
