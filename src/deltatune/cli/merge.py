"""``deltatune merge``: fold an adapter into its base model and save a plain transformers model."""

from __future__ import annotations

import argparse
from pathlib import Path

from deltatune.errors import ConfigError
from deltatune.runtime.atomic import atomic_directory

HELP = "merge an adapter into its base model (a plain transformers model folder)"
EXAMPLES = """\
examples:
  deltatune merge outputs/quickstart/adapter outputs/merged
  deltatune merge my-adapter merged-model --model ./base-model --dtype bf16

An adapter trained over a quantised base (quantization=nf4|fp4|int8) merges into the full-precision base
model here (what to deploy); a quantised model folder as the base is refused (it would round the result).

The output folder loads with transformers alone:
  AutoModelForCausalLM.from_pretrained("outputs/merged")
"""


def add_parser(commands: argparse._SubParsersAction, name: str) -> None:
    parser = commands.add_parser(
        name,
        help=HELP,
        description="Merge ADAPTER into its base model (W0 + delta) and save the result, with the tokenizer, "
        "to OUTPUT.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("output", help="folder for the merged model (must be empty or new)")
    parser.add_argument(
        "--model", help="base model folder, 'smollm2' or a hub id (default: the adapter's base_model_name_or_path)"
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        help="dtype of the saved weights: fp32 / float32 (default), bf16 / bfloat16, fp16 / float16",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty OUTPUT folder (swapped whole, in one step)"
    )


def run(args: argparse.Namespace) -> int:
    from transformers import AutoConfig

    from deltatune.data.chat_defaults import copy_chat_defaults
    from deltatune.runtime.loading import DTYPES
    from deltatune.runtime.quantization import saved_quantization
    from deltatune.saved import adapter_base, load_adapted, tokenizer_for

    if args.dtype not in DTYPES:
        raise ConfigError(f"--dtype={args.dtype!r} is unknown; use one of {', '.join(DTYPES)}")
    output = Path(args.output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not args.overwrite:
        raise ConfigError(f"{output} exists and is not an empty folder; pick a new OUTPUT or pass --overwrite")
    _, base_path = adapter_base(args.adapter, args.model)
    saved = saved_quantization(AutoConfig.from_pretrained(base_path, local_files_only=True))
    if saved != "none":
        raise ConfigError(
            f"{base_path} is a quantised ({saved}) model: merging into it would round the merged "
            f"weights; pass the full-precision base with --model (training quantises it on load)"
        )
    model, base_path = load_adapted(args.adapter, args.model)  # merged in fp32, then cast
    merged = model.merge_and_unload(safe_merge=True).to(DTYPES[args.dtype])
    with atomic_directory(output) as staging:  # a crash leaves the previous OUTPUT or the new one, never a mix
        merged.save_pretrained(staging)
        tokenizer_for(args.adapter, base_path).save_pretrained(staging)
        copy_chat_defaults(args.adapter, staging)  # the trained system prompt: generate/chat use it
    total = sum(p.numel() for p in merged.parameters())
    print(
        f"merged {args.adapter} into {base_path}: {type(merged).__name__}, {total:,} parameters ({args.dtype}) "
        f"saved to {output}"
    )
    return 0
