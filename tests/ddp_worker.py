"""Multi-process training of a tiny llama with LoRA, three ways, for tests/test_distributed.py.

Run as ``torchrun --standalone --nproc_per_node=2 tests/ddp_worker.py OUT`` (gloo on the CPU), every
process trains, in turn, with

* ``trainer``: ``DeltaTrainer`` (transformers' Trainer wraps the model in DDP itself),
* ``ddp``: a plain loop over ``torch.nn.parallel.DistributedDataParallel``,
* ``fsdp``: a plain loop over ``fully_shard`` (FSDP2): every decoder layer and the whole model sharded,

and writes its adapter weights to ``OUT/results/<way>_rank<r>.safetensors``. Rank 0 saves each adapter
under ``OUT/runs/<way>/adapter``. ``OUT/results/rank<r>.json`` holds what the Trainer saw (world size,
backend, rows per step) and every write the process made under ``OUT/runs`` (an audit hook logs them).
The test imports the same functions to train the single-process references.

Every step sees the same global batch (``GLOBAL_BATCH`` equal-length rows, every token labelled), so
the data order and the split across processes cannot change the result.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

from deltatune import DeltaModel, LoraConfig, get_delta_model  # noqa: E402
from deltatune.tuners.lora.mlp import FusedGatedMlp  # noqa: E402
from tiny_models import VOCAB, tiny_llama  # noqa: E402

GLOBAL_BATCH = 4
LENGTH = 8
STEPS = 3
LEARNING_RATE = 1e-2
WAYS = ("trainer", "ddp", "fsdp")


def global_batch() -> torch.Tensor:
    """The token ids every step trains on: [GLOBAL_BATCH, LENGTH]."""
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, LENGTH), generator=torch.Generator().manual_seed(3))


def fresh_model() -> DeltaModel:
    """The same tiny llama with LoRA (r=4) on q/v and the MLP (which then runs as one fused function)
    in every process; B starts non-zero so A learns from step 1."""
    targets = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = get_delta_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
        assert all(isinstance(layer.mlp, FusedGatedMlp) for layer in model.base_model.model.layers)
        for name, param in model.adapter_state("default").items():
            if "lora_B" in name:
                nn.init.normal_(param, std=0.02)
    return model


def adapter_weights(model: DeltaModel) -> dict[str, torch.Tensor]:
    """In-memory name -> a copy of every adapter parameter of an unsharded model."""
    return {name: param.detach().clone() for name, param in model.adapter_state("default").items()}


def train_with_trainer(model: DeltaModel, output_dir: Path, per_device: int):
    """``STEPS`` AdamW steps with ``DeltaTrainer``, each over the whole global batch; the last step writes
    ``output_dir/checkpoint-<STEPS>``, marked complete."""
    from transformers import TrainingArguments

    from deltatune.runtime.checkpoints import MarkCompleteCallback
    from deltatune.train.trainer import DeltaTrainer

    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=per_device,
        max_steps=STEPS,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=0.0,
        save_strategy="steps",
        save_steps=STEPS,
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    examples = [{"input_ids": row, "labels": row} for row in global_batch()]
    rows_per_step: list[int] = []

    def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        rows_per_step.append(len(rows))
        return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}

    trainer = DeltaTrainer(model=model, args=args, train_dataset=examples, data_collator=collate)
    trainer.add_callback(MarkCompleteCallback())
    trainer.train()
    return trainer, rows_per_step


def train_loop(forward: nn.Module, model: DeltaModel, rows: torch.Tensor) -> None:
    """``STEPS`` plain AdamW steps of ``forward`` (``model`` itself, or its DDP wrapper) on ``rows``."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    model.train()
    for _ in range(STEPS):
        forward(input_ids=rows, labels=rows).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def _record_writes(root: Path, log: list[dict[str, str]]) -> None:
    """Log every file-system change under ``root`` this process makes (opens for writing, renames,
    new folders, removals): Python raises an audit event for each, wherever the call comes from."""
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    prefix = str(root.resolve())

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & write_flags)
            paths = [path] if writes else []
        elif event in ("os.rename", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "os.symlink", "os.link"):
            paths = [arg for arg in args[:2] if isinstance(arg, (str, bytes, os.PathLike))]
        else:
            return
        for path in paths:
            if isinstance(path, (str, os.PathLike)) and os.path.abspath(path).startswith(prefix):
                log.append({"event": event, "path": os.path.relpath(path, prefix)})

    sys.addaudithook(hook)


def main(out: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    from deltatune.runtime.distributed import gather_adapter_state, is_main_process

    torch.set_num_threads(1)
    runs, results = out / "runs", out / "results"
    writes: list[dict[str, str]] = []
    _record_writes(runs, writes)

    model = fresh_model()
    trainer, rows = train_with_trainer(
        model, runs / "trainer", per_device=GLOBAL_BATCH // int(os.environ["WORLD_SIZE"])
    )
    trainer.save_model(str(runs / "trainer" / "adapter"))  # DeltaTrainer saves on rank 0 only
    rank, world = dist.get_rank(), dist.get_world_size()  # the Trainer set up the gloo process group
    mine = global_batch().chunk(world)[rank]
    save_file(adapter_weights(model), results / f"trainer_rank{rank}.safetensors")
    seen = {"world_size": trainer.args.world_size, "backend": dist.get_backend(), "rows_per_step": rows}

    model = fresh_model()
    train_loop(DistributedDataParallel(model), model, mine)
    save_file(adapter_weights(model), results / f"ddp_rank{rank}.safetensors")
    if is_main_process():
        model.save_pretrained(runs / "ddp" / "adapter")

    model = fresh_model()
    for layer in model.base_model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    train_loop(model, model, mine)
    state = gather_adapter_state(model)  # a collective: every process gathers the shards
    save_file(
        {name.removeprefix("base_model."): t for name, t in state.items()}, results / f"fsdp_rank{rank}.safetensors"
    )
    if is_main_process():
        model.save_pretrained(runs / "fsdp" / "adapter", state_dict=state)

    dist.barrier()
    (results / f"rank{rank}.json").write_text(json.dumps({**seen, "writes": writes}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
