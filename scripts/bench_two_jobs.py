"""Two training runs at once: each one's slowdown against the same run alone (issue: a shared machine).

    .venv/bin/python scripts/bench_two_jobs.py [--steps 20] [--stagger 30] [key=value ...]

Runs ``deltatune train`` (the quick start, shortened: ``--steps`` steps, few held-out rows) alone, then
two copies started together, then two started 30 s apart, and prints each run's seconds per training step
and its slowdown. On a
machine with C cores, two runs sharing it can at best take 2x as long each; OpenMP threads that spin
while they wait make it far worse (10x was seen before deltatune chose its thread count from the CPUs
left free and watched them while training; ``threads.py`` has the measurements). Run it on an otherwise
quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _command(output_dir: Path, steps: int, extra: list[str]) -> list[str]:
    deltatune = Path(sys.executable).with_name("deltatune")
    return [
        str(deltatune),
        "train",
        f"max_steps={steps}",
        "eval_examples=8",
        "warmup_steps=0",
        f"output_dir={output_dir}",
        *extra,
    ]


def _step_seconds(output_dir: Path) -> float:
    result = json.loads((output_dir / "metrics.json").read_text(encoding="utf-8"))["result"]
    return result["train_seconds"] / result["steps"]


def run_together(folder: Path, names: list[str], steps: int, extra: list[str], stagger: float = 0.0) -> list[float]:
    """Start one ``deltatune train`` per name, ``stagger`` seconds apart; seconds per step of each."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
    }
    jobs = []
    for name in names:
        if jobs:
            time.sleep(stagger)
        jobs.append(
            subprocess.Popen(
                _command(folder / name, steps, extra),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
        )
    for name, job in zip(names, jobs):
        _, stderr = job.communicate()
        if job.returncode:
            raise SystemExit(f"{name} failed (exit {job.returncode}):\n{stderr[-2000:]}")
    return [_step_seconds(folder / name) for name in names]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--stagger", type=float, default=30.0, help="seconds between the staggered starts")
    parser.add_argument("settings", nargs="*", help="more key=value settings for deltatune train")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        started = time.perf_counter()
        (alone,) = run_together(folder, ["alone"], args.steps, args.settings)
        together = run_together(folder, ["first", "second"], args.steps, args.settings)
        staggered = run_together(folder, ["earlier", "later"], args.steps, args.settings, args.stagger)
    print(f"{os.cpu_count()} CPUs, {args.steps} steps per run, {time.perf_counter() - started:.0f} s in all")
    print(f"alone:    {alone:.2f} s/step")
    for name, seconds in [*zip(("first", "second"), together), *zip(("earlier", "later"), staggered)]:
        print(f"{name + ':':<9} {seconds:.2f} s/step, {seconds / alone:.2f}x the run alone")
    return 0


if __name__ == "__main__":
    sys.exit(main())
