"""``deltatune bench --families``: each adapter family's training step in deltatune and in peft, side by side.

Every family trains the same Llama-shaped random model (``cpu-small`` on CPU) with its config built from
the same keyword arguments in both libraries (``FAMILY_OPTIONS``), each library in a fresh process:
tokens/s (median step) and peak memory, and deltatune's ratio to peft. LoRA runs through deltatune's
fused path; the other families run as plain autograd in both libraries.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Sequence
from typing import Any

from deltatune.bench import child
from deltatune.bench.machine import environment
from deltatune.bench.options import DEFAULT_SHAPES, shape_of
from deltatune.bench.report import publish
from deltatune.bench.step import LLAMA_PROJECTIONS, build_model, measure_training, run_job

MLP_PROJECTIONS = ["gate_proj", "up_proj", "down_proj"]
# family -> (config class name, both libraries export it; its keyword arguments)
FAMILY_OPTIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "lora": ("LoraConfig", {"r": 8, "lora_alpha": 16, "target_modules": LLAMA_PROJECTIONS}),
    "dora": ("LoraConfig", {"r": 8, "lora_alpha": 16, "target_modules": LLAMA_PROJECTIONS, "use_dora": True}),
    "ia3": ("IA3Config", {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}),
    "loha": ("LoHaConfig", {"r": 8, "alpha": 8, "target_modules": LLAMA_PROJECTIONS}),
    "lokr": ("LoKrConfig", {"r": 8, "alpha": 8, "target_modules": LLAMA_PROJECTIONS}),
    "oft": ("OFTConfig", {"r": 0, "oft_block_size": 32, "target_modules": LLAMA_PROJECTIONS}),
    "vera": ("VeraConfig", {"r": 256, "target_modules": MLP_PROJECTIONS}),
    "adalora": ("AdaLoraConfig", {"init_r": 12, "target_r": 8, "total_step": 100, "target_modules": LLAMA_PROJECTIONS}),
}
LIBRARIES = ("deltatune", "peft")


def family_job(shape: str, family: str, library: str, device: str, steps: int, warmup: int) -> dict:
    """One library's training steps of ``family`` on a random model of ``shape``."""
    import importlib

    import torch

    class_name, options = FAMILY_OPTIONS[family]
    size = shape_of(shape)
    model = build_model(size, device)
    config = getattr(importlib.import_module(library), class_name)(**options)
    if library == "peft":
        import peft

        model = peft.get_peft_model(model, config)
    else:
        from deltatune import get_delta_model

        model = get_delta_model(model, config)
    torch.manual_seed(0)
    return measure_training(model, size, device, steps, warmup, own_loss=library == "peft")


def run_families(args: argparse.Namespace) -> dict:
    """Both libraries for every family in ``args.families``, interleaved per repeat."""
    shape = (args.shapes or DEFAULT_SHAPES[args.device])[0]
    records = []
    for repeat in range(args.repeats):
        for family in args.families:
            for library in LIBRARIES:
                job = {
                    "shape": shape,
                    "family": family,
                    "library": library,
                    "device": args.device,
                    "steps": args.steps,
                    "warmup": args.warmup,
                }
                result = run_job(job, args.isolate, module="deltatune.bench.families", dispatch=family_job)
                records.append({**job, "repeat": repeat, **result})
                print(
                    f"  {family:<8} {library:<9} repeat {repeat}: {result['tokens_per_cpu_s']:,.0f} tok/cpu-s, "
                    f"peak {result['peak_mib']:,.0f} MiB",
                    flush=True,
                )
    return {
        "environment": {**environment(args.device, args.threads), "load_average_end": os.getloadavg()},
        "settings": {"shape": shape, "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats},
        "families": records,
        "family_summary": summarize_families(records, "tokens_per_s" if args.device == "cuda" else "tokens_per_cpu_s"),
    }


def summarize_families(records: list[dict], clock: str) -> dict[str, dict[str, float]]:
    """Family -> medians over repeats of each library's speed and peak, and deltatune's ratios to peft."""
    summary: dict[str, dict[str, float]] = {}
    for family in dict.fromkeys(record["family"] for record in records):
        entry = summary[family] = {}
        for library in LIBRARIES:
            mine = [record for record in records if record["family"] == family and record["library"] == library]
            entry[f"{library}_speed"] = statistics.median(record[clock] for record in mine)
            entry[f"{library}_peak_mib"] = statistics.median(record["peak_mib"] for record in mine)
            entry["trainable"] = mine[0]["trainable"]
        entry["speed_vs_peft"] = entry["deltatune_speed"] / entry["peft_speed"]
        entry["memory_vs_peft"] = entry["deltatune_peak_mib"] / entry["peft_peak_mib"]
    return summary


def format_families(report: dict) -> str:
    """The report as a markdown table, with the machine it ran on."""
    env = report["environment"]
    lines = [
        f"shape {report['settings']['shape']}, median of {report['settings']['steps']} steps x "
        f"{report['settings']['repeats']} repeats; {env.get('cpu', env.get('device', ''))}",
        "",
        "| family | trainable | deltatune tok/s | peft tok/s | speed vs peft | deltatune peak MiB | peft peak MiB "
        "| memory vs peft |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for family, entry in report["family_summary"].items():
        lines.append(
            f"| {family} | {entry['trainable']:,} | {entry['deltatune_speed']:,.0f} | {entry['peft_speed']:,.0f} | "
            f"{entry['speed_vs_peft']:.2f}x | {entry['deltatune_peak_mib']:,.0f} | {entry['peft_peak_mib']:,.0f} | "
            f"{entry['memory_vs_peft']:.2f}x |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    unknown = [family for family in args.families if family not in FAMILY_OPTIONS]
    if unknown:
        from deltatune.errors import ConfigError

        raise ConfigError(f"--families {', '.join(unknown)}: unknown; choose from {', '.join(FAMILY_OPTIONS)}")
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    report = run_families(args)
    return publish(report, format_families(report), args.json)


def main(argv: Sequence[str] | None = None) -> int:
    """Internal: ``--job JSON`` runs one job in this process and prints its result."""
    parser = argparse.ArgumentParser(prog="python -m deltatune.bench.families")
    parser.add_argument("--job", required=True)
    job = json.loads(parser.parse_args(argv).job)
    child.report(family_job(**job))
    return 0


if __name__ == "__main__":
    sys.exit(main())
