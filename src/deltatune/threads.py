"""How many CPU threads a training run uses: the CPUs this process may use, less those others keep busy.

    free = allowed CPUs - CPUs busy with other work (measured now), at least 1

On a shared machine more threads than free CPUs do not add speed: they wait on each other and steal
the CPU time the other jobs need, which turns a 2x slowdown into 10x. Busy CPUs are measured over a
quarter of a second from ``/proc/stat`` (the 1-minute load average would still count, for a minute,
an install that has just finished), with the load average as the fallback where there is no
``/proc/stat``. ``choose_threads`` is a pure function of the numbers.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class ThreadChoice:
    """The thread count, and the one-line reason when the machine is busy (``None`` when it is not)."""

    threads: int
    notice: str | None = None


def choose_threads(requested: int, cpus: int, busy: float) -> ThreadChoice:
    """``requested`` threads when set (> 0); else the CPUs that ``busy`` (CPUs other work keeps busy) leaves free."""
    if requested > 0:
        return ThreadChoice(requested)
    free = max(1, min(cpus, int(cpus - max(0.0, busy) + 0.5)))
    if free == cpus:
        return ThreadChoice(cpus)
    return ThreadChoice(free, f"{free} of {cpus} CPU threads: other processes keep {busy:.1f} CPUs busy; "
                              f"set threads=N to choose")  # fmt: skip


def available_cpus() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def busy_cpus(interval: float = 0.25) -> float:
    """How many CPUs other processes keep busy now (this process is idle while it measures)."""
    try:
        first = _cpu_times()
        time.sleep(interval)
        second = _cpu_times()
    except (OSError, ValueError, IndexError):
        try:
            return os.getloadavg()[0]
        except (AttributeError, OSError):
            return 0.0
    total, idle = second[0] - first[0], second[1] - first[1]
    return 0.0 if total <= 0 else (total - idle) / total * (os.cpu_count() or 1)


def _cpu_times() -> tuple[int, int]:
    """(all, idle) jiffies of the machine's CPUs, from the first line of ``/proc/stat``."""
    with open("/proc/stat", encoding="ascii") as handle:
        fields = [int(value) for value in handle.readline().split()[1:]]
    return sum(fields[:8]), fields[3] + fields[4]  # user nice system idle iowait irq softirq steal
