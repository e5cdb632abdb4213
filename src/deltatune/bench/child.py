"""Benchmark jobs in processes of their own, so that one side's allocations and threads cannot move another's
speed: ``python -m <module> [option] '<job as JSON>'`` runs the job and prints its result as one line
(``report``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from deltatune.runtime.threads import openmp_environment

RESULT_PREFIX = "BENCH_JOB_RESULT "


def run_in_child(module: str, job: dict, waits_as: str | None, option: str | None = None) -> dict:
    """``job`` run by ``python -m module [option] '<job>'`` in a fresh process whose idle OpenMP threads wait as
    command ``waits_as``'s do (``runtime.threads.openmp_environment``; None: as this process's environment says);
    its result dict."""
    env = None  # None: this process's environment
    if waits_as is not None:
        env = {key: value for key, value in os.environ.items() if key not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
        env.update(openmp_environment(waits_as, {}))
    command = [sys.executable, "-m", module, *([option] if option else []), json.dumps(job)]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{module} job {job} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


def report(result: dict) -> None:
    """Print a child's result as the line ``run_in_child`` reads."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)
