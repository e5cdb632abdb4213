"""``DivergenceGuard``: a run whose loss or weights turn NaN/inf stops with a message, and the adapter is the
last finite one; without the guard the same run ends with NaN weights."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import TrainerControl, TrainerState, TrainingArguments

import deltatune
from deltatune.train.divergence import DivergenceGuard
from deltatune.train.trainer import DeltaTrainer
from tiny_models import VOCAB, tiny_llama

STEPS = 8
ROWS = torch.randint(2, VOCAB, (8, 12), generator=torch.Generator().manual_seed(0))


def lora_model() -> deltatune.DeltaModel:
    return deltatune.get_delta_model(tiny_llama(), deltatune.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))


def adapter(model: deltatune.DeltaModel) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.adapter_state("default").items()}


def train(model: deltatune.DeltaModel, tmp_path, learning_rate: float, callbacks=()) -> DeltaTrainer:
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=4,
        max_steps=STEPS,
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    examples = [{"input_ids": row, "labels": row} for row in ROWS]
    trainer = DeltaTrainer(
        model=model,
        args=args,
        train_dataset=examples,
        callbacks=list(callbacks),
        data_collator=lambda rows: {key: torch.stack([row[key] for row in rows]) for key in rows[0]},
    )
    trainer.train()
    return trainer


def all_finite(weights: dict[str, torch.Tensor]) -> bool:
    return all(torch.isfinite(w).all() for w in weights.values())


def test_an_absurd_learning_rate_stops_the_run_with_the_last_good_adapter(tmp_path):
    unguarded = lora_model()
    train(unguarded, tmp_path / "unguarded", learning_rate=1e38)
    assert not all_finite(adapter(unguarded)), "the scenario must really diverge"

    model, messages = lora_model(), []
    guard = DivergenceGuard(log=messages.append)
    trainer = train(model, tmp_path / "guarded", learning_rate=1e38, callbacks=[guard])
    assert trainer.state.global_step < STEPS
    assert guard.diverged and messages == [guard.message]
    assert f"training diverged at step {trainer.state.global_step}" in guard.message
    assert "lower learning_rate (now 1e+38)" in guard.message
    weights = adapter(model)
    assert all_finite(weights)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = deltatune.DeltaModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    with torch.no_grad():
        assert math.isfinite(reloaded(input_ids=ROWS, labels=ROWS).loss.item())


def test_a_sane_learning_rate_is_left_alone(tmp_path):
    model, messages = lora_model(), []
    guard = DivergenceGuard(log=messages.append)
    trainer = train(model, tmp_path, learning_rate=1e-2, callbacks=[guard])
    assert trainer.state.global_step == STEPS and not guard.diverged and messages == []


@pytest.mark.parametrize("logs", [{"eval_loss": math.nan}, {"loss": math.inf}])
def test_a_non_finite_logged_loss_puts_back_the_weights_of_the_last_good_log(logs):
    model = lora_model()
    guard = DivergenceGuard(log=lambda message: None)
    args = TrainingArguments(output_dir="unused", learning_rate=3e-4, warmup_steps=2, report_to=[], use_cpu=True)
    state, control = TrainerState(), TrainerControl()
    guard.on_train_begin(args, state, control, model=model)
    state.global_step = 10
    with torch.no_grad():
        for param in model.adapter_state("default").values():
            param.add_(1.0)
    good = adapter(model)
    guard.on_log(args, state, control, logs={"loss": 2.0}, model=model)  # a good log remembers these weights
    state.global_step = 20
    with torch.no_grad():
        for param in model.adapter_state("default").values():
            param.mul_(3.0)
    guard.on_log(args, state, control, logs=logs, model=model)
    assert control.should_training_stop and not control.should_save and not control.should_evaluate
    assert adapter(model).keys() == good.keys()
    assert all(torch.equal(adapter(model)[name], good[name]) for name in good)
    key = next(iter(logs))
    assert guard.message.startswith(f"training diverged at step 20 ({key} is {logs[key]})")
    assert "back at step 10" in guard.message and "raise warmup_steps (now 2)" in guard.message


def test_deltatune_train_runs_the_guard_and_reports_it(tmp_path):
    from deltatune.train.config import TrainConfig
    from deltatune.train.run import run_training
    from sft_helpers import TINY_RUN, save_tiny_chat_model, write_arithmetic_jsonl

    model, data = save_tiny_chat_model(tmp_path / "model"), write_arithmetic_jsonl(tmp_path / "d.jsonl")
    config = TrainConfig.from_dict(
        {**TINY_RUN, "model": str(model), "data": str(data), "learning_rate": 1e38, "output_dir": str(tmp_path / "run")}
    )
    lines: list[str] = []
    result = run_training(config, log=lines.append)
    assert result.diverged and result.diverged in lines and "learning_rate" in result.diverged
    assert result.steps < TINY_RUN["max_steps"] and math.isfinite(result.eval_loss_after)


def test_prompt_methods_default_to_their_measured_settings():
    """The settings docs/methods.md's sweeps chose (a user's value wins)."""
    from deltatune.train.config import TrainConfig

    assert TrainConfig.from_dict({"method": "prefix_tuning"}).learning_rate == 1e-2
    assert TrainConfig.from_dict({"method": "prefix_tuning", "learning_rate": 3e-4}).learning_rate == 3e-4
    assert TrainConfig.from_dict({}).learning_rate == 1e-3
    assert TrainConfig.from_dict({"method": "p_tuning"}).delta_config().prompt_tuning_init == "TEXT"
    assert TrainConfig.from_dict({"method": "p_tuning"}).warmup_steps == 15
    assert TrainConfig.from_dict({"method": "p_tuning", "max_steps": 12}).warmup_steps == 3  # a quarter at most
    assert TrainConfig.from_dict({"method": "p_tuning", "max_steps": 0, "epochs": 1}).warmup_steps == 15
    assert TrainConfig.from_dict({"method": "p_tuning", "warmup_steps": 2}).warmup_steps == 2
    assert TrainConfig.from_dict({"method": "prefix_tuning"}).warmup_steps == 5
    assert TrainConfig.from_dict({"method": "prompt_tuning"}).delta_config().num_virtual_tokens == 40
