"""``deltatune serve`` as a command: bad flags and folders are one line and exit 2 (before torch loads), and the
real command listens on a free port, answers the openai client, and exits on SIGINT or SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from deltatune.cli.main import main
from deltatune.runtime.loading import DTYPES
from deltatune.runtime.quantization import QUANTIZATIONS
from deltatune.serve.options import DTYPE_NAMES, QUANTIZATION_NAMES
from serve_helpers import Reference, client, tiny_setup


def test_written_out_choices_match_the_loaders():
    assert DTYPE_NAMES == tuple(DTYPES) and QUANTIZATION_NAMES == QUANTIZATIONS


def fake_adapter(folder, peft_type: str = "LORA", weights: bool = True):
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type, "r": 4}))
    if weights:
        (folder / "adapter_model.safetensors").write_bytes(b"")
    return folder


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--adapter", "support"], "--adapter 'support' is not NAME=PATH"),
        (["--adapter", "a=no/such/folder"], "no/such/folder is not a folder"),
        (["--adapter", "a={ia3}"], "its method is IA3, and deltatune serve serves LoRA adapters only"),
        (["--adapter", "a={bin}"], "has no adapter_model.safetensors; the server loads safetensors weights only"),
        (["--adapter", "a={lora}", "--adapter", "a={lora}"], "the name 'a' is served twice"),
        (["--model", "m", "--adapter", "m={lora}"], "the name 'm' is served twice"),
        (["--adapter-root", "no/such/root"], "--adapter-root no/such/root is not a folder"),
        (["--max-concurrent", "0"], "--max-concurrent=0 must be at least 1"),
        (["--no-packed-weights", "--max-concurrent", "0"], "--max-concurrent=0 must be at least 1"),
        (["--port", "70000"], "--port=70000 must be in 0-65535"),
        (["--prefix-cache", "-1"], "--prefix-cache=-1 must be a number of tokens, 0 (none) or more"),
    ],
)
def test_bad_flags_are_one_line_and_exit_2(tmp_path, capsys, flags, message):
    folders = {
        "ia3": fake_adapter(tmp_path / "ia3", "IA3"),
        "bin": fake_adapter(tmp_path / "bin", weights=False),
        "lora": fake_adapter(tmp_path / "lora"),
    }
    assert main(["serve", *[flag.format(**folders) for flag in flags]]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deltatune serve: error: ") and message in lines[0], lines


PROBE = "import sys; from deltatune.cli.main import main; code = main(sys.argv[1:]); print('torch' in sys.modules); "
PROBE += "sys.exit(code)"


@pytest.mark.subprocess
def test_a_bad_adapter_folder_is_refused_before_torch_loads(tmp_path):
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", PROBE, "serve", "--adapter", f"a={tmp_path / 'none'}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and done.stdout.strip() == "False", done.stdout + done.stderr
    assert "is not a folder" in done.stderr and time.perf_counter() - start < 2.0


def start_server(*flags: str) -> tuple[subprocess.Popen, str]:
    """``deltatune serve FLAGS --port 0`` in a child process, and its base URL once it listens."""
    command = [sys.executable, "-m", "deltatune.cli.main", "serve", *flags, "--port", "0", "--log-level", "warning"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    seen = []
    for line in process.stderr:
        seen.append(line)
        if line.startswith("deltatune serve: http://"):
            return process, line.split()[2]
    raise AssertionError(f"the server never listened: {''.join(seen)}")


@pytest.mark.subprocess
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_the_command_answers_and_exits_on_a_signal(stop):
    model_dir, adapters = tiny_setup()
    process, url = start_server("--model", str(model_dir), "--adapter", f"plain={adapters['plain']}")
    try:
        assert url.startswith("http://127.0.0.1:")
        reply = client(url).completions.create(model="plain", prompt="Hello", max_tokens=6, temperature=0)
        assert reply.choices[0].text == Reference(model_dir).complete(adapters["plain"], "Hello", 6)
        process.send_signal(stop)
        process.wait(20)
    finally:
        process.kill()
    rest = process.stderr.read()
    if stop == signal.SIGINT:
        assert process.returncode == 0 and "deltatune serve: stopped" in rest, rest
    else:  # uvicorn shuts down gracefully, then re-raises SIGTERM's default: exit by that signal
        assert process.returncode in (0, -signal.SIGTERM), rest


def test_a_missing_web_stack_names_the_extra(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    assert main(["serve"]) == 2
    assert "deltatune serve needs uvicorn: pip install 'deltatune[serve]'" in capsys.readouterr().err
