"""Each data shape people pass around trains for a few steps on the embedded SmolLM2, and the adapter it
writes names the base by its hub id (portable), which loads back offline to the embedded copy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_shapes import (
    chat_rows,
    dataset_info,
    kto_message_rows,
    sharegpt_preference_rows,
    sharegpt_tool_rows,
    trl_tool_rows,
    write_rows,
)
from deltatune.runtime.assets import SMOLLM2_HUB_ID, smollm2_path
from deltatune.saved import load_adapted
from deltatune.train.config import TrainConfig
from deltatune.train.run import run_training
from sft_helpers import TINY_RUN, save_tiny_chat_model, write_arithmetic_jsonl

QUICK = {
    "max_steps": 2,
    "batch_size": 2,
    "max_length": 64,
    "eval_examples": 2,
    "eval_fraction": 0.25,
    "warmup_steps": 0,
    "r": 2,
    "target_modules": "q_proj,v_proj",
}


def train(tmp_path: Path, data: str, **keys) -> tuple[dict, list[str]]:
    """A two-step run on the embedded model: (metrics.json, the log lines)."""
    lines: list[str] = []
    config = TrainConfig.from_dict({**QUICK, "data": data, "output_dir": str(tmp_path / "out"), **keys})
    result = run_training(config, log=lines.append)
    assert result.steps == 2 and result.reloaded_max_logit_diff == 0.0
    return json.loads((tmp_path / "out" / "metrics.json").read_text()), lines


def adapter_base(tmp_path: Path) -> str:
    return json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]


@pytest.mark.slow
@pytest.mark.parametrize("rows", [trl_tool_rows, sharegpt_tool_rows], ids=["trl", "sharegpt"])
def test_tool_calls_train(tmp_path: Path, rows) -> None:
    metrics, _ = train(tmp_path, str(write_rows(tmp_path / "tools.jsonl", rows())), max_length=256)
    assert metrics["data"]["train_records"] == 6 and metrics["data"]["train_truncated"] == 0
    assert adapter_base(tmp_path) == SMOLLM2_HUB_ID


@pytest.mark.slow
def test_sharegpt_preference_trains_dpo(tmp_path: Path) -> None:
    metrics, _ = train(tmp_path, str(write_rows(tmp_path / "pref.json", sharegpt_preference_rows())), stage="dpo")
    assert metrics["data"]["train_records"] == 6
    assert "eval_rewards/accuracies" in metrics["result"]["eval_after"]


@pytest.mark.slow
def test_kto_messages_with_a_label_train_kto(tmp_path: Path) -> None:
    metrics, _ = train(tmp_path, str(write_rows(tmp_path / "kto.jsonl", kto_message_rows("kto_tag"))), stage="kto")
    assert metrics["data"]["train_records"] == 6 and metrics["result"]["stage"] == "kto"


@pytest.mark.slow
def test_a_dataset_info_entry_with_mapped_columns_trains(tmp_path: Path) -> None:
    info = dataset_info(tmp_path)
    metrics, _ = train(tmp_path, f"{info}#qa", ignore_columns="id")
    assert metrics["data"]["train_records"] == 6


@pytest.mark.slow
def test_two_mixed_datasets_train_with_the_documented_counts(tmp_path: Path) -> None:
    """8 + 40 rows, 12 prompts held out: weights 1,1 give each source half of the 36 training rows."""
    a = write_rows(tmp_path / "a.jsonl", chat_rows())
    b = write_arithmetic_jsonl(tmp_path / "b.jsonl", n=40)
    metrics, lines = train(tmp_path, f"{a},{b}", data_weights="1,1")
    sources = metrics["data"]["sources"]
    assert sum(s["rows"] for s in sources.values()) == 36 and metrics["data"]["train_records"] == 36
    assert [s["used"] for s in sources.values()] == [18, 18]
    assert any(line.startswith(f"data: {a}: ") and "repeated" in line for line in lines), lines
    assert any(line.startswith(f"data: {b}: ") and "unused" in line for line in lines), lines


def test_a_local_model_folder_is_recorded_as_given_and_the_hub_id_loads_offline(tmp_path: Path, monkeypatch) -> None:
    model = save_tiny_chat_model(tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    data = write_arithmetic_jsonl(tmp_path / "d.jsonl")
    config = TrainConfig.from_dict(
        {**TINY_RUN, "max_steps": 1, "model": "model", "data": str(data), "output_dir": "out"}
    )
    run_training(config, log=lambda line: None)
    assert adapter_base(tmp_path) == "model"
    assert load_adapted(tmp_path / "out" / "adapter")[1] == model.relative_to(tmp_path)


@pytest.mark.slow
def test_an_adapter_naming_the_hub_id_loads_on_the_embedded_copy(tmp_path: Path) -> None:
    from deltatune import LoraConfig, get_delta_model
    from deltatune.runtime.assets import load_smollm2

    base, _ = load_smollm2()
    get_delta_model(
        base, LoraConfig(r=2, target_modules=["q_proj"], base_model_name_or_path=SMOLLM2_HUB_ID)
    ).save_pretrained(tmp_path / "adapter")
    assert load_adapted(tmp_path / "adapter")[1] == smollm2_path()
