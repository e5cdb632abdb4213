"""SFT runs end to end on a tiny model: outputs, resume (bit-identical), early stopping, packing, TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deltatune.errors import ConfigError, DataError
from deltatune.train.config import TrainConfig
from deltatune.train.run import RunResult, run_training
from sft_helpers import TINY_RUN, save_tiny_chat_model, write_arithmetic_jsonl


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sft")
    return {
        "root": root,
        "model": save_tiny_chat_model(root / "model"),
        "data": write_arithmetic_jsonl(root / "d.jsonl"),
    }


def config(files: dict[str, Path], output: str, **keys) -> TrainConfig:
    values = {
        **TINY_RUN,
        "model": str(files["model"]),
        "data": str(files["data"]),
        "output_dir": str(files["root"] / output),
    }
    return TrainConfig.from_dict({**values, **keys})


@pytest.fixture(scope="module")
def full_run(files: dict[str, Path]) -> RunResult:
    """4 steps with a checkpoint every 2 (LoRA dropout on, so RNG state matters when resuming)."""
    return run_training(config(files, "full", save_steps=2, lora_dropout=0.1), log=lambda line: None)


def test_a_run_trains_saves_checks_and_reports(files, full_run: RunResult) -> None:
    out = files["root"] / "full"
    assert full_run.eval_loss_after < full_run.eval_loss_before
    assert full_run.steps == 4
    assert full_run.reloaded_max_logit_diff == 0.0
    assert full_run.merged_max_logit_diff is not None and full_run.merged_max_logit_diff < 1e-4
    assert full_run.sample_prompt.startswith("What is ")
    assert full_run.answer_after == full_run.answer_merged
    assert {p.name for p in (out / "adapter").iterdir()} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer_config.json",
    }
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    checkpoint = {p.name for p in (out / "checkpoints" / "checkpoint-2").iterdir()}
    assert checkpoint >= {
        "adapter_config.json",
        "adapter_model.safetensors",
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pth",
        "trainer_state.json",
        "tokenizer_config.json",
    }
    assert not any(name.startswith("model") for name in checkpoint)  # no copy of the base weights
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["method_options"] == {"r": 4, "lora_dropout": 0.1}
    assert metrics["data"] == {  # 8 of 40 prompts held out, 4 of them scored
        "train_records": 32,
        "train_examples": 32,
        "train_tokens": metrics["data"]["train_tokens"],
        "train_truncated": 0,
        "train_dropped": 0,
        "eval_records": 4,
        "eval_examples": 4,
        "eval_truncated": 0,
        "eval_dropped": 0,
    }
    assert metrics["result"]["eval_after"]["eval_loss"] == full_run.eval_loss_after
    history = metrics["log_history"]
    assert [e["step"] for e in history if "loss" in e] == [1, 2, 3, 4]
    assert [e["step"] for e in history if "eval_loss" in e] == [0, 4]
    assert history[0]["eval_loss"] == full_run.eval_loss_before


def test_resuming_gives_the_same_adapter_bit_for_bit(files, full_run: RunResult) -> None:
    checkpoint = files["root"] / "full" / "checkpoints" / "checkpoint-2"
    resumed = run_training(
        config(files, "resumed", lora_dropout=0.1, resume_from_checkpoint=str(checkpoint)), log=lambda line: None
    )
    assert resumed.steps == 4
    expected = load_file(files["root"] / "full" / "adapter" / "adapter_model.safetensors")
    got = load_file(files["root"] / "resumed" / "adapter" / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert resumed.eval_after == full_run.eval_after


def test_resume_last_needs_a_checkpoint(files) -> None:
    with pytest.raises(ConfigError, match="resume_from_checkpoint=last: no complete checkpoint in"):
        run_training(config(files, "nothing-here", resume_from_checkpoint="last"))
    with pytest.raises(ConfigError, match="is not a checkpoint folder"):
        run_training(config(files, "x", resume_from_checkpoint=str(files["root"])))


def test_early_stopping_packing_and_tensorboard(files) -> None:
    """alpha = 1e-6 makes every update invisible in fp32, so the eval loss never improves after the
    first evaluation: with patience 1 the run stops at step 2 and restores the best checkpoint."""
    result = run_training(
        config(
            files,
            "early",
            max_steps=10,
            eval_steps=1,
            early_stopping_patience=1,
            lora_alpha=1e-6,
            packing=True,
            tensorboard=True,
        ),
        log=lambda line: None,
    )
    out = files["root"] / "early"
    assert result.steps == 2
    history = json.loads((out / "metrics.json").read_text())["log_history"]
    assert [e["step"] for e in history if "eval_loss" in e] == [0, 1, 2, 2]
    assert any(path.name.startswith("events.out.tfevents") for path in (out / "tensorboard").iterdir())
    assert result.eval_loss_after == result.eval_loss_before


def test_data_and_stage_problems_stop_the_run_before_the_model_loads(files, monkeypatch) -> None:
    import deltatune.train.run as run_module

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(run_module, "load_model", no_model)
    bad = files["root"] / "bad.jsonl"
    bad.write_text('{"prompt": "q", "completion": "a"}\n{"prompt": "q", "completion": ""}\n', encoding="utf-8")
    with pytest.raises(DataError, match=f"^{bad}: row 2: column 'completion' is an empty completion$"):
        run_training(config(files, "bad", data=str(bad)))
    with pytest.raises(
        DataError,
        match="stage=dpo trains on preference data, but .* is sft data .*data=chatterbot-preference-synthetic",
    ):
        run_training(config(files, "bad", stage="dpo"))
    with pytest.raises(DataError, match="no training example is left after truncation to max_length=8"):
        run_training(config(files, "bad", max_length=8))
    with pytest.raises(ConfigError, match="is not a model folder"):
        run_training(config(files, "bad", model=str(files["root"] / "missing")))
