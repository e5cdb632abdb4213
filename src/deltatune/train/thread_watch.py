"""A training callback that keeps the CPU thread count at the CPUs other processes leave free.

The command line chooses the threads when a run starts (``threads.choose_threads``); this callback
asks ``threads.ThreadWatcher`` again after optimizer steps, so that a run started on a quiet machine
gives a CPU back when another job arrives (and takes it back when that job ends), with one log line
each time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import TrainerCallback

from deltatune.runtime.threads import ThreadWatcher


class ThreadWatch(TrainerCallback):
    """``torch.set_num_threads`` to the watcher's new count whenever it changes."""

    def __init__(self, watcher: ThreadWatcher, log: Callable[[str], None]) -> None:
        self.watcher, self.log = watcher, log

    def on_step_end(self, args, state, control, **kwargs):
        if (choice := self.watcher.check()) is not None:
            torch.set_num_threads(choice.threads)
            self.log(
                f"threads: {choice.notice or f'back to all {choice.threads} CPU threads: the machine is quiet again'}"
            )
