"""``deltatune train``: fine-tune a model; with no arguments, the embedded quick start."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import textwrap

HELP = "fine-tune a model (SFT, DPO or KTO) and save a peft-compatible adapter"
EXAMPLES = """\
examples:
  deltatune train                                  # embedded default: LoRA SFT of SmolLM2-135M on chatterbot
  deltatune train max_steps=200 r=16 learning_rate=5e-4
  deltatune train model=./my-model data=train.jsonl eval_data=dev.jsonl epochs=3 output_dir=outputs/run1
  deltatune train examples/dpo.yaml                # DPO on SYNTHETIC chatterbot preference pairs
  deltatune train my_run.yaml output_dir=outputs/run2 resume_from_checkpoint=last
"""


def add_parser(commands: argparse._SubParsersAction, name: str) -> None:
    parser = commands.add_parser(
        name,
        help=HELP,
        description="Fine-tune a model with an adapter method (SFT, DPO or KTO) and save a peft-compatible "
        "adapter, metrics.json and loss.png in output_dir. Settings come from defaults, then CONFIG.yaml, "
        "then key=value overrides.",
        epilog=EXAMPLES + "\nconfig keys:\n" + _keys_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("settings", nargs="*", metavar="[CONFIG.yaml] [key=value]", help="a YAML file and/or overrides")


def _keys_help() -> str:
    from deltatune.train.config import TrainConfig
    from deltatune.train.methods import methods, option_defaults

    lines = [
        f"  {f.name:<28} {f.metadata['help']} (default: {f.default!r})"
        for f in dataclasses.fields(TrainConfig)
        if f.name in TrainConfig.keys()
    ]
    for method in methods():
        lines.append(f"\nmethod={method} keys (defaults):")
        lines.append(
            textwrap.fill(
                ", ".join(f"{k}={v!r}" for k, v in option_defaults(method).items()),
                width=100,
                initial_indent="  ",
                subsequent_indent="  ",
            )
        )
    return "\n".join(lines)


def _set_threads(requested: int) -> list:
    """torch's CPU thread count from ``threads=`` (0: the CPUs other work leaves free, unless
    OMP_NUM_THREADS says otherwise), with a notice when the machine is busy. Chosen automatically,
    the count is watched while training runs: the callbacks that do so are returned."""
    if not requested and "OMP_NUM_THREADS" in os.environ:
        return []
    import torch

    from deltatune.runtime.threads import (
        ThreadWatcher,
        available_cpus,
        busy_cpus,
        choose_threads,
    )

    cpus = available_cpus()
    choice = choose_threads(requested, cpus, busy_cpus())
    if choice.notice:
        print(f"threads: {choice.notice}", file=sys.stderr)
    torch.set_num_threads(choice.threads)
    if requested:
        return []
    from tqdm.auto import tqdm

    from deltatune.train.thread_watch import ThreadWatch

    try:
        return [ThreadWatch(ThreadWatcher(choice.threads, cpus), log=lambda line: tqdm.write(line, file=sys.stderr))]
    except OSError:  # no /proc/stat to watch: the count chosen at the start stays
        return []


def run(args: argparse.Namespace) -> int:
    from deltatune.train.config import TrainConfig

    config_file = next((s for s in args.settings if "=" not in s), None)
    overrides = [s for s in args.settings if s is not config_file]
    config = TrainConfig.from_sources(config_file, overrides)
    config.check_inputs()  # data files and max_length against the model's config.json, before torch loads
    watch = _set_threads(config.threads)
    # Imported here so that `deltatune --help` and config errors stay instant.
    from deltatune.runtime.distributed import is_main_process
    from deltatune.train.run import run_training

    result = run_training(config, callbacks=watch)
    if not is_main_process():  # under torchrun the main process alone reports
        return 0
    print()
    checks = f"reloaded adapter max logit diff {result.reloaded_max_logit_diff:.2e}"
    if result.merged_max_logit_diff is not None:
        checks += f"; merged model max logit diff {result.merged_max_logit_diff:.2e}"
    if "eval_reward" in result.eval_before:  # GRPO: the mean reward of greedy answers to the held-out prompts
        line = f"held-out reward: {result.eval_before['eval_reward']:.4f} -> {result.eval_after['eval_reward']:.4f}"
    else:
        label = "held-out loss" if result.stage == "sft" else f"held-out {result.stage} loss"
        line = f"{label}: {result.eval_loss_before:.4f} -> {result.eval_loss_after:.4f}"
    accuracy = "eval_rewards/accuracies"
    if accuracy in result.eval_before and accuracy in result.eval_after:
        line += f", reward accuracy {result.eval_before[accuracy]:.3f} -> {result.eval_after[accuracy]:.3f}"
    print(f"{line} ({checks})")
    for number, sample in enumerate(result.samples):
        print(f"question:        {textwrap.shorten(sample.question, 200)}")
        answers = [("data", sample.reference), ("before", sample.before), ("after", sample.after)]
        if number == 0:
            answers.append(("merged", result.answer_merged))
        for label, text in answers:
            if text is not None:
                print(f"answer {label + ':':<8} " + textwrap.shorten(text, 200))
    if result.diverged:
        print(result.diverged)
    steps = f"{result.steps} step" + ("" if result.steps == 1 else "s")
    speed = (
        f"{result.tokens_per_second:,.0f} tokens/s"
        if result.tokens_per_second
        else f"{result.train_seconds / max(result.steps, 1):.1f} s/step"
    )
    print(
        f"trained {steps} in {result.train_seconds:.0f} s ({speed}); "
        f"adapter in {result.adapter_dir}, metrics.json and loss.png in {config.output_dir}"
    )
    return 0
