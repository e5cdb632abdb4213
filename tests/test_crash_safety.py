"""kill -9 at random moments while saving: the target is always the previous version or the new one.

For each kind of target, a forked child saves version after version in a loop while the parent
SIGKILLs it after a seeded random delay, 20 times:

* ``adapter``: ``save_pretrained`` of two adapters with the same config and different weights,
* ``folder``: ``atomic_directory`` with versions that differ in their files as well as their bytes,
* ``checkpoint``: numbered checkpoints (``atomic_directory`` + ``mark_complete``) and a rotation that
  deletes old ones non-atomically, as transformers' Trainer does,
* ``in-place-checkpoint``: the same, written in place as the Trainer writes them and only then marked
  complete (what ``MarkCompleteCallback`` does), so the marker alone must tell a torn one apart.

After each kill the target must load and equal one whole version exactly (for checkpoints: the
newest complete one, and every folder that claims to be complete is); the dead child's temporary
leftovers are ignored, and the next writer removes them.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from deltatune import DeltaModel, LoraConfig, get_delta_model
from deltatune.runtime.atomic import atomic_directory
from deltatune.runtime.checkpoints import (
    is_complete_checkpoint,
    latest_complete_checkpoint,
    mark_complete,
)
from file_trees import read_tree, write_tree

KILLS = 20
SEED = 0


def _base() -> LlamaForCausalLM:
    """A llama wide enough that an all-linear r=32 adapter is ~1.6 MB, so writes take measurable time."""
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
        max_position_embeddings=32,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval()


def _adapter(seed: int) -> DeltaModel:
    model = get_delta_model(_base(), LoraConfig(r=32, lora_alpha=16, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.adapter_state("default").values():
            param.copy_(torch.randn(param.shape, generator=generator))
    return model


def _folder_version(number: int) -> dict[str, bytes]:
    """What version ``number`` of the folder holds: the two versions differ in files as well as bytes."""
    payload = bytes([number % 256]) * 1_000_000
    files = {"weights.bin": payload, "meta.json": f'{{"version": {number}}}'.encode()}
    if number % 2:
        files["extra/notes.txt"] = b"only in odd versions"
    return files


def _save_forever(kind: str, adapters: list[DeltaModel], root: Path, first: int, ready: Path) -> None:
    """The child: save version after version of ``kind`` until killed; touch ``ready`` after the first."""
    number = first
    while True:
        if kind == "adapter":
            adapters[number % 2].save_pretrained(root / "adapter")
        elif kind == "folder":
            with atomic_directory(root / "folder") as staging:
                write_tree(staging, _folder_version(number))
        elif kind == "checkpoint":
            with atomic_directory(root / "checkpoints" / f"checkpoint-{number}") as staging:
                write_tree(staging, _folder_version(number))
                mark_complete(staging)
            shutil.rmtree(root / "checkpoints" / f"checkpoint-{number - 2}", ignore_errors=True)  # rotation
        else:  # as transformers' Trainer writes a checkpoint: in place, then MarkCompleteCallback marks it
            write_tree(root / "checkpoints" / f"checkpoint-{number}", _folder_version(number))
            mark_complete(root / "checkpoints" / f"checkpoint-{number}")
            shutil.rmtree(root / "checkpoints" / f"checkpoint-{number - 2}", ignore_errors=True)
        ready.touch()
        number += 1


def _temporaries(root: Path) -> list[str]:
    return [p.name for p in root.rglob(".*") if p.name.endswith((".tmp", ".old"))]


def _torn(root: Path) -> bool:
    """Whether the kill hit a save half-way: temporaries exist, or the newest checkpoint folder is incomplete."""
    steps = sorted((root / "checkpoints").glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    return bool(_temporaries(root)) or bool(steps and not is_complete_checkpoint(steps[-1]))


def _check_adapter(root: Path, base: LlamaForCausalLM, versions: list[dict[str, torch.Tensor]]) -> int:
    loaded = DeltaModel.from_pretrained(base, root / "adapter")
    state = {k: v.detach().clone() for k, v in loaded.adapter_state("default").items()}
    loaded.unload()
    matches = [n for n, version in enumerate(versions) if all(torch.equal(state[k], version[k]) for k in version)]
    assert len(matches) == 1
    return matches[0] + 1  # the next child writes the other version first


def _check_folder(root: Path) -> int:
    folder = read_tree(root / "folder")
    number = json.loads(folder["meta.json"])["version"]
    assert folder == _folder_version(number)
    return number + 1


def _check_checkpoints(root: Path) -> int:
    latest = latest_complete_checkpoint(root / "checkpoints")
    assert latest is not None
    for checkpoint in (root / "checkpoints").glob("checkpoint-*"):
        if is_complete_checkpoint(checkpoint):  # a checkpoint half-removed by the rotation is not
            files = {k: v for k, v in read_tree(checkpoint).items() if k != "checkpoint_complete.json"}
            assert files == _folder_version(int(checkpoint.name.split("-")[1]))
    return int(latest.name.split("-")[1]) + 1  # the next child goes on after the newest complete one


@pytest.mark.subprocess
@pytest.mark.parametrize("kind", ["adapter", "folder", "checkpoint", "in-place-checkpoint"])
def test_kill_9_at_random_moments_leaves_a_whole_version(tmp_path: Path, kind: str) -> None:
    adapters = [_adapter(1), _adapter(2)] if kind == "adapter" else []
    versions = [{k: v.detach().clone() for k, v in a.adapter_state("default").items()} for a in adapters]
    base = _base()
    rng = random.Random(SEED)
    context = multiprocessing.get_context("fork")
    number, torn_moments = 0, 0
    started = time.monotonic()
    kills = 0
    # At least KILLS kills, and more (up to 3x) on a busy machine until a quarter hit a half-written save.
    while kills < KILLS or (torn_moments < KILLS // 4 and kills < 3 * KILLS):
        kills += 1
        ready = tmp_path / "ready"
        ready.unlink(missing_ok=True)
        child = context.Process(target=_save_forever, args=(kind, adapters, tmp_path, number, ready), daemon=True)
        child.start()
        try:
            while not ready.exists():
                assert child.is_alive(), f"the saving child died on its own (exit code {child.exitcode})"
                time.sleep(0.001)
            time.sleep(rng.uniform(0.0, 0.03))
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.join()
        assert child.exitcode == -signal.SIGKILL
        torn_moments += _torn(tmp_path)
        if kind == "adapter":
            number = _check_adapter(tmp_path, base, versions)
        elif kind == "folder":
            number = _check_folder(tmp_path)
        else:
            number = _check_checkpoints(tmp_path)

    assert torn_moments >= KILLS // 4, (torn_moments, kills)  # kills must hit half-written saves, or the test is idle
    assert time.monotonic() - started < 60
    ready.unlink()
    child = context.Process(target=_save_forever, args=(kind, adapters, tmp_path, number, ready), daemon=True)
    child.start()  # the next writer removes the dead children's leftovers
    while not ready.exists():
        time.sleep(0.001)
    os.kill(child.pid, signal.SIGSTOP)
    leftovers = [name for name in _temporaries(tmp_path) if f".{child.pid}." not in name]
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    assert leftovers == []


@pytest.mark.parametrize("damage", ["no-marker", "file-removed", "file-truncated", "marker-garbage"])
def test_an_incomplete_checkpoint_is_passed_over(tmp_path: Path, damage: str) -> None:
    for step in (100, 200):
        folder = tmp_path / f"checkpoint-{step}"
        write_tree(folder, _folder_version(step))
        mark_complete(folder)
    newest = tmp_path / "checkpoint-200"
    assert latest_complete_checkpoint(tmp_path) == newest
    if damage == "no-marker":
        (newest / "checkpoint_complete.json").unlink()
    elif damage == "file-removed":
        (newest / "meta.json").unlink()
    elif damage == "file-truncated":
        (newest / "weights.bin").write_bytes(b"\0" * 10)
    else:
        (newest / "checkpoint_complete.json").write_text('["not", "a", "manifest"]')
    assert not is_complete_checkpoint(newest)
    assert latest_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-100"


def test_latest_complete_checkpoint_orders_by_step_and_ignores_other_folders(tmp_path: Path) -> None:
    for name in ("checkpoint-9", "checkpoint-10", "checkpoint-10-old", ".checkpoint-11.123.abc.tmp", "runs"):
        (tmp_path / name).mkdir()
        mark_complete(tmp_path / name)
    assert latest_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    assert latest_complete_checkpoint(tmp_path / "missing") is None
