"""Why a LoRA layer trains on the plain path instead of the fused one: one log line per reason and process.

The fused functions apply only where they reproduce the modules exactly; anywhere else the layer runs
module by module, with the same numbers and more memory and time. That is never silent: the first time
a reason occurs, ``deltatune.tuners.lora`` logs it (INFO), so a slower run after an upgrade of torch or
transformers, or a model written another way, says why.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from deltatune.compat.torch import has_hooks

_log = logging.getLogger("deltatune.tuners.lora")
_said: set[str] = set()


def log_fallback(what: str, reason: str) -> None:
    """Log "``what`` runs unfused: ``reason``" once per process."""
    line = f"{what} trains on the plain (unfused) path: {reason}"
    if line not in _said:
        _said.add(line)
        _log.info(line)


def linear_fallback_reason(base: nn.Module, x: torch.Tensor, has_b_bias: bool) -> str:
    """Why the fused LoRA function does not apply to base layer ``base`` for input ``x``, in words."""
    if has_hooks(base):
        return "its base layer has hooks (or a patched forward)"
    if base.weight.requires_grad:
        return "its base weight is trainable"
    if has_b_bias:
        return "lora_bias (the fused function has no B bias)"
    dtype = getattr(base, "compute_dtype", None) or base.weight.dtype
    if x.dtype != dtype:
        return f"its input is {x.dtype} and its weight computes in {dtype}"
    return f"its base layer is a {type(base).__name__}"
