"""The CPU thread policy: the CPUs other work leaves free, at least 1, a notice only when busy; and the
busy-CPU measurement itself."""

import subprocess
import sys
import time

from deltatune.threads import busy_cpus, choose_threads


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


def test_a_spinning_process_counts_as_one_busy_cpu():
    """A child that spins for a second is measured as (about) one busy CPU, on top of what was busy before."""
    before = busy_cpus(0.3)
    spinner = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 2\nwhile time.time() < end: pass"])
    try:
        time.sleep(0.3)  # let it start
        during = busy_cpus(0.5)
    finally:
        spinner.wait()
    assert during - before > 0.6, (before, during)
