"""``deltatune train`` killed with SIGKILL in the middle of writing a checkpoint, then resumed with
``resume_from_checkpoint=last``, ends with the same adapter bytes as a run that was never interrupted.

The killed run is a real process: it SIGKILLs itself while checkpoint-6 is half written (adapter and
optimizer saved, RNG and trainer state not), so nothing of it can clean up. The resume must pass over
that torn folder, start from checkpoint-4 (the newest complete one) and train steps 5 to 8 only.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from deltatune.cli.main import main
from deltatune.runtime.checkpoints import COMPLETE_MARKER, latest_complete_checkpoint
from deltatune.train.trainer import DeltaTrainer
from sft_helpers import TINY_RUN, save_tiny_chat_model, write_arithmetic_jsonl

# fp32 on the CPU, one thread (as tests/conftest.py sets it), a checkpoint every 2 of 8 steps.
RUN = {**TINY_RUN, "max_steps": 8, "save_steps": 2, "save_total_limit": 2, "precision": "fp32", "lora_dropout": 0.1}

# Runs `deltatune train` and SIGKILLs the process half-way through writing checkpoint-6.
KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    import torch
    from transformers import Trainer
    from deltatune.cli.main import main

    torch.set_num_threads(1)
    save_rng_state = Trainer._save_rng_state

    def kill_in_checkpoint_6(self, output_dir):
        if os.path.basename(output_dir) == "checkpoint-6":
            os.kill(os.getpid(), signal.SIGKILL)
        save_rng_state(self, output_dir)

    Trainer._save_rng_state = kill_in_checkpoint_6
    main(sys.argv[1:])
""")


def _argv(model: Path, data: Path, output_dir: Path, *extra: str) -> list[str]:
    keys = [f"{key}={value}" for key, value in RUN.items()]
    return ["train", f"model={model}", f"data={data}", f"output_dir={output_dir}", *keys, *extra]


@pytest.mark.subprocess
def test_a_run_killed_mid_checkpoint_resumes_to_the_same_adapter_bytes(tmp_path: Path, capsys, monkeypatch) -> None:
    model, data = save_tiny_chat_model(tmp_path / "model"), write_arithmetic_jsonl(tmp_path / "data.jsonl")
    assert main(_argv(model, data, tmp_path / "whole")) == 0

    killed = tmp_path / "killed"
    done = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, *_argv(model, data, killed)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    checkpoints = killed / "checkpoints"
    assert (checkpoints / "checkpoint-6" / "optimizer.pt").is_file()  # torn: no trainer state, no marker
    assert not (checkpoints / "checkpoint-6" / COMPLETE_MARKER).exists()
    assert latest_complete_checkpoint(checkpoints) == checkpoints / "checkpoint-4"
    assert not (killed / "adapter").exists()

    steps = []
    training_step = DeltaTrainer.training_step

    def counted(self, *args, **kwargs):
        steps.append(1)
        return training_step(self, *args, **kwargs)

    monkeypatch.setattr(DeltaTrainer, "training_step", counted)
    capsys.readouterr()
    assert main(_argv(model, data, killed, "resume_from_checkpoint=last")) == 0, capsys.readouterr().err
    assert len(steps) == 4  # steps 5..8: the first four came from checkpoint-4
    whole, resumed = (folder / "adapter" / "adapter_model.safetensors" for folder in (tmp_path / "whole", killed))
    assert resumed.read_bytes() == whole.read_bytes()
