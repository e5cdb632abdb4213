"""A training progress bar showing loss, learning rate, tokens/s and the time left (tqdm's ETA)."""

from __future__ import annotations

import time

from tqdm.auto import tqdm
from transformers import TrainerCallback

# logged value -> its label in the bar (GRPO logs its reward, the reward's spread in a group and the KL)
LOGGED = (
    ("loss", "loss"),
    ("reward", "reward"),
    ("reward_std", "reward_std"),
    ("kl", "kl"),
    ("learning_rate", "lr"),
    ("eval_loss", "eval_loss"),
    ("eval_reward", "eval_reward"),
)


class ProgressBar(TrainerCallback):
    """Replaces transformers' ``ProgressCallback``: one bar over the optimizer steps, whose postfix
    holds the last logged loss (GRPO: reward) and learning rate and the tokens per second since the bar started
    (``num_input_tokens_seen``, so the Trainer must count tokens). Log lines are not printed.
    ``tokens_per_second`` keeps the last rate after training."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None
        self.postfix: dict[str, str] = {}
        self.tokens_per_second = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", dynamic_ncols=True)
            self.start = (time.perf_counter(), state.num_input_tokens_seen)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is None:
            return
        started, tokens = self.start
        elapsed = time.perf_counter() - started
        if elapsed > 0:
            self.tokens_per_second = (state.num_input_tokens_seen - tokens) / elapsed
            self.postfix["tok/s"] = f"{self.tokens_per_second:,.0f}"
        self.bar.set_postfix(self.postfix, refresh=False)
        self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs:
            for key, label in LOGGED:
                if key in logs:
                    self.postfix[label] = f"{logs[key]:.4g}"
            self.bar.set_postfix(self.postfix)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
