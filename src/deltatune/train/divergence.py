"""``DivergenceGuard``: stop a run whose loss or weights turn NaN/inf, with the adapter at its last good state.

A learning rate far too high, or an overflow in half precision, can make a run diverge: one step
writes inf or NaN into the trained weights, and every later loss is NaN. The Trainer keeps going
(and by default leaves NaN training losses out of its logged averages, so the log looks calm).
The guard, a ``TrainerCallback``::

    after every optimizer step   the trained parameters are all finite?       else: diverged
    at every log / evaluation    the logged loss / eval_loss are finite?      else: diverged
                                 and the parameters too -> remember them as the last good state
    diverged                     put the last good state back, stop training, skip this step's
                                 save and evaluation, and say so (``message``)

"Trained parameters" are those with ``requires_grad``: for a ``DeltaModel``, the adapters (and any
modules they save). The last good copy costs as much memory as they do, and is refreshed at each log.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import nn
from transformers import (
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

WATCHED = ("loss", "eval_loss")  # logged values that must stay finite


class DivergenceGuard(TrainerCallback):
    """Stops training at the first NaN/inf loss or weight and restores the last finite weights.

    ``message`` is None until the run diverges, then one line naming the step, what turned
    non-finite, the step whose weights were put back, and the fix; ``log`` is called with it.
    """

    def __init__(self, log: Callable[[str], None] = print) -> None:
        self.log = log
        self.message: str | None = None
        self._good: list[torch.Tensor] = []
        self._good_step = 0

    @property
    def diverged(self) -> bool:
        return self.message is not None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs
    ):
        self.message = None
        self._remember(model, state.global_step)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs):
        if not self.diverged and not _all_finite(_trained(model)):
            self._stop(args, state, control, model, "a trained weight is NaN or inf")
        return control

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, model=None, **kwargs
    ):
        if self.diverged:
            return control
        bad = _non_finite(logs or {})
        if bad:
            self._stop(args, state, control, model, f"{bad[0]} is {logs[bad[0]]}")
        elif _all_finite(_trained(model)):
            self._remember(model, state.global_step)
        else:
            self._stop(args, state, control, model, "a trained weight is NaN or inf")
        return control

    def _remember(self, model: nn.Module | None, step: int) -> None:
        self._good = [param.detach().clone() for param in _trained(model)]
        self._good_step = step

    def _stop(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model, what: str) -> None:
        with torch.no_grad():
            for param, good in zip(_trained(model), self._good):
                param.copy_(good)
        control.should_training_stop = True
        control.should_save = False
        control.should_evaluate = False
        self.message = (
            f"training diverged at step {state.global_step} ({what}): stopped, and the trained weights are back "
            f"at step {self._good_step}, the last with finite losses and weights; lower learning_rate "
            f"(now {args.learning_rate:g}) or raise warmup_steps (now {args.warmup_steps})"
        )
        self.log(self.message)


def _trained(model: nn.Module | None) -> list[nn.Parameter]:
    return [] if model is None else [param for param in model.parameters() if param.requires_grad]


def _all_finite(params: list[nn.Parameter]) -> bool:
    """Whether every entry of ``params`` is finite (one device synchronisation)."""
    if not params:
        return True
    return bool(torch.stack([torch.isfinite(param).all() for param in params]).all())


def _non_finite(logs: Mapping[str, float]) -> list[str]:
    """The ``WATCHED`` keys of ``logs`` whose value is NaN or inf."""
    return [key for key in WATCHED if isinstance(logs.get(key), (int, float)) and not math.isfinite(logs[key])]
