"""``deltatune generate``: answer prompts with a base model, base + adapter, or a merged model."""

from __future__ import annotations

import argparse
import sys

from deltatune.errors import ConfigError

HELP = "answer prompts with a model (and an adapter)"
EXAMPLES = """\
examples:
  deltatune generate "What is AI?"                                        # the embedded SmolLM2
  deltatune generate --adapter outputs/quickstart/adapter "What is AI?"   # base + adapter
  deltatune generate --model outputs/merged --temperature 0.7 "Tell me a joke."
  printf 'Hi\\nWho are you?\\n' | deltatune generate --adapter outputs/quickstart/adapter -
"""


def add_parser(commands: argparse._SubParsersAction, name: str) -> None:
    parser = commands.add_parser(
        name,
        help=HELP,
        description="Answer each PROMPT with the model's chat template (greedy unless --temperature > 0).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("prompt", nargs="+", help="prompts; '-' reads one prompt per line from stdin")
    add_model_arguments(parser)
    add_generation_arguments(parser)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", help="model folder, 'smollm2' or a hub id (default: the adapter's base model, else smollm2)"
    )
    parser.add_argument("--adapter", help="adapter folder (adapter_config.json + weights) to apply to the model")
    add_packed_weights_argument(parser)


def add_packed_weights_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--packed-weights",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="on a CPU, decode on linear weights packed once for oneDNN (2-3x faster products at a few rows), for "
        "a second copy of those weights in memory (default: on; --no-packed-weights runs torch's own products)",
    )


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--system",
        help="system message; '' for none (default: the one the adapter or merged model "
        "was trained with, if any, else the chat template's own)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens per answer (default: 64)")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default: 1.0)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")


def packed_weights(args: argparse.Namespace, model):
    """The packed weights the answers share (``--packed-weights``), or None."""
    from deltatune.kernels.packed_linear import PackedWeights

    return PackedWeights(model) if args.packed_weights else None


def load_model(args: argparse.Namespace):
    """(model in eval mode, tokenizer) from --model / --adapter."""
    from deltatune.runtime.loading import load_causal_lm, load_tokenizer, model_folder
    from deltatune.saved import load_adapted, tokenizer_for

    if args.adapter:
        model, base_path = load_adapted(args.adapter, args.model)
        return model, tokenizer_for(args.adapter, base_path)
    path = model_folder(args.model or "smollm2")
    return load_causal_lm(path).eval(), load_tokenizer(path)


def sampling(args: argparse.Namespace) -> dict:
    """``answer()`` keyword arguments for the sampling flags, after range checks."""
    if args.max_new_tokens <= 0:
        raise ConfigError(f"--max-new-tokens={args.max_new_tokens} must be positive")
    if args.temperature < 0:
        raise ConfigError(f"--temperature={args.temperature} must be 0 (greedy) or more")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p={args.top_p} must be in (0, 1]")
    return {"temperature": args.temperature, "top_p": args.top_p, "seed": args.seed}


def system_prompt(args: argparse.Namespace) -> str | None:
    """--system, else the system prompt the adapter (or merged --model) was trained with (``chat_defaults``);
    says on stderr which stored one is used."""
    if args.system is not None:
        return args.system or None
    from deltatune.data.chat_defaults import FILE, stored_system

    folder = args.adapter or args.model
    system = stored_system(folder) if folder else None
    if system is not None:
        print(
            f"system prompt from {folder}/{FILE}: {system!r} (--system replaces it, --system '' drops it)",
            file=sys.stderr,
        )
    return system


def system_messages(system: str | None) -> list:
    """The conversation's opening: the system message, if there is one."""
    from deltatune.data import Message

    return [Message("system", system)] if system else []


def run(args: argparse.Namespace) -> int:
    prompts = [line.rstrip("\n") for p in args.prompt for line in (sys.stdin if p == "-" else [p])]
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise ConfigError("no prompt given (stdin was empty); pass a PROMPT or pipe lines into '-'")
    options = sampling(args)
    from deltatune.data import Message
    from deltatune.train.evaluate import answer

    model, tokenizer = load_model(args)
    packed = packed_weights(args, model)
    opening = system_messages(system_prompt(args))
    for prompt in prompts:
        messages = [*opening, Message("user", prompt)]
        reply = answer(model, tokenizer, messages, args.max_new_tokens, **options, packed_weights=packed)
        print(reply if len(prompts) == 1 else f"> {prompt}\n{reply}\n", flush=True)
    return 0
