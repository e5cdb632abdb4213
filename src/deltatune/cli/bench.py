"""``deltatune bench``: LoRA training speed and memory against the frozen-base floor and peft."""

from __future__ import annotations

import argparse

HELP = "benchmark LoRA training against the frozen floor and peft"
EXAMPLES = """\
examples:
  deltatune bench                                   # CPU: cpu-small shape; CUDA: 1.1b and 8b (bf16)
  deltatune bench --repeats 3 --json docs/results/benchmarks.json
  deltatune bench --modes fused peft --lora-dropout 0.1 --sections train
  deltatune bench --families lora ia3 loha lokr oft vera adalora --repeats 3
  deltatune bench --grpo --grpo-steps 10                             # GRPO: deltatune against TRL + peft
  deltatune bench --serve --repeats 3                                # many adapters in one batch against peft
"""


def add_parser(commands: argparse._SubParsersAction, name: str) -> None:
    from deltatune.bench.options import add_arguments

    parser = commands.add_parser(
        name,
        help=HELP,
        description="LoRA training step (r=16, all seven Llama projections, AdamW) on random Llama-shaped models: "
        "tokens/s and peak memory of the frozen floor, deltatune (fused and plain) and peft, side by side; "
        "inference latency unmerged/merged; wrap time.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if args.grpo:
        from deltatune.bench.grpo import format_grpo, run_grpo_bench
        from deltatune.bench.report import publish

        report = run_grpo_bench(
            args.grpo_model, args.grpo_steps, args.grpo_generations, args.grpo_batch, args.grpo_completion, args.repeats
        )
        return publish(report, format_grpo(report), args.json)
    if args.serve:
        import tempfile

        from deltatune.bench.report import publish
        from deltatune.bench.serve import format_serve, run_serve_bench

        with tempfile.TemporaryDirectory() as folder:
            report = run_serve_bench(
                args.serve_model,
                max(args.serve_distinct),
                args.serve_requests,
                args.serve_tokens,
                args.serve_distinct,
                args.repeats,
                folder,
                args.serve_prompts,
            )
        return publish(report, format_serve(report), args.json)
    if args.families:
        from deltatune.bench.families import run as run_families

        return run_families(args)
    from deltatune.bench.step import run as run_bench

    return run_bench(args)
