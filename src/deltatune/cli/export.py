"""``deltatune export``: write a model, a merged adapter, or a LoRA adapter as GGUF for llama.cpp / Ollama."""

from __future__ import annotations

import argparse

HELP = "export a model or adapter to GGUF (llama.cpp, Ollama, LM Studio)"
EXAMPLES = """\
examples:
  deltatune export outputs/quickstart/adapter model.gguf                # merged, f16
  deltatune export outputs/quickstart/adapter model.gguf --type q8_0 --ollama
  deltatune export outputs/quickstart/adapter adapter.gguf --lora       # + adapter-base.gguf
  deltatune export smollm2 smollm2.gguf --type f32

Run it:
  llama-cli -m model.gguf -cnv
  llama-cli -m adapter-base.gguf --lora adapter.gguf -cnv
  ollama create model -f model.Modelfile && ollama run model
"""
# The tensor types of ``deltatune.export.OUT_TYPES``, written out: that package loads torch, and help
# must not wait for it (tests/test_cli_speed.py checks that both lists match).
OUT_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")


def add_parser(commands: argparse._SubParsersAction, name: str) -> None:
    parser = commands.add_parser(
        name,
        help=HELP,
        description="Write SOURCE (an adapter folder, merged onto its base; a model folder; or 'smollm2') to OUTPUT "
        "as GGUF, with an Ollama Modelfile beside it. With --lora, an adapter stays a separate llama.cpp LoRA file.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", help="adapter folder, model folder, or 'smollm2'")
    parser.add_argument("output", help="the .gguf file to write")
    parser.add_argument("--type", default="f16", choices=list(OUT_TYPES), help="tensor type (default: f16)")
    parser.add_argument("--model", help="base model of an adapter (default: its base_model_name_or_path)")
    parser.add_argument("--lora", action="store_true", help="write the adapter as a llama.cpp LoRA GGUF, not merged")
    parser.add_argument(
        "--base-gguf",
        help="with --lora: an already exported base GGUF (default: export it beside OUTPUT as <name>-base.gguf)",
    )
    parser.add_argument("--pre-tokenizer", help="llama.cpp's pre-tokenizer name, when it cannot be recognised")
    parser.add_argument("--ollama", action="store_true", help="print the 'ollama create' command for the result")


def run(args: argparse.Namespace) -> int:
    from deltatune.errors import ConfigError
    from deltatune.export import export_lora, export_model

    if args.base_gguf and not args.lora:
        raise ConfigError("--base-gguf only applies to --lora exports; drop it or add --lora")
    if args.lora:
        result = export_lora(
            args.source,
            args.output,
            args.type,
            model=args.model,
            base_gguf=args.base_gguf,
            pre_tokenizer=args.pre_tokenizer,
        )
        print(
            f"wrote LoRA adapter {result.gguf} ({args.type}) for base {result.base_gguf}; Modelfile {result.modelfile}"
        )
    else:
        result = export_model(args.source, args.output, args.type, model=args.model, pre_tokenizer=args.pre_tokenizer)
        print(f"wrote {result.gguf} ({args.type}); Modelfile {result.modelfile}")
    if args.ollama:
        print(result.ollama_command())
    return 0
