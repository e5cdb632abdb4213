"""Multi-process data parallel (DDP) and FSDP on the CPU: 2 processes under torchrun, gloo backend.

The workers (tests/ddp_worker.py) train the same tiny LoRA llama three ways; each result must equal
a single-process run over the same global batch within fp32 tolerance, on both ranks, and only
rank 0 may write under the run folders.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ddp_worker as worker
from deltatune import DeltaModel
from deltatune.errors import ConfigError
from deltatune.runtime.checkpoints import COMPLETE_MARKER, latest_complete_checkpoint
from deltatune.runtime.distributed import gather_adapter_state, is_main_process, rank
from tiny_models import tiny_llama

pytestmark = pytest.mark.multiprocess

WORKER = Path(worker.__file__)


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> Path:
    """Run the workers once under ``torchrun --standalone --nproc_per_node=2``; return their OUT folder."""
    out = tmp_path_factory.mktemp("distributed")
    (out / "results").mkdir()
    (out / "runs").mkdir()
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(WORKER),
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[str, dict[str, torch.Tensor]]:
    """Single-process results over the whole global batch: the Trainer's, and the plain loop's."""
    model = worker.fresh_model()
    _, rows = worker.train_with_trainer(model, tmp_path_factory.mktemp("single"), per_device=worker.GLOBAL_BATCH)
    assert rows == [worker.GLOBAL_BATCH] * worker.STEPS
    trainer = worker.adapter_weights(model)
    model = worker.fresh_model()
    worker.train_loop(model, model, worker.global_batch())
    return {"trainer": trainer, "ddp": worker.adapter_weights(model), "fsdp": worker.adapter_weights(model)}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_the_trainer_ran_data_parallel_on_gloo(launched: Path) -> None:
    """Each process saw half of every global batch, so equal results below mean averaged gradients."""
    for r in (0, 1):
        seen = json.loads((launched / "results" / f"rank{r}.json").read_text())
        assert seen["world_size"] == 2 and seen["backend"] == "gloo"
        assert seen["rows_per_step"] == [worker.GLOBAL_BATCH // 2] * worker.STEPS


@pytest.mark.parametrize("way", worker.WAYS)
def test_two_processes_equal_one_process_over_the_global_batch(launched: Path, references, way: str) -> None:
    initial = worker.adapter_weights(worker.fresh_model())
    reference = references[way]
    assert _max_diff(reference, initial) > 1e-3  # training moved the adapter
    for r in (0, 1):
        trained = load_file(launched / "results" / f"{way}_rank{r}.safetensors")
        assert _max_diff(trained, reference) < 1e-6, (way, r)


@pytest.mark.parametrize("way", worker.WAYS)
def test_the_saved_adapter_is_the_trained_one(launched: Path, way: str) -> None:
    """Rank 0's files (for FSDP: gathered from the shards) load back to the trained weights exactly."""
    trained = load_file(launched / "results" / f"{way}_rank0.safetensors")
    loaded = DeltaModel.from_pretrained(tiny_llama(), launched / "runs" / way / "adapter")
    assert _max_diff(worker.adapter_weights(loaded), trained) == 0.0


CHECKPOINT = f"trainer/checkpoint-{worker.STEPS}"


def test_only_rank_0_writes(launched: Path) -> None:
    """Every Python-level write is audited (deltatune's saves all are); torch.save writes from C++, so the
    exact file list covers those. The one file rank 1 writes is transformers' per-process RNG state,
    which an exact resume needs."""
    writes = {r: json.loads((launched / "results" / f"rank{r}.json").read_text())["writes"] for r in (0, 1)}
    assert all(entry == {"event": "os.mkdir", "path": CHECKPOINT} for entry in writes[1]), writes[1]
    written = {entry["path"] for entry in writes[0]}
    for way in worker.WAYS:
        assert f"{way}/adapter/adapter_model.safetensors" in written
    adapter_files = ("adapter_config.json", "adapter_model.safetensors")
    checkpoint_files = (
        *adapter_files,
        "checkpoint_complete.json",
        "optimizer.pt",
        "scheduler.pt",
        "rng_state_0.pth",
        "rng_state_1.pth",
        "trainer_state.json",
    )
    expected = [f"{way}/adapter/{name}" for way in worker.WAYS for name in adapter_files]
    expected += [f"{CHECKPOINT}/{name}" for name in checkpoint_files]
    files = [p.relative_to(launched / "runs").as_posix() for p in (launched / "runs").rglob("*") if p.is_file()]
    assert sorted(files) == sorted(expected)


def test_the_checkpoint_is_marked_complete_after_every_process_wrote_its_part(launched: Path) -> None:
    checkpoint = launched / "runs" / CHECKPOINT
    assert latest_complete_checkpoint(checkpoint.parent) == checkpoint
    listed = json.loads((checkpoint / COMPLETE_MARKER).read_text())["files"]
    assert {"rng_state_0.pth", "rng_state_1.pth", "optimizer.pt", "adapter_model.safetensors"} <= set(listed)


def test_a_plain_process_is_the_main_one() -> None:
    assert rank() == 0 and is_main_process()


def test_gathering_without_sharding_copies_the_adapter(tmp_path: Path) -> None:
    model = worker.fresh_model()
    state = gather_adapter_state(model)
    assert sorted(state) == sorted(f"base_model.{name}" for name in model.adapter_state("default"))
    assert all(state[f"base_model.{n}"].data_ptr() != p.data_ptr() for n, p in model.adapter_state("default").items())
    state = {key: value + 1 for key, value in state.items()}
    model.save_pretrained(tmp_path, state_dict=state)  # the given tensors are saved, not the live ones
    loaded = DeltaModel.from_pretrained(tiny_llama(), tmp_path)
    expected = {key.removeprefix("base_model."): value for key, value in state.items()}
    assert _max_diff(worker.adapter_weights(loaded), expected) == 0.0


def test_a_state_dict_without_the_adapter_is_refused(tmp_path: Path) -> None:
    model = worker.fresh_model()
    state = gather_adapter_state(model)
    first = sorted(state)[0]
    del state[first]
    with pytest.raises(ConfigError, match=f"state_dict lacks {first}"):
        model.save_pretrained(tmp_path, state_dict=state)
    assert not any(tmp_path.iterdir())
