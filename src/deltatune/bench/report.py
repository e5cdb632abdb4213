"""Tables and ratios of a step benchmark's report (``deltatune bench``)."""

from __future__ import annotations

import json
import statistics

from deltatune.bench.options import REFERENCES, shape_of


def publish(report: dict, table: str, json_path: str | None) -> int:
    """A benchmark command's ending: print ``table`` (``report`` formatted) and, with ``json_path``, write
    ``report`` there as indented JSON; returns the exit status, 0."""
    print(table)
    if json_path:
        with open(json_path, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
            handle.write("\n")
    return 0


def summarize(report: dict) -> dict:
    """Per shape and mode: medians over repeats, their range, and ratios to floor and peft.

    Speed ratios use the CPU-time throughput on CPU (see ``_timed``) and wall time on CUDA.
    """
    clock = _clock(report)
    summary: dict[str, dict] = {}
    for record in report["train"]:
        entry = summary.setdefault(record["shape"], {}).setdefault(record["mode"], {})
        for key in ("tokens_per_s", "tokens_per_cpu_s", "peak_mib", "saved_mib"):
            entry.setdefault(key, []).append(record[key])
    for modes in summary.values():
        for entry in modes.values():
            for key in list(entry):
                entry[f"{key}_range"] = [min(entry[key]), max(entry[key])]
                entry[key] = statistics.median(entry[key])
        for reference in REFERENCES:
            if reference in modes:
                for entry in modes.values():
                    entry[f"speed_vs_{reference}"] = entry[clock] / modes[reference][clock]
                    entry[f"memory_vs_{reference}"] = entry["peak_mib"] / modes[reference]["peak_mib"]
    return summary


def summarize_quant(report: dict) -> dict:
    """Per shape and base: medians over repeats, and ratios to the fp32 base (memory, speed) and to peft over nf4."""
    clock = _clock(report)
    summary: dict[str, dict] = {}
    for record in report.get("quant", []):
        entry = summary.setdefault(record["shape"], {}).setdefault(record["base"], {})
        for key in (clock, "tokens_per_s", "peak_mib", "base_mib", "linear_mib"):
            entry.setdefault(key, []).append(record[key])
    for bases in summary.values():
        for entry in bases.values():
            for key in list(entry):
                entry[key] = statistics.median(entry[key])
        for entry in bases.values():
            for key, reference in (
                ("peak_mib", "fp32"),
                ("base_mib", "fp32"),
                ("linear_mib", "fp32"),
                (clock, "peft-nf4"),
            ):
                if reference in bases:
                    entry[f"{key}_vs_{reference}"] = entry[key] / bases[reference][key]
    return summary


def _format_quant(report: dict, speed: str) -> list[str]:
    clock = _clock(report)
    lines = []
    for shape, bases in report.get("quant_summary", {}).items():
        lines += [
            f"\nLoRA over quantised bases, {shape} (r={report['settings']['rank']}, all seven projections):",
            "",
            f"| base | {speed} | vs peft-nf4 | wall tokens/s | step peak MiB | vs fp32 | base weights MiB | vs fp32 "
            f"| linear layers MiB | vs fp32 |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for base, e in bases.items():
            lines.append(
                f"| {base} | {e[clock]:,.0f} | {_ratio(e, f'{clock}_vs_peft-nf4')} | {e['tokens_per_s']:,.0f} | "
                f"{e['peak_mib']:,.1f} | {_ratio(e, 'peak_mib_vs_fp32')} | {e['base_mib']:,.1f} | "
                f"{_ratio(e, 'base_mib_vs_fp32')} | {e['linear_mib']:,.1f} | {_ratio(e, 'linear_mib_vs_fp32')} |"
            )
    return lines


def format_report(report: dict) -> str:
    """Markdown tables of the summary, inference and wrap sections."""
    clock = _clock(report)
    on_cpu = clock == "tokens_per_cpu_s"
    speed = "tokens per CPU-second" if on_cpu else "tokens/s"
    lines = []
    for shape, modes in report["summary"].items():
        s = shape_of(shape, report["settings"]["dtype"])
        lines += [
            f"\n{shape}: hidden {s.hidden}, {s.layers} layers, {s.dtype}, batch {s.batch}x{s.seq}",
            "",
            f"| mode | {speed} (min-max) | vs floor | vs peft | wall tokens/s | peak MiB | vs floor | vs peft "
            f"| saved for backward MiB |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for mode, e in modes.items():
            lo, hi = e[f"{clock}_range"]
            lines.append(
                f"| {mode} | {e[clock]:,.0f} ({lo:,.0f}-{hi:,.0f}) | {_ratio(e, 'speed_vs_floor')} | "
                f"{_ratio(e, 'speed_vs_peft')} | {e['tokens_per_s']:,.0f} | {e['peak_mib']:,.1f} | "
                f"{_ratio(e, 'memory_vs_floor')} | {_ratio(e, 'memory_vs_peft')} | {e['saved_mib']:,.1f} |"
            )
        if "dora" in modes and {"peft-dora", "fused"} & set(modes):
            e = modes["dora"]
            lines.append(
                f"\nDoRA: {_ratio(e, 'speed_vs_peft-dora')} peft-DoRA's speed, {_ratio(e, 'memory_vs_peft-dora')} "
                f"its peak memory; step time {_inverse(e, 'speed_vs_fused')} deltatune's LoRA step"
            )
    lines += _format_quant(report, speed)
    for record in report["infer"]:
        base = record["base_ms"]
        cells = [f"{base:.2f}"] + [
            f"{record[key]:.2f} ({record[key] / base:.3f}x)"
            for key in ("unmerged_ms", "unmerged_plain_ms", "merged_ms")
        ]
        lines += [
            f"\ninference {record['shape']} (last-token logits, {'CPU ' if on_cpu else ''}ms, median):",
            "",
            "| base | unmerged (fused) | unmerged (plain) | merged |",
            "|---|---|---|---|",
            "| " + " | ".join(cells) + " |",
        ]
    for record in report["wrap"]:
        times = ", ".join(
            f"{key.removesuffix('_s')} {value:.2f} s" for key, value in record.items() if key.endswith("_s")
        )
        lines.append(f"\nwrap {record['shape']} on {record['device']}: {times}")
    for record in report["saved"]:
        modes = [key.removesuffix("_gib") for key in record if key.endswith("_gib")]
        floor = record.get("floor_gib")
        cells = [
            f"{record[f'{m}_gib']:.2f}" + (f" ({record[f'{m}_gib'] - floor:+.2f})" if floor is not None else "")
            for m in modes
        ]
        lines += [
            f"\nsaved for backward, {record['shape']} on meta (GiB; in brackets: minus the floor's, which "
            f"counts o_proj's input, a view on GPUs, in every LoRA mode):",
            "",
            "| " + " | ".join(modes) + " |",
            "|" + "---|" * len(modes),
            "| " + " | ".join(cells) + " |",
        ]
    return "\n".join(lines)


def _clock(report: dict) -> str:
    return "tokens_per_cpu_s" if report["settings"]["device"] == "cpu" else "tokens_per_s"


def _ratio(entry: dict, key: str) -> str:
    return f"{entry[key]:.2f}x" if key in entry else "-"


def _inverse(entry: dict, key: str) -> str:
    return f"{1 / entry[key]:.2f}x" if key in entry else "-"
