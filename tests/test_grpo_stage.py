"""``deltatune train stage=grpo`` end to end on a tiny chat model: prompt-only data with extra columns, reward
functions from a file and from a reward model trained with ``stage=rm`` (``rm:FOLDER``), the held-out reward
before and after in metrics.json, the reward in the logs and the plot; and the keys' one-line refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from deltatune.errors import ConfigError
from deltatune.train.config import TrainConfig
from deltatune.train.run import run_training
from sft_helpers import TINY_RUN, save_tiny_chat_model
from test_preference_stages import write

GRPO_RUN = {
    **TINY_RUN,
    "stage": "grpo",
    "max_steps": 2,
    "batch_size": 4,
    "num_generations": 2,
    "max_completion_length": 6,
    "eval_examples": 3,
}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_chat_model(tmp_path_factory.mktemp("model"))


def prompts(path: Path) -> str:
    rows = [
        {"prompt": [{"role": "user", "content": f"What is {i} plus {i}?"}], "solution": str(2 * i)} for i in range(20)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def train(tmp_path: Path, model: Path, name: str, **keys) -> dict:
    config = TrainConfig.from_dict({**GRPO_RUN, "model": str(model), "output_dir": str(tmp_path / name), **keys})
    result = run_training(config, log=lambda *_: None)
    assert result.tokens_per_second > 0  # prompt + completion tokens trained on (the progress bar's tok/s)
    return json.loads((tmp_path / name / "metrics.json").read_text())


def test_a_grpo_run_reports_its_reward_before_and_after(tmp_path, tiny_model) -> None:
    (tmp_path / "rewards.py").write_text(
        "def has_digit(prompts, completions, completion_ids, solution, **kwargs):\n"
        "    assert len(solution) == len(completions)\n"
        "    return [float(any(ch.isdigit() for ch in c[0]['content'])) for c in completions]\n"
    )
    data = prompts(tmp_path / "prompts.jsonl")
    metrics = train(tmp_path, tiny_model, "grpo", data=data, reward_funcs=f"{tmp_path / 'rewards.py'}:has_digit")
    result = metrics["result"]
    name = f"{tmp_path / 'rewards.py'}:has_digit"
    for when in ("eval_before", "eval_after"):
        assert set(result[when]) == {"eval_reward", f"eval_rewards/{name}"}
    logged = [entry for entry in metrics["log_history"] if "reward" in entry]
    assert len(logged) == 2 and {"reward_std", f"rewards/{name}/mean", "completions/mean_length"} <= set(logged[0])
    assert result["samples"][0]["reference"] is not None  # the solution column is shown as the data's answer
    assert result["reloaded_max_logit_diff"] < 1e-4 and (tmp_path / "grpo" / "loss.png").is_file()


def test_eval_steps_score_the_held_out_prompts_during_training(tmp_path, tiny_model) -> None:
    """``eval_steps`` evaluates the held-out reward as training goes (the Trainer needs an eval set for it)."""
    (tmp_path / "rewards.py").write_text(
        "def r(completion_ids, **kw):\n    return [float(len(i)) for i in completion_ids]\n"
    )
    metrics = train(
        tmp_path,
        tiny_model,
        "grpo",
        data=prompts(tmp_path / "p.jsonl"),
        eval_steps=1,
        reward_funcs=f"{tmp_path / 'rewards.py'}:r",
    )
    evaluated = [entry["step"] for entry in metrics["log_history"] if "eval_reward" in entry]
    assert {1, 2} <= set(evaluated), evaluated


def test_a_reward_model_trained_here_is_a_grpo_reward(tmp_path, tiny_model) -> None:
    pairs = write(tmp_path / "pairs", "preference")
    rm = TrainConfig.from_dict(
        {**TINY_RUN, "model": str(tiny_model), "data": pairs, "stage": "rm", "output_dir": str(tmp_path / "rm")}
    )
    run_training(rm, log=lambda *_: None)
    adapter = tmp_path / "rm" / "adapter"
    metrics = train(tmp_path, tiny_model, "grpo-rm", data=prompts(tmp_path / "p.jsonl"), reward_funcs=f"rm:{adapter}")
    logged = [entry for entry in metrics["log_history"] if "reward" in entry]
    assert logged and f"rewards/rm:{adapter}/mean" in logged[0]
    assert metrics["result"]["eval_after"]["eval_reward"] == pytest.approx(
        metrics["result"]["eval_after"][f"eval_rewards/rm:{adapter}"]
    )


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"stage": "grpo"}, "stage=grpo needs reward_funcs="),
        (
            {"stage": "grpo", "reward_funcs": "accuracy", "reward_weights": "1,x"},
            "reward_weights='1,x' must be numbers",
        ),
        ({"stage": "grpo", "reward_funcs": "accuracy", "num_generations": 1}, "at least 2 completions"),
        ({"stage": "grpo", "reward_funcs": "accuracy", "loss_type": "sigmoid"}, "loss_type='sigmoid' is unknown"),
        ({"stage": "sft", "num_generations": 4}, "num_generations applies to stage=grpo only"),
        ({"stage": "dpo", "reward_funcs": "accuracy"}, "reward_funcs applies to stage=grpo only"),
    ],
)
def test_grpo_keys_are_checked_before_anything_loads(keys, message) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict(keys)


def test_grpo_defaults_are_trls() -> None:
    config = TrainConfig.from_dict({"stage": "grpo", "reward_funcs": "accuracy"})
    settings = config.grpo_settings()
    assert (config.beta, settings.loss_type, settings.num_generations, settings.scale_rewards) == (
        0.0,
        "dapo",
        8,
        "group",
    )
    assert settings.clip_high == settings.epsilon == 0.2 and settings.max_prompt_length == config.max_length


def test_a_resumed_grpo_run_samples_and_ends_as_the_whole_run(tmp_path, tiny_model) -> None:
    """Each generation's seed comes from the run's seed and the step, and the prompts from the data position the
    checkpoint keeps: a run stopped after step 2 and resumed ends with the whole run's adapter, bit for bit."""
    from safetensors.torch import load_file

    data = prompts(tmp_path / "prompts.jsonl")
    (tmp_path / "r.py").write_text(
        "def r(completion_ids, **kw):\n    return [float(sum(i) % 7) for i in completion_ids]\n"
    )
    # a constant learning rate: the first part's 2-step schedule is then the whole run's first two steps
    keys = dict(data=data, reward_funcs=f"{tmp_path / 'r.py'}:r", max_steps=4, save_steps=2, learning_rate=5e-2)
    keys.update(lr_scheduler="constant")
    whole = train(tmp_path, tiny_model, "whole", **keys)
    config = {**GRPO_RUN, **keys, "model": str(tiny_model), "output_dir": str(tmp_path / "parts")}
    run_training(TrainConfig.from_dict({**config, "max_steps": 2}), log=lambda *_: None)
    resumed = {**config, "resume_from_checkpoint": str(tmp_path / "parts" / "checkpoints" / "checkpoint-2")}
    run_training(TrainConfig.from_dict(resumed), log=lambda *_: None)
    first = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    again = load_file(tmp_path / "parts" / "adapter" / "adapter_model.safetensors")
    assert first.keys() == again.keys() and all((first[k] == again[k]).all() for k in first)
    halfway = load_file(tmp_path / "parts" / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors")
    assert any((halfway[k] != first[k]).any() for k in first)  # steps 3 and 4 did move the adapter
    rewards = [e["reward"] for e in whole["log_history"] if "reward" in e]
    assert len(rewards) == 4


@pytest.mark.parametrize("options", [{"quantization": "nf4"}, {"use_dora": True, "gradient_checkpointing": True}])
def test_grpo_trains_over_a_4bit_base_and_with_dora_under_checkpointing(tmp_path, tiny_model, options) -> None:
    (tmp_path / "r.py").write_text(
        "def r(completion_ids, **kw):\n    return [float(sum(i) % 7) for i in completion_ids]\n"
    )
    metrics = train(
        tmp_path,
        tiny_model,
        "run",
        data=prompts(tmp_path / "p.jsonl"),
        reward_funcs=f"{tmp_path / 'r.py'}:r",
        learning_rate=5e-2,
        **options,
    )
    logged = [entry for entry in metrics["log_history"] if "reward" in entry]
    assert len(logged) == 2 and all(math.isfinite(entry["loss"]) for entry in logged)
    assert metrics["result"]["reloaded_max_logit_diff"] < 1e-4


@pytest.mark.multiprocess
def test_under_torchrun_each_process_samples_its_own_prompts(tmp_path, tiny_model) -> None:
    import os
    import subprocess
    import sys

    (tmp_path / "r.py").write_text(
        "import json, os\n"
        "def r(prompts, completion_ids, **kw):\n"
        "    with open(os.path.join(os.path.dirname(__file__), f\"seen{os.environ['RANK']}.jsonl\"), 'a') as f:\n"
        "        f.write(json.dumps(sorted({p[-1]['content'] for p in prompts})) + '\\n')\n"
        "    return [float(sum(i) % 7) for i in completion_ids]\n"
    )
    keys = {
        **GRPO_RUN,
        "model": str(tiny_model),
        "data": prompts(tmp_path / "p.jsonl"),
        "output_dir": str(tmp_path / "run"),
        "reward_funcs": f"{tmp_path / 'r.py'}:r",
        "eval_examples": 1,
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "deltatune.cli.main",
        "train",
        *(f"{k}={v}" for k, v in keys.items()),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    seen = [[json.loads(line) for line in (tmp_path / f"seen{rank}.jsonl").read_text().splitlines()] for rank in (0, 1)]
    training = [calls[1:3] for calls in seen]  # each process's call 0 is the held-out evaluation before training
    assert all(not set(a) & set(b) for a, b in zip(*training))  # the same step, different prompts
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["result"]["steps"] == 2
