"""How many CPU threads a training run uses: the CPUs this process may use, less those others keep busy.

    free = allowed CPUs - CPUs busy with other work (measured now), at least 1

On a shared machine more threads than free CPUs do not add speed: they wait on each other and steal
the CPU time the other jobs need, which turns a 2x slowdown into 10x. Busy CPUs are measured over a
quarter of a second from ``/proc/stat`` (the 1-minute load average would still count, for a minute,
an install that has just finished), with the load average as the fallback where there is no
``/proc/stat``. ``choose_threads`` is a pure function of the numbers.

How idle OpenMP threads wait is the other half (``openmp_environment``, set before torch loads).
Spinning on a free CPU wakes a thread in microseconds, where sleeping costs a system call per
parallel region: on the quick start (2 cores) a training step takes 2.40 s with a short spin and
2.81 s asleep. But two processes whose threads spin on the same CPUs wait for each other's
time slices (two quick starts at once: 3.4x slower each, against 1.5x asleep). So ``train`` spins
briefly and ``ThreadWatcher`` re-measures while it runs: when other work takes CPUs, the run drops
to the threads left free (one thread has no team to wait for, so nothing spins), and takes them
back when they are free again. The commands that decode token by token (``serve``, ``generate``, ``chat``,
and ``bench --serve``, which measures ``serve``) spin as long as libgomp does by default (~3 ms): a decoding
step is hundreds of small products with Python between them, longer than train's short spin, and asleep
16 requests over SmolLM2 step at ~300 ms against ~200 ms spinning. The other commands sleep.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass

# libgomp's busy-wait before an idle thread sleeps: ~0.1 ms here (the default 300,000 is ~3 ms, ACTIVE forever).
TRAIN_SPIN_COUNT = 10_000
DECODE_SPIN_COUNT = 300_000  # libgomp's own default, ~3 ms
DECODE_COMMANDS = frozenset({"serve", "generate", "chat", "bench --serve"})
_OPENMP_WAIT_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


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
    return ThreadChoice(
        free, f"{free} of {cpus} CPU threads: other processes keep {busy:.1f} CPUs busy; set threads=N to choose"
    )


def available_cpus() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def busy_cpus(interval: float = 0.25) -> float:
    """How many CPUs other processes keep busy now (this process is idle while it measures)."""
    try:
        first = _cpu_times()
        time.sleep(interval)
        return _busy_between(first, _cpu_times())
    except (OSError, ValueError, IndexError):
        try:
            return os.getloadavg()[0]
        except (AttributeError, OSError):
            return 0.0


def _busy_between(first: tuple[int, int], second: tuple[int, int]) -> float:
    """The machine's busy CPUs between two ``_cpu_times`` samples."""
    total, idle = second[0] - first[0], second[1] - first[1]
    return 0.0 if total <= 0 else (total - idle) / total * (os.cpu_count() or 1)


def _cpu_times() -> tuple[int, int]:
    """(all, idle) jiffies of the machine's CPUs, from the first line of ``/proc/stat``."""
    with open("/proc/stat", encoding="ascii") as handle:
        fields = [int(value) for value in handle.readline().split()[1:]]
    return sum(fields[:8]), fields[3] + fields[4]  # user nice system idle iowait irq softirq steal


def openmp_environment(command: str | None, environ: Mapping[str, str]) -> dict[str, str]:
    """The OpenMP wait settings to add before torch loads: a short spin for ``train`` (which watches
    the machine and drops threads when it is shared), a longer one for the ``DECODE_COMMANDS``, sleep
    for every other command; nothing when the user has set either key."""
    if any(key in environ for key in _OPENMP_WAIT_KEYS):
        return {}
    if command == "train":
        return {"GOMP_SPINCOUNT": str(TRAIN_SPIN_COUNT)}
    if command in DECODE_COMMANDS:
        return {"GOMP_SPINCOUNT": str(DECODE_SPIN_COUNT)}
    return {"OMP_WAIT_POLICY": "PASSIVE"}


def others_busy(machine_busy: float, own_cpu_seconds: float, seconds: float) -> float:
    """CPUs kept busy by other processes over ``seconds``: the machine's busy CPUs less this process's share."""
    return 0.0 if seconds <= 0 else max(0.0, machine_busy - own_cpu_seconds / seconds)


class ThreadWatcher:
    """Re-chooses the thread count from the CPUs other processes keep busy, measured over the time
    between calls (at least ``interval`` seconds, so short steps do not make it noisy). A new count is
    returned only when two measurements in a row agree on it, so one burst of other work changes nothing."""

    def __init__(self, threads: int, cpus: int, interval: float = 5.0) -> None:
        """Raises OSError where the machine has no ``/proc/stat`` to measure."""
        self.threads, self.cpus, self.interval = threads, cpus, interval
        self.pending: int | None = None
        self._mark = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, tuple[int, int]]:
        """(wall seconds, this process's CPU seconds, the machine's jiffies) now."""
        return time.perf_counter(), time.process_time(), _cpu_times()

    def check(self) -> ThreadChoice | None:
        """The new choice when the count changes (``threads`` then holds it), else None."""
        now = self._sample()
        seconds = now[0] - self._mark[0]
        if seconds < self.interval:
            return None
        own = now[1] - self._mark[1]
        busy = others_busy(_busy_between(self._mark[2], now[2]), own, seconds)
        self._mark = now
        wanted = choose_threads(0, self.cpus, busy)
        if wanted.threads == self.threads:
            self.pending = None
            return None
        if self.pending != wanted.threads:  # the first measurement of a change: wait for a second
            self.pending = wanted.threads
            return None
        self.threads, self.pending = wanted.threads, None
        return wanted
