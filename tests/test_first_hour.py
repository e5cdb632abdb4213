"""What a newcomer meets in the first hour (issue 16): wording, another method's keys, a max_length beyond the
model's context, warm-up that lasts the whole run, report_to trackers, file permissions under the umask,
and `inspect` naming the targets `train` uses."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from deltatune.cli.main import main
from deltatune.data import load_records
from deltatune.data.readers import read_table
from deltatune.errors import ConfigError, DataError
from deltatune.runtime import assets
from deltatune.runtime.atomic import atomic_directory, current_umask, honour_umask
from deltatune.train.config import REPORTERS, TrainConfig
from sft_helpers import save_tiny_chat_model, write_arithmetic_jsonl

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# Runs the CLI, then reports whether torch was imported (config errors must answer without it).
PROBE = """
import sys
from deltatune.cli.main import main
code = main(sys.argv[1:])
print("TORCH", "torch" in sys.modules, code)
"""


def _config_error(*overrides: str, config_file: str | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        TrainConfig.from_sources(config_file, list(overrides))
    return str(caught.value)


def _probe(*argv: str) -> tuple[str, str]:
    """(the probe's last line, stderr) of ``deltatune argv`` in a fresh interpreter."""
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120)
    return done.stdout.strip().splitlines()[-1], done.stderr


@contextlib.contextmanager
def _umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- wording ---------------------------------------------------------------------------------------------


def test_a_wrong_type_names_the_kind_in_words() -> None:
    assert _config_error("max_steps=2.5").endswith("max_steps=2.5 must be an integer")
    assert _config_error("learning_rate=fast").endswith("learning_rate='fast' must be a number")


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        (
            "a.jsonl",
            '{"prompt": "a", "completion": "b}\n',
            "row 1: not valid JSON (Unterminated string starting at column 31)",
        ),
        (
            "b.jsonl",
            '{"prompt": "a" "completion": "b"}\n',
            "row 1: not valid JSON (Expecting ',' delimiter at column 16)",
        ),
        ("c.json", '[{"prompt": "a",\n "completion": "b]', "not valid JSON (Unterminated string starting at line 2)"),
        (
            "d.jsonl",
            '{"messages": [{"role": "user", "content": "hi"}], "tools": "[{\\"name\\": \\"f}]"}\n',
            "column 'tools' is not valid JSON (Unterminated string starting at column 11)",
        ),
    ],
)
def test_a_json_error_says_where_once(tmp_path: Path, name: str, text: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as caught:
        load_records(path) if "tools" in text else read_table(path)
    assert message in str(caught.value) and " at at " not in str(caught.value)


def test_train_says_step_in_the_singular_warns_of_whole_run_warmup_and_reports_to_tensorboard(
    tmp_path: Path, capsys
) -> None:
    """One real step on a tiny model: "trained 1 step", the warm-up notice (default warmup_steps=5),
    TensorBoard events from report_to=tensorboard, and files readable by others under umask 022."""
    model = save_tiny_chat_model(tmp_path / "model")
    data = write_arithmetic_jsonl(tmp_path / "data.jsonl", n=12)
    out = tmp_path / "out"
    argv = [
        "train",
        f"model={model}",
        f"data={data}",
        f"output_dir={out}",
        "max_steps=1",
        "batch_size=2",
        "eval_examples=2",
        "eval_fraction=0.2",
        "max_length=48",
        "report_to=tensorboard",
    ]
    with _umask(0o022):
        code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "trained 1 step in " in captured.out and "1 steps" not in captured.out
    assert "notice: warmup_steps=5 covers the whole run (1 step)" in captured.err
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tensorboard").iterdir())
    adapter = out / "adapter"
    assert _mode(adapter) == 0o755
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert _mode(adapter / name) == 0o644, name


# --- another method's keys ---------------------------------------------------------------------------------


def test_a_method_override_drops_the_files_keys_of_other_methods_with_a_notice(capsys) -> None:
    config = TrainConfig.from_sources(str(EXAMPLES / "sft.yaml"), ["method=bottleneck"])
    assert config.method == "bottleneck" and config.method_options == {}
    notice = capsys.readouterr().err
    assert notice.count("\n") == 1
    assert "drops r, lora_alpha, lora_dropout, target_modules from" in notice and "/lora/" in notice
    kept = TrainConfig.from_sources(str(EXAMPLES / "sft.yaml"), ["method=bottleneck", "reduction_factor=8"])
    assert kept.method_options == {"reduction_factor": 8}


def test_another_methods_key_says_whose_it_is() -> None:
    message = _config_error("method=bottleneck", "r=4")
    owners = "method=lora/vera/adalora/oft/loha/lokr"  # every method with a rank r, in registration order
    assert message.startswith(f"unknown config key 'r'; it is a hyper-parameter of {owners}, not method=bottleneck")
    assert "reduction_factor" in message
    shared = _config_error("num_virtual_tokens=4")  # lora is the default method
    assert "method=prompt_tuning/p_tuning/prefix_tuning, not method=lora" in shared


def test_a_files_own_mismatch_is_still_an_error(tmp_path: Path) -> None:
    """Keys are dropped only when the command line changes the method; a file that contradicts itself fails."""
    path = tmp_path / "run.yaml"
    path.write_text("method: bottleneck\nr: 8\n", encoding="utf-8")
    assert "hyper-parameter of method=lora" in _config_error("method=bottleneck", config_file=str(path))
    assert "hyper-parameter of method=lora" in _config_error("r=4", "method=bottleneck", config_file=str(path))


# --- DoRA and near misses ---------------------------------------------------------------------------------


def test_use_dora_is_a_lora_key_and_its_misspellings_point_to_it() -> None:
    assert TrainConfig.from_sources(None, ["use_dora=true"]).delta_config().use_dora is True
    for typo in ("use_DoRA", "use-dora", "usedora", "use_dra", "Use_Dora"):
        assert _config_error(f"{typo}=true").endswith("did you mean 'use_dora'?"), typo


# --- max_length against the model ------------------------------------------------------------------------


def _model_folder(root: Path, **fields) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"model_type": "llama", **fields}), encoding="utf-8")
    return root


def test_max_length_beyond_the_models_context_is_refused(tmp_path: Path) -> None:
    model = _model_folder(tmp_path / "m", max_position_embeddings=64)
    with pytest.raises(ConfigError) as caught:
        TrainConfig(model=str(model), max_length=100).check_model()
    message = str(caught.value)
    assert "max_length=100" in message and "context of 64 tokens" in message and "set max_length=64 or less" in message
    TrainConfig(model=str(model), max_length=64).check_model()
    gpt2 = _model_folder(tmp_path / "g", n_positions=32)
    with pytest.raises(ConfigError, match="context of 32 tokens"):
        TrainConfig(model=str(gpt2), max_length=33).check_model()
    TrainConfig(model=str(_model_folder(tmp_path / "n")), max_length=10**6).check_model()  # no such field


def test_max_length_is_checked_against_the_embedded_model(smollm2_dir: Path) -> None:
    assert assets.embedded_config("smollm2") == smollm2_dir / "config.json"
    assert assets.embedded_config(assets.SMOLLM2_HUB_ID) == smollm2_dir / "config.json"
    with pytest.raises(ConfigError, match="max_length=1000000 is longer than model=smollm2's context of 8192"):
        TrainConfig(max_length=1_000_000).check_model()


def test_max_length_is_checked_against_a_hub_models_cached_config(tmp_path: Path, monkeypatch) -> None:
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    _model_folder(repo / "snapshots" / "abc123", max_position_embeddings=128)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ConfigError, match="context of 128 tokens"):
        TrainConfig(model="org/tiny", max_length=129).check_model()
    TrainConfig(model="org/not-cached", max_length=10**6).check_model()  # nothing on disk: nothing to check


@pytest.mark.subprocess
def test_the_cli_refuses_a_too_long_max_length_before_torch_loads(tmp_path: Path) -> None:
    model = _model_folder(tmp_path / "m", max_position_embeddings=64)
    last, err = _probe("train", f"model={model}", "max_length=65")
    assert last == "TORCH False 2", err
    assert "context of 64 tokens" in err


# --- warm-up ----------------------------------------------------------------------------------------------


def test_warmup_notice_only_when_warmup_lasts_the_whole_run() -> None:
    from deltatune.train.run import _warmup_notice

    notice = _warmup_notice(TrainConfig(max_steps=1), 1)
    assert "warmup_steps=5 covers the whole run (1 step)" in notice and "trains at 0" in notice
    assert "(3 steps)" in _warmup_notice(TrainConfig(max_steps=3, warmup_steps=3), 3)
    assert _warmup_notice(TrainConfig(max_steps=6), 6) is None
    assert _warmup_notice(TrainConfig(max_steps=1, warmup_steps=0), 1) is None


# --- report_to ---------------------------------------------------------------------------------------------


def test_the_reporters_match_transformers_integrations() -> None:
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    assert set(REPORTERS) == set(INTEGRATION_TO_CALLBACK) - {"kubeflow"}


def test_report_to_reaches_the_training_arguments(tmp_path: Path, monkeypatch) -> None:
    from deltatune.data.encoding import EncodedSet
    from deltatune.train.run import _arguments, _optional_callbacks
    from deltatune.train.stages import STAGES

    (tmp_path / "trackio").mkdir()
    (tmp_path / "trackio" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))  # an installed tracker, as far as the check can tell
    config = TrainConfig(report_to="trackio,tensorboard", output_dir=str(tmp_path / "out"), warmup_steps=0)
    assert config.reporters() == ["trackio", "tensorboard"]
    arguments = _arguments(config, EncodedSet([], 0, 0), {"bf16": False, "fp16": False}, STAGES["sft"])
    assert arguments.report_to == ["trackio"]  # TensorBoard comes as our callback, into output_dir/tensorboard
    board = [c for c in _optional_callbacks(config) if type(c).__name__ == "TensorBoardCallback"]
    assert len(board) == 1 and Path(board[0].tb_writer.log_dir) == tmp_path / "out" / "tensorboard"
    assert TrainConfig(tensorboard=True).reporters() == ["tensorboard"]
    assert TrainConfig().reporters() == [] and "trackio" in TrainConfig(report_to="all").reporters()


@pytest.mark.subprocess
def test_report_to_errors_are_one_line_before_torch_loads() -> None:
    missing = next(name for name in ("swanlab", "dvclive", "clearml") if not _installed(name))
    last, err = _probe("train", f"report_to={missing}")
    assert last == "TORCH False 2", err
    assert f"report_to={missing} needs the {missing} package: pip install {missing}" in err
    assert "did you mean 'wandb'?" in _config_error("report_to=wanbd")
    assert "mixes all/none with names" in _config_error("report_to=all,wandb")


def _installed(module: str) -> bool:
    from importlib.util import find_spec

    return find_spec(module) is not None


# --- permissions under the umask ---------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_atomic_folders_and_their_files_follow_the_umask(tmp_path: Path, mask: int) -> None:
    with _umask(mask):
        assert current_umask() == mask
        with atomic_directory(tmp_path / "merged") as staging:
            weights = staging / "model.safetensors"
            weights.write_bytes(b"w")
            weights.chmod(0o600)  # as safetensors writes it
            (staging / "sub").mkdir(mode=0o700)
            (staging / "run.sh").write_text("#!/bin/sh\n")
            (staging / "run.sh").chmod(0o700)
    folder = tmp_path / "merged"
    assert _mode(folder) == _mode(folder / "sub") == 0o777 & ~mask
    assert _mode(folder / "model.safetensors") == 0o666 & ~mask
    assert _mode(folder / "run.sh") == 0o777 & ~mask


def test_honour_umask_leaves_links_alone(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_text("x")
    outside.chmod(0o600)
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "link").symlink_to(outside)
    with _umask(0o022):
        honour_umask(tmp_path / "tree")
    assert _mode(outside) == 0o600


def test_the_embedded_model_cache_follows_the_umask(tmp_path: Path, monkeypatch) -> None:
    def convert(gguf_dir: Path, gguf_file: str, out_dir: Path) -> None:
        (out_dir / "model.safetensors").write_bytes(b"w")
        (out_dir / "model.safetensors").chmod(0o600)

    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(assets, "_convert_gguf", convert)
    with _umask(0o022):
        target = assets.smollm2_path()
    assert _mode(target) == 0o755 and _mode(target / "model.safetensors") == 0o644


# --- inspect ----------------------------------------------------------------------------------------------


def test_inspect_names_the_targets_train_uses(tmp_path: Path, capsys) -> None:
    from tiny_models import tiny_llama

    tiny_llama().save_pretrained(tmp_path / "llama")
    assert main(["inspect", str(tmp_path / "llama")]) == 0
    out = capsys.readouterr().out
    assert (
        "`deltatune train` target_modules=all-linear (its default): 14 modules, down_proj, gate_proj, k_proj, "
        "o_proj, q_proj, up_proj, v_proj"
    ) in out
    assert "peft's default target_modules: q_proj, v_proj" in out and "not what `deltatune train` uses" in out
