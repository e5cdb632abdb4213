"""How a benchmark measures a step: wall time per call, peak memory, the bytes autograd saves, weight bytes as held."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn


def weight_bytes(params: Iterable[nn.Parameter]) -> int:
    """Bytes of ``params`` as held, each storage once; a quantised weight's scales included (bitsandbytes
    keeps them beside the parameter: a 4-bit ``quant_state``, 8-bit ``SCB``)."""
    storages: dict[int, int] = {}
    for param in params:
        tensors = [param]
        state = getattr(param, "quant_state", None)
        if state is not None:
            tensors += [state.absmax, state.code]
            if state.nested:
                tensors += [state.state2.absmax, state.state2.code]
        if getattr(param, "SCB", None) is not None:
            tensors.append(param.SCB)
        storages.update({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors})
    return sum(storages.values())


def timed(fn: Callable[[], Any], count: int, device: str) -> tuple[list[float], list[float]]:
    """(wall seconds, process CPU seconds) of ``count`` calls of ``fn``.

    On a shared CPU, wall time counts the time other processes held the cores; the process's
    CPU time counts only the work this process did, so it is the fairer clock for comparing modes.
    """
    wall, cpu = [], []
    for _ in range(count):
        synchronize(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        synchronize(device)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return wall, cpu


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def profiled_step(step: Callable[[], None], model: nn.Module, device: str) -> tuple[int, int]:
    """Two more steps: (bytes autograd saves for backward, CPU: peak bytes allocated during a step).

    The saved bytes are counted in a step of their own, since counting keeps every saved storage
    alive until the step ends (which would raise the peak).
    """
    with saved_storages(model) as saved:
        step()
    if device == "cuda":
        return sum(saved.values()), 0
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return sum(saved.values()), peak


@contextlib.contextmanager
def saved_storages(model: nn.Module) -> Iterator[dict[int, int]]:
    """Yields {storage: bytes} of what autograd saves for backward inside the block.

    Each storage counts once (x shared by q/k/v counts once); the model's parameters are left
    out (a saved ``W.t()`` is a view of a weight, not new memory). Storages are told apart by
    their C++ object, which also works on ``meta``, where every data pointer is 0. Every counted
    storage is kept alive until the block ends: a graph freed inside the block (peft's DoRA
    detaches one per call) would otherwise free a storage whose address the next one reuses, and
    the count would depend on the allocator.
    """
    weights = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, int] = {}
    alive: list[torch.UntypedStorage] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in weights and storage._cdata not in saved:
            saved[storage._cdata] = storage.nbytes()
            alive.append(storage)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield saved
    alive.clear()


def live_bytes(model: nn.Module, optimizer) -> int:
    """Bytes of the weights, buffers and optimizer state alive between steps."""
    tensors = [*model.parameters(), *model.buffers()]
    if optimizer is not None:
        tensors += [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())
