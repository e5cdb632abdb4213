"""Per-token log-probabilities of a linear head at a temperature, computed a chunk of rows at a time.

For hidden states ``h`` [N, H], a head ``W`` [V, H] (bias ``b``), targets ``t`` [N] and a temperature ``T``::

    logp_i = z_i,t_i − logsumexp_v(z_iv),      z = (h Wᵀ + b) / T   (fp32),   p_i = softmax(z_i)
    dlogp_i/dh_i = (W[t_i] − p_i W) / T =: D_i,    dlogp_i/dW = (onehot(t_i) − p_i)ᵀ h_i / T,
    dlogp_i/db = (onehot(t_i) − p_i) / T

The [N, V] logits never exist whole. The incoming gradient ``g`` is one scalar per row, so for a frozen
plain head the forward pass turns each chunk's softmax into its rows of ``D`` at once (one more head product)
and keeps only ``D`` (like ``h``); the backward pass returns ``g[:, None] · D``.

A trainable head (``dW`` would need every row's softmax, scaled by ``g``) or any other head module (a
LoRA-wrapped or token-trainable head) takes ``module_token_logps``: each chunk runs under activation
checkpointing, so only its input is kept and its logits are formed again in the backward pass.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from deltatune.kernels.linear_cross_entropy import chunk_rows


class _LinearTokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, rows):  # noqa: D102 (see the module docstring)
        logps = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
        slopes = torch.empty_like(hidden)
        for start in range(0, hidden.shape[0], rows):
            t = targets[start : start + rows]
            z = F.linear(hidden[start : start + rows], weight, bias).float().div_(temperature)
            lse = z.logsumexp(-1)
            logps[start : start + rows] = z.gather(1, t[:, None])[:, 0] - lse
            g = z.sub_(lse[:, None]).exp_().neg_()  # −softmax, in place of the logits
            g[torch.arange(len(t), device=g.device), t] += 1
            slopes[start : start + rows] = ((g.to(weight.dtype) @ weight) / temperature).to(hidden.dtype)
        ctx.save_for_backward(slopes)
        return logps

    @staticmethod
    def backward(ctx, grad_logps):  # noqa: D102
        (slopes,) = ctx.saved_tensors
        return (grad_logps[:, None] * slopes).to(slopes.dtype), None, None, None, None, None


def linear_token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    temperature: float = 1.0,
    rows: int | None = None,
) -> torch.Tensor:
    """log softmax((h_i Wᵀ + b) / T)[t_i] for each row of ``hidden`` [N, H]; ``weight`` [V, H]; ``targets`` [N].

    ``rows``: rows per chunk (default: ``chunk_rows(V)``). Returns [N] fp32.
    """
    rows = rows or chunk_rows(weight.shape[0])
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (weight, bias)):
        return module_token_logps(lambda h: F.linear(h, weight, bias), hidden, targets, temperature, rows)
    if not (torch.is_grad_enabled() and hidden.requires_grad):
        return _logps_only(lambda h: F.linear(h, weight, bias), hidden, targets, temperature, rows)
    return _LinearTokenLogps.apply(hidden, weight, bias, targets, temperature, rows)


def module_token_logps(
    head: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    rows: int,
) -> torch.Tensor:
    """log softmax(head(h_i) / T)[t_i] for any head, ``rows`` rows at a time, each chunk checkpointed: [N] fp32."""
    if not torch.is_grad_enabled():
        return _logps_only(head, hidden, targets, temperature, rows)
    logps = []
    for start in range(0, hidden.shape[0], rows):
        chunk = (hidden[start : start + rows], targets[start : start + rows])
        logps.append(checkpoint(_chunk_logps, head, *chunk, temperature, use_reentrant=False))
    return torch.cat(logps)


def _chunk_logps(head, hidden: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    z = head(hidden).float() / temperature
    return z.gather(1, targets[:, None])[:, 0] - z.logsumexp(-1)


def _logps_only(head, hidden: torch.Tensor, targets: torch.Tensor, temperature: float, rows: int) -> torch.Tensor:
    logps = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
    for start in range(0, hidden.shape[0], rows):
        logps[start : start + rows] = _chunk_logps(
            head, hidden[start : start + rows], targets[start : start + rows], temperature
        )
    return logps
