"""``deltatune inspect``: what an adapter can target in a model, and what each method would train."""

from __future__ import annotations

import argparse
from collections import Counter

HELP = "list a model's adaptable modules and each method's trainable parameters"
EXAMPLES = """\
examples:
  deltatune inspect smollm2              # the embedded SmolLM2-135M-Instruct
  deltatune inspect minilm               # the embedded all-MiniLM-L6-v2 encoder
  deltatune inspect ./my-model --all     # list every adaptable module's full name
"""
_TASKS = (("ForCausalLM", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"))


def add_parser(commands: argparse._SubParsersAction, name: str) -> None:
    parser = commands.add_parser(
        name,
        help=HELP,
        description="Show MODEL's adaptable modules (by short name, with counts), the modules `deltatune train` "
        "adapts with its default target_modules (and peft's per-architecture default), the memory of its weights "
        "held as each `quantization=` mode, and the trainable parameter count of every registered method at its "
        "`deltatune train` defaults.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="model folder, 'smollm2' or 'minilm'")
    parser.add_argument("--all", action="store_true", help="print the full name of every adaptable module")


def run(args: argparse.Namespace) -> int:
    from deltatune.errors import DeltaTuneError
    from deltatune.model import get_delta_model
    from deltatune.runtime.loading import load_saved_class, model_folder
    from deltatune.runtime.quantization import (
        QUANTIZATIONS,
        base_memory,
        is_quantized_model,
    )
    from deltatune.train.methods import build_config, methods
    from deltatune.tuners.targeting import (
        adaptable_module_names,
        default_target_modules,
    )

    model = load_saved_class(model_folder(args.model))
    total = sum(p.numel() for p in model.parameters())
    model_type = getattr(model.config, "model_type", "?")
    print(f"model: {type(model).__name__} ({model_type}), {total:,} parameters")
    if not is_quantized_model(model):
        sizes = ", ".join(f"{mode} {base_memory(model, mode) / 2**20:,.1f} MiB" for mode in QUANTIZATIONS)
        print(f"base weights by quantization= (linear layers but the head): {sizes}")
    names = adaptable_module_names(model)
    counts = Counter(name.rsplit(".", 1)[-1] for name in names)
    print(f"adaptable modules: {len(names)}")
    for short, count in sorted(counts.items()):
        example = next(name for name in names if name.rsplit(".", 1)[-1] == short)
        print(f"  {short:<24} x{count:<4} e.g. {example}")
    if args.all:
        print("\n".join(f"    {name}" for name in names))
    task = next((task for suffix, task in _TASKS if type(model).__name__.endswith(suffix)), None)
    print(_train_targets(model, task))
    try:
        print(
            f"peft's default target_modules: {', '.join(default_target_modules(model))} (LoraConfig without "
            f"target_modules, for this architecture; not what `deltatune train` uses)"
        )
    except DeltaTuneError as exc:
        print(f"peft's default target_modules: none ({exc})")
    print(f"trainable parameters per method (task_type={task}, `deltatune train` defaults):")
    for method in methods():
        try:
            delta = get_delta_model(model, build_config(method, {}, task, None))
        except DeltaTuneError as exc:
            print(f"  {method:<12} not applicable: {exc}")
            continue
        trainable, _ = delta.get_nb_trainable_parameters()
        print(f"  {method:<12} {trainable:>12,}  ({100 * trainable / total:.3f}% of the model)")
        model = delta.unload()
    return 0


def _train_targets(model, task: str | None) -> str:
    """The line naming what ``deltatune train`` adapts with its defaults (the config class's ``train_defaults``)."""
    from deltatune.errors import DeltaTuneError
    from deltatune.train.methods import build_config
    from deltatune.tuners.targeting import find_targets, short_names

    config = build_config("lora", {}, task, None)
    spec = config.target_modules if isinstance(config.target_modules, str) else ", ".join(config.target_modules)
    try:
        names = find_targets(model, config)
    except DeltaTuneError as exc:
        return f"`deltatune train` target_modules={spec}: adapts nothing here ({exc})"
    shorts = ", ".join(short_names(names))
    return f"`deltatune train` target_modules={spec} (its default): {len(names)} modules, {shorts}"
