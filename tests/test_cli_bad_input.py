"""Bad input to the ``deltatune`` command line: one error line on stderr, exit 2, no traceback (``--debug`` shows it).

The matrix covers broken files (YAML, JSON, torn safetensors, pickled weights), bad data (empty, a broken
row, a missing or mistyped field, examples longer than max_length), bad numbers (NaN adapter weights, an
infinite learning rate, a negative weight, r above a layer's size) and combinations that cannot work.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from deltatune import LoraConfig, get_delta_model
from deltatune.cli.main import main
from deltatune.train.config import TrainConfig
from sft_helpers import save_tiny_chat_model, write_arithmetic_jsonl

ROWS = '{"prompt": "What is 1 plus 1?", "completion": "It is 2."}\n'
WEATHER = '[{"name": "get_weather", "parameters": {"type": "object"}}]'


def _tool_row(call: str, tools: str) -> str:
    turns = [
        {"from": "human", "value": "Weather?"},
        {"from": "function_call", "value": call},
        {"from": "gpt", "value": "Sunny."},
    ]
    return json.dumps({"conversations": turns, "tools": tools}) + "\n"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny model, good data, and one broken file or folder per case."""
    root = tmp_path_factory.mktemp("bad_input")
    model = save_tiny_chat_model(root / "model")
    files = {"root": root, "model": model, "data": write_arithmetic_jsonl(root / "data.jsonl")}
    texts = {
        "bad.yaml": "r: [4, 8\nmax_steps: 2\n",
        "broken_row.jsonl": ROWS + '{"prompt": "What is 2 plus 2?", \n',
        "empty.jsonl": "",
        "missing_field.jsonl": ROWS * 5 + '{"prompt": "What is 3 plus 3?"}\n' + ROWS * 5,
        "mistyped_field.jsonl": '{"prompt": 5, "completion": "It is 2."}\n' * 10,
        "absent_tool.jsonl": _tool_row('{"name": "get_time", "arguments": {}}', WEATHER) * 4,
        "malformed_tools.jsonl": _tool_row('{"name": "get_weather", "arguments": {}}', WEATHER[:-1]) * 4,
        "bad_label.jsonl": '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], '
        '"label": "maybe"}\n' * 4,
        "kto_messages.jsonl": '{"messages": [{"role": "user", "content": "Hi"}, '
        '{"role": "assistant", "content": "Yo"}], '
        '"label": false}\n' * 4,
        "unread_column.jsonl": '{"prompt": "Hi", "completion": "Hello", "id": 3}\n' * 4,
    }
    for name, text in texts.items():
        files[name] = root / name
        files[name].write_text(text, encoding="utf-8")
    files["torn_model"] = _copy_model(model, root / "torn_model")
    weights = files["torn_model"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    files["pickled_model"] = _copy_model(model, root / "pickled_model")
    weights = files["pickled_model"] / "model.safetensors"
    torch.save(load_file(weights), files["pickled_model"] / "pytorch_model.bin")
    weights.unlink()
    files["nan_adapter"] = _adapter(model, root / "nan_adapter")
    tensors = load_file(files["nan_adapter"] / "adapter_model.safetensors")
    next(t for key, t in tensors.items() if "lora_B" in key)[0, 0] = float("nan")
    save_file(tensors, files["nan_adapter"] / "adapter_model.safetensors")
    files["torn_adapter"] = _adapter(model, root / "torn_adapter")
    weights = files["torn_adapter"] / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    files["bad_json_adapter"] = _adapter(model, root / "bad_json_adapter")
    (files["bad_json_adapter"] / "adapter_config.json").write_text('{"r": 4,', encoding="utf-8")
    return files


def _copy_model(model: Path, folder: Path) -> Path:
    shutil.copytree(model, folder)
    return folder


def _adapter(model: Path, folder: Path) -> Path:
    """A LoRA adapter of ``model`` (random B, so merging changes the weights) saved to ``folder``."""
    config = LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False, base_model_name_or_path=str(model))
    get_delta_model(AutoModelForCausalLM.from_pretrained(model), config).save_pretrained(folder)
    return folder


def _train(data: str, *keys: str, model: str = "model") -> Callable[[dict[str, Path]], list[str]]:
    """``deltatune train`` argv: a tiny one-step run on ``files[data]`` and ``files[model]``, plus ``keys``."""
    return lambda f: [
        "train",
        f"model={f[model]}",
        f"data={f[data]}",
        f"output_dir={f['root'] / 'out'}",
        "max_steps=1",
        "batch_size=2",
        "eval_examples=2",
        "max_length=48",
        *keys,
    ]


def _merge(adapter: str) -> Callable[[dict[str, Path]], list[str]]:
    return lambda f: ["merge", str(f[adapter]), str(f["root"] / f"merged_{adapter}")]


CASES = {
    "malformed YAML config": (lambda f: ["train", str(f["bad.yaml"])], "bad.yaml is not valid YAML at line 2"),
    "malformed YAML override": (lambda f: ["train", "seed=: x"], "override 'seed=: x' is not a valid YAML value"),
    "malformed JSON row": (_train("broken_row.jsonl"), "broken_row.jsonl: row 2: not valid JSON"),
    "malformed adapter_config.json": (_merge("bad_json_adapter"), "adapter_config.json is not valid JSON"),
    "truncated adapter safetensors": (
        _merge("torn_adapter"),
        "adapter_model.safetensors is not a readable safetensors",
    ),
    "truncated model safetensors": (
        _train("data", model="torn_model"),
        "the model weights are not a readable safetensors",
    ),
    "pickled model weights": (_train("data", model="pickled_model"), "has no .safetensors weights"),
    "empty data set": (_train("empty.jsonl"), "empty.jsonl: no rows; the file holds no examples"),
    "missing field": (_train("missing_field.jsonl"), "missing_field.jsonl: row 6: missing column 'completion'"),
    "mistyped field": (_train("mistyped_field.jsonl"), "mistyped_field.jsonl: row 1: column 'prompt' must be"),
    "over-long examples": (
        _train("data", "max_length=4"),
        "no training example is left after truncation to max_length=4",
    ),
    "NaN adapter weights in a merge": (_merge("nan_adapter"), "holds NaN or Inf values; the adapter is corrupt"),
    "infinite learning rate": (_train("data", "learning_rate=.inf"), "learning_rate=inf must be a finite number"),
    "negative kto weight": (
        _train("data", "stage=kto", "desirable_weight=-1"),
        "desirable_weight=-1.0 must be positive",
    ),
    "DoRA with a LoRA bias": (
        _train("data", "use_dora=true", "lora_bias=true"),
        "lora_bias=True does not combine with use_dora",
    ),
    "targets matching nothing": (
        _train("data", "target_modules=no_such_proj"),
        "matched no module of this LlamaForCausalLM",
    ),
    "packing with prompt tuning": (
        _train("data", "method=prompt_tuning", "packing=true"),
        "packing=true does not work with method=prompt_tuning",
    ),
    "tool call absent from tools": (
        _train("absent_tool.jsonl"),
        "row 1: 'conversations' message 2 calls 'get_time', which column 'tools' does not offer",
    ),
    "malformed tools JSON": (
        _train("malformed_tools.jsonl"),
        "malformed_tools.jsonl: row 1: column 'tools' is not valid JSON",
    ),
    "non-boolean label": (
        _train("bad_label.jsonl", "stage=kto"),
        "row 1: column 'label' must be true or false, got str 'maybe'",
    ),
    "KTO data under stage=sft": (
        _train("kto_messages.jsonl"),
        "is kto data (format messages_kto); did you mean stage=kto?",
    ),
    "unread column": (_train("unread_column.jsonl"), "column 'id' is not read by the prompt_completion format"),
    "mapping to a missing column": (
        _train("data", 'columns={"prompt": "question", "completion": "completion"}'),
        "columns maps 'prompt' to 'question', which is not a column",
    ),
    "weight list of the wrong length": (
        _train("data", "data_weights=1,2"),
        "data_weights='1,2' has 2 weights for 1 data sources",
    ),
}


PROGRESS_BAR = re.compile(r"^[\w ]+: +\d+%\|")  # "Loading weights: 100%|####| 20/20 [...]" (transformers)


def _error_lines(err: str) -> list[str]:
    """The lines of stderr, less the progress bars drawn while the weights load."""
    return [line for line in re.split(r"[\r\n]", err) if line and not PROGRESS_BAR.match(line)]


@pytest.mark.parametrize(("argv", "message"), CASES.values(), ids=CASES)
def test_bad_input_is_one_error_line_with_exit_2(files, capsys, argv, message: str) -> None:
    argv = argv(files)
    code = main(argv)
    err = capsys.readouterr().err
    lines = _error_lines(err)
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"deltatune {argv[0]}: error: ") and message in lines[0], err
    assert "Traceback" not in err and err.endswith("\n"), err


@pytest.mark.parametrize("case", ["malformed JSON row", "NaN adapter weights in a merge"])
def test_debug_shows_the_traceback_then_the_error_line(files, capsys, case: str) -> None:
    argv, message = CASES[case]
    argv = argv(files)
    assert main(["--debug", *argv]) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert lines[0] == "Traceback (most recent call last):" and len(lines) > 3
    assert lines[-1].startswith(f"deltatune {argv[0]}: error: ") and message in lines[-1]


@pytest.mark.subprocess
def test_a_real_process_exits_2_with_one_line(files) -> None:
    argv, message = CASES["NaN adapter weights in a merge"]
    done = subprocess.run(
        [sys.executable, "-m", "deltatune.cli.main", *argv(files)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 2, done.stderr
    assert len(_error_lines(done.stderr)) == 1 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_text_keys_keep_the_override_as_written() -> None:
    """``output_dir=007`` is the folder "007", not the number 7; other keys still read YAML numbers."""
    config = TrainConfig.from_sources(None, ["output_dir=007", "data=0x10", "model='my model'", "seed=0x10"])
    assert (config.output_dir, config.data, config.model, config.seed) == ("007", "0x10", "my model", 16)
