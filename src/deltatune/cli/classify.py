"""``deltatune classify``: sequence classification with an adapter and a new head (MiniLM + chatterbot topics by
default)."""

from __future__ import annotations

import argparse

from deltatune.errors import ConfigError

HELP = "train a sequence classifier (LoRA + a new head) and report held-out accuracy"
EXAMPLES = """\
examples:
  deltatune classify                                  # embedded MiniLM, chatterbot questions -> their 21 topics
  deltatune classify --max-steps 200 --output-dir outputs/topics
  deltatune classify --data labelled.jsonl --model ./my-encoder   # rows: {"text": "...", "label": "..."}
"""


def add_parser(commands: argparse._SubParsersAction, name: str) -> None:
    parser = commands.add_parser(
        name,
        help=HELP,
        description="Train LoRA on every linear layer plus a new classification head (modules_to_save) and print "
        "held-out accuracy before and after, next to the always-the-most-common-label baseline.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", help="encoder folder (default: the embedded all-MiniLM-L6-v2)")
    parser.add_argument("--data", help="text/label file (default: chatterbot questions labelled by topic)")
    parser.add_argument(
        "--output-dir", default="outputs/classify", help="where the adapter goes (default: outputs/classify)"
    )
    parser.add_argument("--max-steps", type=int, default=100, help="optimizer steps (default: 100)")
    parser.add_argument("--batch-size", type=int, default=32, help="examples per step (default: 32)")
    parser.add_argument("--learning-rate", type=float, default=2e-3, help="peak learning rate (default: 2e-3)")
    parser.add_argument("--seed", type=int, default=0, help="split and training seed (default: 0)")


def run(args: argparse.Namespace) -> int:
    for name in ("max_steps", "batch_size"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')}={getattr(args, name)} must be positive")
    from deltatune.data import load_records

    records = None
    if args.data:
        data = load_records(args.data)
        if data.kind != "classification":
            raise ConfigError(f"{data.source} is {data.kind} data; classify needs text/label rows")
        records = data.records
    # Imported after the data is read, so that a missing or wrong file is reported before torch loads.
    from deltatune.train.classify import run_classification

    result = run_classification(
        args.model,
        records,
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
    )
    print(
        f"held-out accuracy: {result.accuracy_before:.1%} -> {result.accuracy_after:.1%} "
        f"(most-common-label baseline {result.majority_accuracy:.1%}); adapter in {args.output_dir}/adapter"
    )
    return 0
