"""Sweep settings of `deltatune train` on the embedded default; print the held-out loss of each as a table.

    .venv/bin/python scripts/sweep_defaults.py method=p_tuning --vary num_virtual_tokens=10,20,40 [--jobs 2]
    .venv/bin/python scripts/sweep_defaults.py method=prefix_tuning --vary warmup_steps=0,5,15 max_steps=60

Every combination of the ``--vary`` values is one `deltatune train` run with the fixed key=value settings
(default budget: ``max_steps=30 eval_examples=48``, the same split and seed in every run). ``--jobs N``
runs N at once, one CPU thread each (the held-out loss does not depend on it; the times then do, so
none is printed). Each run's output folder is kept under outputs/sweeps/, and the table is appended to
outputs/sweeps/results.md; the methods' defaults (their config classes' train_defaults and run_defaults)
were chosen from tables written this way (docs/methods.md).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGET = {"max_steps": "30", "eval_examples": "48"}


def _pairs(items: list[str]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in items)


def train(settings: dict[str, str], out: Path, one_thread: bool) -> dict:
    """One `deltatune train` run; its metrics.json result."""
    env = {**os.environ, **({"OMP_NUM_THREADS": "1"} if one_thread else {})}
    args = [
        sys.executable,
        "-m",
        "deltatune.cli.main",
        "train",
        *(f"{k}={v}" for k, v in settings.items()),
        f"output_dir={out}",
    ]
    done = subprocess.run(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        raise SystemExit(f"{settings} failed:\n{done.stderr[-2000:]}")
    return json.loads((out / "metrics.json").read_text(encoding="utf-8"))["result"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("settings", nargs="*", help="fixed key=value settings (method=... first)")
    parser.add_argument("--vary", action="append", default=[], help="key=v1,v2,...: the values to try")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (one CPU thread each when above 1)")
    args = parser.parse_args()
    fixed = {**BUDGET, **_pairs(args.settings)}
    varied = {key: values.split(",") for key, values in _pairs(args.vary).items()}
    combos = [dict(zip(varied, values)) for values in itertools.product(*varied.values())]
    label = "-".join([fixed.get("method", "lora"), *varied])
    folder = ROOT / "outputs" / "sweeps" / label

    def one(combo: dict[str, str]) -> tuple[dict[str, str], dict]:
        name = "-".join(f"{k}={v}" for k, v in combo.items())
        return combo, train({**fixed, **combo}, folder / name, args.jobs > 1)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(one, combos))
    lines = [
        f"`{' '.join(f'{k}={v}' for k, v in fixed.items())}`",
        "",
        f"| {' | '.join(varied)} | held-out loss: base -> end | gain |",
        "|---" * (len(varied) + 2) + "|",
    ]
    for combo, result in results:
        before, after = result["eval_before"]["eval_loss"], result["eval_after"]["eval_loss"]
        lines.append(f"| {' | '.join(combo.values())} | {before:.3f} -> {after:.3f} | {before - after:.3f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    with (ROOT / "outputs" / "sweeps" / "results.md").open("a", encoding="utf-8") as handle:
        handle.write(table + "\n")


if __name__ == "__main__":
    main()
