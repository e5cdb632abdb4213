"""The ``deltatune`` command line: help, one-line errors with exit 2, and every command on a tiny model."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from deltatune import DeltaModel
from deltatune.cli.main import main
from deltatune.train.config import TrainConfig
from sft_helpers import TINY_RUN, save_tiny_chat_model, write_arithmetic_jsonl

MY_COMMANDS = ("train", "merge", "generate", "chat", "eval", "inspect")


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``deltatune argv``."""
    try:
        code = main(list(argv))
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("command", MY_COMMANDS)
def test_every_command_has_help_with_examples(capsys, command: str) -> None:
    code, out, _ = cli(capsys, command, "--help")
    assert code == 0
    assert "examples:" in out and f"deltatune {command}" in out


def test_train_help_lists_run_keys_and_method_keys(capsys) -> None:
    _, out, _ = cli(capsys, "train", "--help")
    for key in ("model", "data_format", "stage", "resume_from_checkpoint", "packing", "early_stopping_patience"):
        assert f"\n  {key} " in out
    assert "method=lora keys" in out and "lora_alpha=16" in out


ERRORS = [
    (("learning_rat=1e-3",), "unknown config key 'learning_rat'; did you mean 'learning_rate'?"),
    (("lora_alpa=4",), "unknown config key 'lora_alpa'; did you mean 'lora_alpha'?"),
    (("method=lorra",), "method='lorra' is unknown; did you mean 'lora'?"),
    (("batch_size=0",), "batch_size=0 must be positive"),
    (("eval_fraction=1.5",), "eval_fraction=1.5 must be between 0 and 1"),
    (("stage=ppo",), "stage='ppo' is unknown; use one of sft, dpo, kto"),
    (("precision=fp8",), "precision='fp8' is unknown"),
    (("r=0",), "r=0 must be a positive integer"),
    (("rank_pattern=null",), "rank_pattern=None is not a value for method=lora; leave the key out"),
    (("max_steps=2.5",), "max_steps=2.5 must be an integer"),
    (("packing=yes please",), "packing='yes please' must be true or false"),
    (("epochs=2", "max_steps=10"), "set max_steps or epochs (exactly one above 0)"),
    (("early_stopping_patience=2",), "early_stopping_patience needs evaluations during training; set eval_steps too"),
    (("stage=dpo", "packing=true"), "packing and train_on_prompt apply to stage=sft only"),
    (("stage=kto", "batch_size=1"), "stage=kto needs batch_size >= 2"),
    (("model=/no/such/model",), "model='/no/such/model' is not a model folder (no config.json)"),
    (("data=/no/such/data.jsonl",), "/no/such/data.jsonl does not exist; pass a .jsonl"),
    (("missing.yaml",), "config file missing.yaml does not exist"),
]


@pytest.mark.parametrize(("argv", "message"), ERRORS, ids=[m for _, m in ERRORS])
def test_train_errors_are_one_line_with_exit_2(capsys, argv: tuple[str, ...], message: str) -> None:
    code, out, err = cli(capsys, "train", *argv)
    assert code == 2
    assert err.startswith("deltatune train: error: ") and message in err, err
    assert err.count("\n") == 1


def test_fp16_without_a_gpu_fails_before_anything_loads(capsys, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = cli(capsys, "train", "precision=fp16")
    assert code == 2
    assert (
        err == "deltatune train: error: precision=fp16 needs a CUDA GPU; use precision=bf16 or fp32 on this machine\n"
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``deltatune train`` on the tiny model, through ``main``."""
    root = tmp_path_factory.mktemp("cli")
    model, data = save_tiny_chat_model(root / "model"), write_arithmetic_jsonl(root / "d.jsonl")
    keys = [f"{key}={value}" for key, value in {**TINY_RUN, "max_steps": 6}.items()]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["train", f"model={model}", f"data={data}", f"output_dir={root / 'run'}", *keys])
    assert code == 0
    return {
        "root": root,
        "model": model,
        "data": data,
        "adapter": root / "run" / "adapter",
        "stdout": stdout.getvalue(),
    }


def test_train_prints_the_before_and_after(trained) -> None:
    result = json.loads((trained["root"] / "run" / "metrics.json").read_text())["result"]
    before, after = result["eval_before"]["eval_loss"], result["eval_after"]["eval_loss"]
    assert after < before
    assert result["steps"] == 6 and result["reloaded_max_logit_diff"] == 0.0
    lines = trained["stdout"].splitlines()
    assert f"held-out loss: {before:.4f} -> {after:.4f} (reloaded adapter max logit diff 0.00e+00; merged model" in (
        "\n".join(lines)
    )
    assert f"question:        {result['sample_prompt']}" in lines
    assert any(line.startswith("answer after:") for line in lines)
    questions = [sample["question"] for sample in result["samples"]]
    assert len(set(questions)) == len(questions) >= 2 and questions[0] == result["sample_prompt"]
    for sample in result["samples"]:  # each beside the data's own answer
        assert f"question:        {sample['question']}" in lines and f"answer data:    {sample['reference']}" in lines
    assert lines[-1].startswith("trained 6 steps in ")


def test_merge_writes_a_model_transformers_loads_alone(trained, capsys) -> None:
    out = trained["root"] / "merged"
    code, stdout, _ = cli(capsys, "merge", str(trained["adapter"]), str(out))
    assert code == 0 and f"saved to {out}" in stdout
    merged = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert AutoTokenizer.from_pretrained(out, local_files_only=True).chat_template
    base = AutoModelForCausalLM.from_pretrained(trained["model"], local_files_only=True)
    adapted = DeltaModel.from_pretrained(base, trained["adapter"]).eval()
    ids = torch.tensor([[1, 5, 9, 200, 3000, 7]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    code, _, err = cli(capsys, "merge", str(trained["adapter"]), str(out))
    assert code == 2 and "exists and is not an empty folder; pick a new OUTPUT or pass --overwrite" in err


def test_generate_and_chat_answer_like_the_trained_adapter(trained, capsys, monkeypatch) -> None:
    result = json.loads((trained["root"] / "run" / "metrics.json").read_text())["result"]
    prompt, expected = result["sample_prompt"], result["answer_after"]
    for packing in ("--packed-weights", "--no-packed-weights"):  # oneDNN's products, then torch's own
        code, out, _ = cli(
            capsys, "generate", "--adapter", str(trained["adapter"]), "--max-new-tokens", "48", packing, prompt
        )
        assert code == 0 and out == expected + "\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{prompt}\n/reset\n{prompt}\n/exit\nnot read\n"))
    code, out, err = cli(capsys, "chat", "--adapter", str(trained["adapter"]), "--max-new-tokens", "48")
    assert code == 0 and out == f"{expected}\n{expected}\n"
    assert "(conversation cleared)" in err


def test_eval_compares_base_and_adapter(trained, capsys) -> None:
    code, out, _ = cli(
        capsys, "eval", "--adapter", str(trained["adapter"]), "--data", str(trained["data"]), "--max-examples", "8"
    )
    assert code == 0
    lines = {line.split(":")[0]: line for line in out.splitlines()}
    base, adapted = (float(lines[name].split()[2]) for name in ("base", "adapter"))
    assert adapted < base
    assert lines["data"].startswith(f"data: {trained['data']}: 8 examples")


def test_inspect_lists_modules_defaults_and_method_sizes(trained, capsys) -> None:
    code, out, _ = cli(capsys, "inspect", str(trained["model"]))
    assert code == 0
    assert "model: LlamaForCausalLM (llama)" in out
    assert "  q_proj                   x2    e.g. model.layers.0.self_attn.q_proj" in out
    assert "default target_modules: q_proj, v_proj" in out
    # LoRA r=8 on the 7 projections of 2 layers: q, o 8*(32+32); k, v 8*(32+16); gate, up, down 8*(32+64)
    lora = next(line for line in out.splitlines() if line.strip().startswith("lora "))
    assert "8,192" in lora


COMMAND_ERRORS = [
    (("generate", "--temperature", "-1", "hi"), "--temperature=-1.0 must be 0 (greedy) or more"),
    (("generate", "--adapter", "/no/adapter", "hi"), "no adapter_config.json in /no/adapter"),
    (("eval", "--max-length", "0"), "--max-length=0 must be positive"),
    (("eval", "--data", "chatterbot-preference-synthetic", "--model", "/no/model"), "is preference data"),
    (("merge", "/no/adapter", "/tmp/out", "--dtype", "int8"), "--dtype='int8' is unknown"),
    (("inspect", "/no/model"), "model='/no/model' is not a model folder"),
]


@pytest.mark.parametrize(("argv", "message"), COMMAND_ERRORS, ids=[m for _, m in COMMAND_ERRORS])
def test_command_errors_are_one_line_with_exit_2(capsys, argv: tuple[str, ...], message: str) -> None:
    code, _, err = cli(capsys, *argv)
    assert code == 2
    assert err.startswith(f"deltatune {argv[0]}: error: ") and message in err, err
    assert err.count("\n") == 1


def test_dpo_and_kto_stages_run_from_the_command_line(trained, capsys) -> None:
    root = trained["root"]
    rows = [
        {"prompt": f"What is {i} plus {i}?", "chosen": f"It is {2 * i}.", "rejected": f"It is {2 * i + 1}."}
        for i in range(12)
    ]
    (root / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    common = [
        f"model={trained['model']}",
        f"data={root / 'pairs.jsonl'}",
        "max_steps=1",
        "batch_size=2",
        "eval_examples=2",
        "eval_fraction=0.2",
        "max_length=48",
    ]
    for stage in ("dpo", "kto"):  # kto unpairs the preference pairs
        code, out, err = cli(capsys, "train", f"stage={stage}", f"output_dir={root / stage}", *common)
        assert code == 0, err
        assert f"held-out {stage} loss: " in out and "reward accuracy" in out
        after = json.loads((root / stage / "metrics.json").read_text())["result"]["eval_after"]
        assert "eval_rewards/accuracies" in after and "eval_rewards/margins" in after


@pytest.mark.parametrize("name", ["sft", "dpo", "kto", "orpo", "simpo", "rm", "grpo"])
def test_example_configs_are_valid_and_label_synthetic_data(name: str, monkeypatch) -> None:
    path = Path(__file__).parents[1] / "examples" / f"{name}.yaml"
    config = TrainConfig.from_sources(str(path), [])
    assert config.stage == name and config.model == "smollm2"
    if name == "grpo":  # the reward functions it names load, and score as the docstring says
        from deltatune.train.rewards import load_reward_functions, score

        monkeypatch.chdir(path.parents[1])
        table = score(
            load_reward_functions(config.reward_funcs),
            ["q"] * 3,
            ["It is 420.", "420", "42"],
            [[1], [1], [1]],
            {"solution": ["420", "420", "420"]},
        )
        assert table == [[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.5, 0.0]]  # correct, close, the right number alone
    if name != "sft":
        assert config.data.endswith("-synthetic") and "SYNTHETIC" in path.read_text()


def test_an_override_of_epochs_or_max_steps_replaces_the_files_other(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("max_steps: 60\nr: 4\n", encoding="utf-8")
    config = TrainConfig.from_sources(str(path), ["epochs=2"])
    assert (config.max_steps, config.epochs, config.method_options) == (0, 2.0, {"r": 4})
    path.write_text("epochs: 3\n", encoding="utf-8")
    assert (
        TrainConfig.from_sources(str(path), ["max_steps=5"]).max_steps,
        TrainConfig.from_sources(str(path), []).max_steps,
    ) == (5, 0)


def test_method_values_take_their_fields_types() -> None:
    """YAML reads 1e-4 (no dot) as a string; a float hyper-parameter still gets the number."""
    config = TrainConfig.from_sources(None, ["lora_alpha=1e-4", "target_modules=q_proj, v_proj"])
    assert (config.delta_config().lora_alpha, config.delta_config().target_modules) == (1e-4, ["q_proj", "v_proj"])
    assert TrainConfig.from_sources(None, ["target_modules=.*_proj"]).delta_config().target_modules == ".*_proj"
