"""Which mixed precision a run trains in, and a probe for CPUs whose half-precision GEMM is slow.

Many CPUs have no bf16/fp16 matrix units; torch then multiplies half-precision matrices through a
slow fallback (measured on a 2-core AMD EPYC: bf16 ~15x slower than fp32 per step). A run asked to
train in bf16 on such a CPU hears so, with the measured factor, before it starts.
"""

from __future__ import annotations

import time

import torch

from deltatune.errors import ConfigError

# A matrix product of a small model's MLP shape: big enough to reach the GEMM kernels, ~1 ms in fp32.
_PROBE_SHAPE = (256, 576, 1536)
SLOW_FACTOR = 2.0  # slower than fp32 by more than this: the user is told


def mixed_precision_flags(precision: str) -> dict[str, bool]:
    """TrainingArguments' bf16/fp16 flags for ``precision`` on this machine ("auto": bf16 on a GPU that has it)."""
    cuda = torch.cuda.is_available()
    if precision == "auto":
        precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and not cuda:
        raise ConfigError("precision=fp16 needs a CUDA GPU; use precision=bf16 or fp32 on this machine")
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ConfigError("precision=bf16 is not supported by this GPU; use precision=fp16")
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def cpu_autocast_slowdown(dtype: torch.dtype = torch.bfloat16, repeats: int = 3) -> float:
    """How many times slower a linear layer's forward and backward run on the CPU under ``dtype``
    autocast (what mixed precision trains with) than in fp32, best of ``repeats`` each."""
    m, k, n = _PROBE_SHAPE
    generator = torch.Generator().manual_seed(0)
    x, weight = torch.randn(m, k, generator=generator, requires_grad=True), torch.randn(n, k, generator=generator)
    half = _best_time(lambda: _linear_step(x, weight, dtype), repeats)
    return half / _best_time(lambda: _linear_step(x, weight, None), repeats)


def _linear_step(x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype | None) -> None:
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        y = torch.nn.functional.linear(x, weight)
    y.float().sum().backward()


def _best_time(step, repeats: int) -> float:
    step()  # warm-up: first calls pick kernels and allocate
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - started)
    return max(best, 1e-9)


def slow_half_precision_notice(flags: dict[str, bool]) -> str | None:
    """A one-line warning when a CPU run would train in bf16 and this CPU's bf16 GEMM is slow, else None."""
    if not flags["bf16"] or torch.cuda.is_available():
        return None
    factor = cpu_autocast_slowdown(torch.bfloat16)
    if factor <= SLOW_FACTOR:
        return None
    return (
        f"warning: precision=bf16 on this CPU: a bf16 linear layer measured {factor:.1f}x slower than fp32, "
        f"so training will be several times slower; use precision=fp32 (or auto)"
    )
