"""``deltatune eval``: held-out loss and perplexity of the base model and of the base + adapter; for a
reward model's adapter (``stage=rm``), its pairwise accuracy on held-out preference pairs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from deltatune.errors import ConfigError, DataError

HELP = "held-out loss / perplexity of the base model vs base + adapter (a reward model: pairwise accuracy)"
EXAMPLES = """\
examples:
  deltatune eval --adapter outputs/quickstart/adapter               # chatterbot's held-out split
  deltatune eval --adapter outputs/run1/adapter --data dev.jsonl --max-length 512
  deltatune eval --model ./my-model --data dev.jsonl                # a model without adapter
  deltatune eval --adapter outputs/rm-synthetic/adapter --data pairs.jsonl   # a reward model: pairwise accuracy
"""
REWARD_DATA = "chatterbot-preference-synthetic"  # a reward model's default data (for --data chatterbot)


def add_parser(commands: argparse._SubParsersAction, name: str) -> None:
    parser = commands.add_parser(
        name,
        help=HELP,
        description="Score held-out data: mean cross-entropy per labelled (answer) token and its perplexity, for the "
        "base model and, with --adapter, for base + adapter. The built-in chatterbot data is scored on the held-out "
        "split `deltatune train` uses (same --eval-fraction and --seed); a data file is scored in full. A reward "
        "model's adapter (stage=rm) is scored on preference pairs instead: the share it scores chosen above rejected.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model", help="model folder, 'smollm2' or a hub id (default: the adapter's base model, else smollm2)"
    )
    parser.add_argument("--adapter", help="adapter folder to compare with the base model")
    parser.add_argument("--data", default="chatterbot", help="data file or folder, or 'chatterbot' (default)")
    parser.add_argument(
        "--data-format", default="auto", help="auto (default) or a format name (see deltatune train --help)"
    )
    parser.add_argument("--max-length", type=int, default=128, help="tokens per example (default: 128)")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per forward pass (default: 8)")
    parser.add_argument("--max-examples", type=int, default=96, help="score at most this many examples (default: 96)")
    parser.add_argument(
        "--eval-fraction", type=float, default=0.1, help="held-out share of built-in data (default: 0.1)"
    )
    parser.add_argument("--seed", type=int, default=0, help="split seed for built-in data (default: 0)")


def run(args: argparse.Namespace) -> int:
    for name in ("max_length", "batch_size", "max_examples"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')}={getattr(args, name)} must be positive")
    if not 0 < args.eval_fraction < 1:
        raise ConfigError(f"--eval-fraction={args.eval_fraction} must be between 0 and 1")
    from deltatune.data import (
        BUILTIN,
        collate_causal,
        encode_records,
        load_records,
        split_records,
    )

    reward_model = bool(args.adapter) and _task_type(args.adapter) == "SEQ_CLS"
    data = load_records(REWARD_DATA if reward_model and args.data == "chatterbot" else args.data, args.data_format)
    if reward_model:
        return _pairwise(args, data, split_records, BUILTIN)
    if data.kind != "sft":
        raise DataError(
            f"{data.source} is {data.kind} data; eval scores conversations or text (e.g. --data chatterbot)"
        )
    records = split_records(data.records, args.eval_fraction, args.seed)[1] if args.data in BUILTIN else data.records
    records = records[: args.max_examples]
    # Imported after the data is read, so that a missing or wrong file is reported before torch loads.
    from deltatune.runtime.loading import load_causal_lm, load_tokenizer, model_folder
    from deltatune.saved import load_adapted, tokenizer_for
    from deltatune.train.evaluate import heldout_loss, perplexity

    if args.adapter:
        model, base_path = load_adapted(args.adapter, args.model)
        tokenizer = tokenizer_for(args.adapter, base_path)
    else:
        base_path = model_folder(args.model or "smollm2")
        model, tokenizer = load_causal_lm(base_path).eval(), load_tokenizer(base_path)
    encoded = encode_records(tokenizer, records, args.max_length)
    print(f"data: {data.source}: {encoded.summary(args.max_length)}")

    def collate(batch):
        return collate_causal(batch, tokenizer.pad_token_id)

    def score(label: str) -> float:
        loss = heldout_loss(model, encoded.examples, collate, args.batch_size, desc=label)
        print(f"{label + ':':<9} loss {loss:.4f}  perplexity {perplexity(loss):.2f}", flush=True)
        return loss

    if not args.adapter:
        score("model")
        return 0
    with model.disable_adapter():
        base = score("base")
    adapted = score("adapter")
    print(f"change:   {adapted - base:+.4f} loss ({(adapted - base) / base:+.1%})")
    return 0


def _task_type(adapter: str) -> str | None:
    """The adapter's task_type from its adapter_config.json (read as a file: no torch); None when unreadable."""
    try:
        return json.loads((Path(adapter) / "adapter_config.json").read_text(encoding="utf-8")).get("task_type")
    except (OSError, ValueError, AttributeError):
        return None  # loading the adapter names the problem


def _pairwise(args: argparse.Namespace, data, split_records, builtin) -> int:
    """A reward model's pairwise accuracy and mean score gap on held-out pairs."""
    if data.kind != "preference":
        raise DataError(
            f"{data.source} is {data.kind} data; a reward model is scored on preference pairs (chosen/rejected), "
            f"e.g. --data {REWARD_DATA}"
        )
    records = split_records(data.records, args.eval_fraction, args.seed)[1] if data.source in builtin else data.records
    from deltatune.train.reward_model import load_reward_model, pairwise_accuracy

    scorer, tokenizer = load_reward_model(args.adapter, args.model)
    result = pairwise_accuracy(scorer, tokenizer, records[: args.max_examples], args.max_length, args.batch_size)
    print(f"data: {data.source}: {result.pairs} pairs")
    print(f"reward model: pairwise accuracy {result.accuracy:.3f}, mean margin {result.mean_margin:+.3f}")
    return 0
