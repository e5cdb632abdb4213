"""stage=orpo, simpo and rm end to end on the tiny chat model: every preference format DPO reads, the same
encoding and counts as DPO, metrics.json reporting what each stage optimises, and a reward model that
scores as a reward function and under `deltatune eval`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from deltatune.cli.main import main
from deltatune.data import load_sources
from deltatune.errors import ConfigError, DataError
from deltatune.train.config import TrainConfig
from deltatune.train.reward_model import load_reward_function
from deltatune.train.run import run_training
from deltatune.train.stages import STAGES
from sft_helpers import TINY_RUN, save_tiny_chat_model

QUESTIONS = [f"What is {i} plus {i}?" for i in range(30)]


def rows(layout: str, margin: bool = False) -> list[dict]:
    """Pairs "What is i plus i?" -> chosen "It is 2i.", rejected "It is 2i+1." in one of three layouts."""
    out = []
    for i, question in enumerate(QUESTIONS):
        chosen, rejected = f"It is {2 * i}.", f"It is {2 * i + 1}, I think."
        if layout == "preference":
            row = {"prompt": question, "chosen": chosen, "rejected": rejected}
        elif layout == "alpaca_preference":
            row = {"instruction": question, "chosen": chosen, "rejected": rejected}
        else:
            row = {
                "conversations": [{"from": "human", "value": question}],
                "chosen": {"from": "gpt", "value": chosen},
                "rejected": {"from": "gpt", "value": rejected},
            }
        out.append({**row, "margin": i % 3} if margin else row)
    return out


def write(folder: Path, layout: str, margin: bool = False) -> str:
    """The rows as JSON under a LLaMA-Factory dataset_info.json entry; returns the data spec."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{layout}.json").write_text(json.dumps(rows(layout, margin)), encoding="utf-8")
    entry = {"file_name": f"{layout}.json", "ranking": True}
    if layout == "sharegpt_preference":
        entry.update(formatting="sharegpt", columns={"messages": "conversations"})
    (folder / "dataset_info.json").write_text(json.dumps({"pairs": entry}), encoding="utf-8")
    return f"{folder / 'dataset_info.json'}#pairs"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_chat_model(tmp_path_factory.mktemp("model"))


@pytest.mark.parametrize("layout", ["preference", "alpaca_preference", "sharegpt_preference"])
def test_every_pair_stage_encodes_every_format_as_dpo_does(tmp_path, tiny_model, layout) -> None:
    spec = write(tmp_path, layout)
    records = load_sources(spec, "auto", "", [])[0].records
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    config = TrainConfig(max_length=14, stage="dpo")  # short enough to cut prompts from the left
    dpo = STAGES["dpo"].encode(tokenizer, records, config)
    assert dpo.reasons["prompt cut from the left"] > 0
    for stage in ("orpo", "simpo", "rm"):
        encoded = STAGES[stage].encode(tokenizer, records, TrainConfig(max_length=14, stage=stage))
        assert (encoded.examples, encoded.reasons, encoded.n_truncated) == (dpo.examples, dpo.reasons, dpo.n_truncated)


def run(tmp_path: Path, model: Path, stage: str, data: str, **keys) -> dict:
    config = TrainConfig.from_dict(
        {**TINY_RUN, "model": str(model), "data": data, "stage": stage, "output_dir": str(tmp_path / stage), **keys}
    )
    run_training(config, log=lambda *_: None)
    return json.loads((tmp_path / stage / "metrics.json").read_text())


@pytest.mark.parametrize(("stage", "logged"), [("orpo", {"nll_loss", "log_odds_ratio"}), ("simpo", set())])
def test_reference_free_stages_report_rewards_and_accuracy(tmp_path, tiny_model, stage, logged) -> None:
    metrics = run(tmp_path, tiny_model, stage, write(tmp_path / "data", "alpaca_preference"))
    result = metrics["result"]
    for when in ("eval_before", "eval_after"):
        assert {"eval_rewards/accuracies", "eval_rewards/margins", "eval_loss"} <= set(result[when])
    train_logs = [entry for entry in metrics["log_history"] if "loss" in entry]
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", *logged} <= set(
        train_logs[0]
    )
    assert result["samples"] and result["reloaded_max_logit_diff"] < 1e-4


def test_a_reward_model_trains_scores_and_evaluates(tmp_path, tiny_model, capsys) -> None:
    data = write(tmp_path / "data", "sharegpt_preference", margin=True)
    metrics = run(tmp_path, tiny_model, "rm", data, max_steps=12)
    result = metrics["result"]
    assert result["eval_after"]["eval_rewards/accuracies"] > result["eval_before"]["eval_rewards/accuracies"]
    assert result["samples"] == [] and result["reloaded_max_logit_diff"] < 1e-4
    adapter = Path(result["adapter_dir"])
    assert json.loads((adapter / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"

    reward = load_reward_function(adapter, batch_size=2)
    texts = reward([QUESTIONS[3]] * 2, ["It is 6.", "It is 7, I think."])
    chat = reward(
        [[{"role": "user", "content": QUESTIONS[3]}]] * 2, [[{"role": "assistant", "content": "It is 6."}]] * 2
    )
    assert texts[0] > texts[1] and chat == pytest.approx([texts[0]] * 2, abs=1e-5)
    alone = load_reward_function(adapter, batch_size=1)([QUESTIONS[3]] * 2, ["It is 6.", "It is 7, I think."])
    assert alone == pytest.approx(texts, abs=1e-4)  # the padded batch scores each row as alone
    with pytest.raises(DataError, match="2 prompts but 1 completions"):
        reward([QUESTIONS[3]] * 2, ["It is 6."])

    assert main(["eval", "--adapter", str(adapter), "--data", data.replace("#pairs", "") + "#pairs"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    accuracy = float(line.split("pairwise accuracy ")[1].split(",")[0])
    assert accuracy > 0.5, line


def test_margins_are_read_by_the_reward_model_only(tmp_path, tiny_model) -> None:
    data = write(tmp_path / "data", "preference", margin=True)
    records = load_sources(data, "auto", "", [])[0].records
    assert [r.margin for r in records[:4]] == [0, 1, 2, 0]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    assert STAGES["rm"].encode(tokenizer, records, TrainConfig(stage="rm")).examples[1]["margin"] == 1
    for stage in ("dpo", "orpo", "simpo", "kto"):
        with pytest.raises(DataError, match=f"row 1: stage={stage} does not read the margin column"):
            STAGES[stage].encode(tokenizer, records, TrainConfig(stage=stage))
    (tmp_path / "bad.jsonl").write_text(json.dumps({**rows("preference")[0], "margin": "big"}) + "\n")
    with pytest.raises(DataError, match="column 'margin' must be a finite number"):
        load_sources(str(tmp_path / "bad.jsonl"), "auto", "", [])


def test_stage_defaults_and_keys() -> None:
    assert TrainConfig.from_dict({"stage": "simpo"}).beta == 2.5  # a per-token reward needs a large beta
    assert TrainConfig.from_dict({"stage": "simpo", "beta": 0.3}).beta == 0.3
    assert TrainConfig.from_dict({"stage": "orpo"}).beta == 0.1
    assert TrainConfig(stage="rm").delta_config().task_type == "SEQ_CLS"
    with pytest.raises(ConfigError, match="gamma applies to stage=simpo only"):
        TrainConfig(stage="orpo", gamma=1.0)
    with pytest.raises(ConfigError, match="gamma=-1.0 must be 0 or more"):
        TrainConfig(stage="simpo", gamma=-1.0)
