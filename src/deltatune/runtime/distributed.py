"""Training on several processes (``torchrun`` / ``accelerate launch``): who writes, and saving sharded adapters.

Data parallel (DDP): every process holds the whole model and takes a slice of each global batch;
after backward the gradients of the trainable (adapter) parameters are averaged across processes,
so with equal token counts per process one step on P processes x b examples is the step one process
takes on all P*b examples (up to the order of fp32 sums). The frozen base sends no gradients.

FSDP (``torch.distributed.fsdp.fully_shard``): every parameter, frozen or not, is split across the
processes, so each holds 1/P of the base model; a unit may mix the frozen base and the trainable
adapters. An adapter parameter is then a ``DTensor`` shard; to save, every process gathers the full
adapter tensors (a collective) and the main process writes them::

    state = gather_adapter_state(model)              # on every process
    if is_main_process():
        model.save_pretrained(path, state_dict=state)

Only the main process (rank 0) writes files; see docs/scaling.md.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from deltatune.model import DeltaModel


def rank() -> int:
    """This process's global rank: from the process group once it exists, else from ``RANK`` (0 alone)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """True on the one process that writes files (rank 0; the only process of a plain run)."""
    return rank() == 0


def gather_adapter_state(model: DeltaModel, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter ``adapter_name``'s entries of ``model.state_dict()`` as full CPU tensors.

    Under FSDP each parameter is a shard and this is a collective: every process must call it, in
    the same order. Without sharding it is a plain copy. Pass the result to
    ``model.save_pretrained(..., state_dict=...)`` on the main process.
    """
    return {f"base_model.{name}": _full(param) for name, param in model.adapter_state(adapter_name).items()}


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on the CPU; a ``DTensor`` shard is all-gathered first."""
    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.detach().to("cpu", copy=True)
