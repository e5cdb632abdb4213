"""Summed cross-entropy of a linear head, computed a chunk of rows at a time.

For hidden states ``h`` [N, H] at the positions that have a label, a head ``W`` [V, H] (bias ``b``)
and targets ``t`` [N]::

    loss = Σ_i ( logsumexp_v(z_iv) − z_i,t_i ),        z = h Wᵀ + b   (fp32)
    dloss/dz = softmax(z) − onehot(t)   =: G
    dh = G W,   dW = Gᵀ h,   db = Σ_i G_i

The [N, V] logits never exist whole: each chunk of rows forms its logits, adds its loss and, when
gradients are wanted, turns them into ``dh`` (and ``dW``/``db`` for a trainable head) at once, so
that forward and backward together cost two head products and keep only ``dh`` (like ``h``).
The backward pass only scales what the forward pass kept by the incoming gradient (the loss is a
sum, so its gradient is linear in that scalar).

``module_cross_entropy`` is the same sum for any head module (a LoRA-wrapped or token-trainable
head): each chunk runs under activation checkpointing, so only its input is kept.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# Rows per chunk: the fp32 logits of one chunk and their gradient stay near this many bytes.
CHUNK_BYTES = 64 * 2**20


def chunk_rows(vocab_size: int) -> int:
    """Rows whose fp32 [rows, vocab] logits fit ``CHUNK_BYTES`` (at least 1)."""
    return max(1, CHUNK_BYTES // (4 * vocab_size))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows):  # noqa: D102 (see the module docstring)
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if want_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if want_b else None
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], rows):
            h, t = hidden[start : start + rows], targets[start : start + rows]
            logits = F.linear(h, weight, bias).float()
            lse = logits.logsumexp(-1)
            total += (lse - logits.gather(1, t[:, None])[:, 0]).sum()
            g = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            g[torch.arange(len(t), device=g.device), t] -= 1
            if want_h:
                grad_h[start : start + rows] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
            if want_w:
                grad_w += g.T @ h.float()
            if want_b:
                grad_b += g.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        return total

    @staticmethod
    def backward(ctx, grad_total):  # noqa: D102
        grads = [None if g is None else (g * grad_total).to(dtype) for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)]
        return *grads, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    rows: int | None = None,
) -> torch.Tensor:
    """Σ_i CE(h_i Wᵀ + b, t_i) over the rows of ``hidden`` [N, H]; ``weight`` [V, H]; ``targets`` [N] (all valid).

    ``rows``: rows per chunk (default: ``chunk_rows(V)``). Returns an fp32 scalar.
    """
    rows = rows or chunk_rows(weight.shape[0])
    wants_grad = any(x is not None and x.requires_grad for x in (hidden, weight, bias))
    if not (torch.is_grad_enabled() and wants_grad):
        return _loss_only(lambda h: F.linear(h, weight, bias), hidden, targets, rows)
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, rows)


def module_cross_entropy(
    head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor, rows: int
) -> torch.Tensor:
    """Σ_i CE(head(h_i), t_i) for any head, ``rows`` rows at a time, each chunk checkpointed."""
    if not torch.is_grad_enabled():
        return _loss_only(head, hidden, targets, rows)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], rows):
        chunk = (hidden[start : start + rows], targets[start : start + rows])
        total = total + checkpoint(_chunk_loss, head, *chunk, use_reentrant=False)
    return total


def _chunk_loss(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def _loss_only(head, hidden: torch.Tensor, targets: torch.Tensor, rows: int) -> torch.Tensor:
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], rows):
        total += _chunk_loss(head, hidden[start : start + rows], targets[start : start + rows])
    return total
