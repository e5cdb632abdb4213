"""The CPU thread policy: the CPUs other work leaves free, at least 1, a notice only when busy; the
busy-CPU measurement itself; how idle OpenMP threads wait; and the watcher that re-chooses while training."""

import os
import subprocess
import sys
import time

import pytest
import torch

from deltatune.runtime.threads import (
    DECODE_SPIN_COUNT,
    TRAIN_SPIN_COUNT,
    ThreadWatcher,
    busy_cpus,
    choose_threads,
    openmp_environment,
    others_busy,
)
from deltatune.train.thread_watch import ThreadWatch


def test_quiet_machine_uses_every_cpu_without_notice():
    assert choose_threads(0, cpus=8, busy=0.3).threads == 8
    assert choose_threads(0, cpus=8, busy=0.3).notice is None


def test_busy_machine_uses_the_free_cpus_and_says_why():
    choice = choose_threads(0, cpus=2, busy=1.0)
    assert choice.threads == 1
    assert "busy" in choice.notice and "1.0" in choice.notice and "threads=" in choice.notice


def test_overloaded_machine_keeps_one_thread():
    assert choose_threads(0, cpus=2, busy=9.0).threads == 1


def test_explicit_threads_win():
    assert choose_threads(3, cpus=2, busy=9.0).threads == 3
    assert choose_threads(3, cpus=2, busy=9.0).notice is None


@pytest.mark.subprocess
def test_a_spinning_process_counts_as_one_busy_cpu():
    """A child that spins for a second is measured as (about) one busy CPU, on top of what was busy before."""
    before = busy_cpus(0.3)
    spinner = subprocess.Popen(
        [sys.executable, "-c", "import time\nend = time.time() + 2\nwhile time.time() < end: pass"]
    )
    try:
        time.sleep(0.3)  # let it start
        during = busy_cpus(0.5)
    finally:
        spinner.wait()
    assert during - before > 0.6, (before, during)


def test_train_spins_briefly_decoding_spins_longer_and_other_commands_sleep_unless_the_user_chose():
    assert openmp_environment("train", {}) == {"GOMP_SPINCOUNT": str(TRAIN_SPIN_COUNT)}
    for command in ("serve", "generate", "chat", "bench --serve"):
        assert openmp_environment(command, {}) == {"GOMP_SPINCOUNT": str(DECODE_SPIN_COUNT)}
    assert openmp_environment("merge", {}) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert openmp_environment("bench", {}) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert openmp_environment(None, {}) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert openmp_environment("train", {"OMP_WAIT_POLICY": "PASSIVE"}) == {}
    assert openmp_environment("chat", {"GOMP_SPINCOUNT": "0"}) == {}


def test_others_busy_is_the_machine_less_this_process():
    assert others_busy(machine_busy=2.0, own_cpu_seconds=9.0, seconds=5.0) == pytest.approx(0.2)
    assert others_busy(machine_busy=1.0, own_cpu_seconds=9.0, seconds=5.0) == 0.0  # never below zero
    assert others_busy(machine_busy=1.0, own_cpu_seconds=0.0, seconds=0.0) == 0.0


class _Replayed(ThreadWatcher):
    """A watcher over given samples: (wall s, own CPU s, machine busy CPUs since the last sample)."""

    def __init__(self, samples, threads=2, cpus=2):
        self.samples, self.jiffies = iter(samples), [0, 0]
        super().__init__(threads, cpus, interval=5.0)

    def _sample(self):
        wall, own, busy = next(self.samples)
        self.jiffies = [self.jiffies[0] + 100, self.jiffies[1] + round(100 * (1 - busy / (os.cpu_count() or 1)))]
        return wall, own, tuple(self.jiffies)


def test_watcher_changes_threads_on_two_agreeing_measurements_only():
    cpus = os.cpu_count() or 1
    watcher = _Replayed(
        [
            (0, 0, 0),
            (2, 3.8, 2.0),
            (5, 9.5, 2.0),  # too soon; then alone: no change
            (10, 14.5, min(cpus, 2.0)),
            (15, 19.5, min(cpus, 2.0)),  # 1 CPU used by another, twice
            (20, 24.5, min(cpus, 2.0)),  # now on 1 thread, still shared: nothing new
            (25, 29.5, 1.0),
            (30, 34.5, 2.0),
            (35, 39.5, 1.0),
            (40, 44.5, 1.0),
        ]
    )
    assert watcher.check() is None  # 2 s: below the interval, not measured
    assert watcher.check() is None  # alone
    assert watcher.check() is None and watcher.pending == 1  # another job: wait for a second look
    choice = watcher.check()
    assert choice.threads == 1 and "busy" in choice.notice and watcher.threads == 1
    assert watcher.check() is None
    assert watcher.check() is None and watcher.pending == 2  # quiet once ...
    assert watcher.check() is None and watcher.pending is None  # ... but busy again: no flapping
    assert watcher.check() is None and watcher.pending == 2
    choice = watcher.check()
    assert choice.threads == 2 and choice.notice is None and watcher.threads == 2


@pytest.mark.subprocess
def test_watcher_sees_a_spinning_process_on_the_real_machine():
    """Two CPUs, one of them taken by a spinning child: the watcher moves to one thread."""
    spinner = subprocess.Popen(
        [sys.executable, "-c", "import time\nend = time.time() + 4\nwhile time.time() < end: pass"]
    )
    try:
        time.sleep(0.3)
        watcher = ThreadWatcher(threads=2, cpus=2, interval=0.4)
        choices = []
        for _ in range(6):
            time.sleep(0.45)
            choices.append(watcher.check())
    finally:
        spinner.wait()
    assert watcher.threads == 1, choices


def test_thread_watch_callback_sets_torch_threads_and_says_so():
    class Fixed:
        def check(self):
            return choose_threads(0, cpus=2, busy=1.0)

    lines, before = [], torch.get_num_threads()
    try:
        ThreadWatch(Fixed(), log=lines.append).on_step_end(None, None, None)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert lines == ["threads: 1 of 2 CPU threads: other processes keep 1.0 CPUs busy; set threads=N to choose"]
