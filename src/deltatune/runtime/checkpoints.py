"""Which checkpoint is safe to resume from: a completeness marker written last, and the newest one.

A checkpoint folder is *complete* when its marker file ``checkpoint_complete.json`` exists and every
file the marker lists is there with the listed size. ``mark_complete`` fsyncs every file first and
writes the marker atomically last, so a folder torn by a kill, a full disk, an interrupted copy or a
half-finished rotation either has no marker or fails the size check::

    checkpoints/checkpoint-200/   adapter files, optimizer.pt, trainer_state.json, ..., checkpoint_complete.json
    checkpoints/checkpoint-300/   (killed while writing: no marker)  -> resume from checkpoint-200

Sizes, not hashes: a check costs one ``stat`` per file, even for a multi-gigabyte optimizer state.
``MarkCompleteCallback`` marks the checkpoints of a ``transformers.Trainer`` run.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch.distributed as dist
from transformers import (
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from deltatune.runtime.atomic import atomic_file, fsync_path

COMPLETE_MARKER = "checkpoint_complete.json"
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")  # transformers.Trainer's folder names


def mark_complete(folder: str | os.PathLike) -> None:
    """Record every file of ``folder`` (relative path -> size) in its marker, written last.

    Call it once everything else in the folder is written (in a distributed run: once, on the main
    process, after every process has written its part).
    """
    folder = Path(folder)
    sizes = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != COMPLETE_MARKER:
            fsync_path(path)
            sizes[path.relative_to(folder).as_posix()] = path.stat().st_size
    with atomic_file(folder / COMPLETE_MARKER) as marker:
        marker.write_text(json.dumps({"files": sizes}, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def is_complete_checkpoint(folder: str | os.PathLike) -> bool:
    """True when ``folder`` has a readable marker and every file it lists has the listed size."""
    folder = Path(folder)
    try:
        sizes = json.loads((folder / COMPLETE_MARKER).read_text(encoding="utf-8"))["files"]
        return all((folder / name).stat().st_size == size for name, size in sizes.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def latest_complete_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete ``checkpoint-<step>`` folder of ``output_dir`` with the highest step, or None.

    Incomplete folders (a run killed while saving) and temporary ones are passed over.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    steps = {int(m.group(1)): path for path in output_dir.iterdir() if (m := CHECKPOINT_NAME.match(path.name))}
    for step in sorted(steps, reverse=True):
        if is_complete_checkpoint(steps[step]):
            return steps[step]
    return None


def checkpoint_step(folder: str | os.PathLike) -> int | None:
    """The training step ``folder`` was saved at: its trainer_state.json's ``global_step``, else the
    number in its ``checkpoint-<step>`` name, else None."""
    folder = Path(folder)
    try:
        return int(json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        match = CHECKPOINT_NAME.match(folder.name)
        return int(match.group(1)) if match else None


class MarkCompleteCallback(TrainerCallback):
    """Marks each checkpoint ``transformers.Trainer`` saves as complete, once every process wrote its part
    (under DDP each process writes its own ``rng_state_<rank>.pth``)::

        trainer.add_callback(MarkCompleteCallback())
        trainer.train(resume_from_checkpoint=latest_complete_checkpoint(args.output_dir))

    The Trainer removes old checkpoints (``save_total_limit``) just before this runs, so keep that
    limit at 2 or more: then a complete checkpoint exists at every moment.
    """

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        if args.should_save:
            mark_complete(Path(args.output_dir) / f"checkpoint-{state.global_step}")
