"""GRPO's advantages and clipped policy loss as pure functions, as TRL 1.16's ``GRPOTrainer`` computes them.

A group is the ``G`` completions sampled for one prompt. With rewards ``r`` (NaN where every reward
function said "no opinion"):

    advantage  A_i = (r_i − mean(r of i's group)) / (std + 1e-4)      std: the group's ("group"), the
                                                                      batch's ("batch"), or none ("none")

Per completion token t, with the policy's log-probability ``logπ``, the sampling policy's ``logπ_old``
(``logπ`` detached when the policy has not moved since sampling) and the reference's ``logπ_ref``:

    ratio ρ_t = exp(logπ_t − logπ_old_t)
    ℓ_t = −min(ρ_t·A, clip(ρ_t, 1 − ε_low, 1 + ε_high)·A) + β·(exp(logπ_ref_t − logπ_t) − (logπ_ref_t − logπ_t) − 1)

and the loss averages ℓ over the completion tokens (mask m) in the way ``loss_type`` names:

    grpo     mean over completions of (Σ_t m·ℓ / Σ_t m)              (each completion weighs the same)
    bnpo     Σ m·ℓ / Σ m                                             (each token of this batch the same)
    dr_grpo  Σ m·ℓ / (completions · max_completion_length)           (no length bias, Dr. GRPO)
    dapo     Σ m·ℓ / tokens                                          (each token of the whole generation
                                                                      batch the same; ``tokens`` given)
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from deltatune.errors import ConfigError
from deltatune.train.grpo_settings import LOSS_TYPES, SCALE_REWARDS


def combine_rewards(per_function: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[completions] weighted sum over reward functions of ``per_function`` [completions, functions];
    NaN (no opinion) counts as 0, and a completion no function scored stays NaN."""
    total = (per_function * weights[None, :]).nansum(dim=1)
    return total.masked_fill(per_function.isnan().all(dim=1), float("nan"))


def nan_std(values: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """The sample standard deviation (Bessel-corrected) ignoring NaNs; NaN where fewer than two values."""
    mean = values.nanmean(dim=dim, keepdim=True) if dim is not None else values.nanmean()
    count = (~values.isnan()).sum(dim=dim) if dim is not None else (~values.isnan()).sum()
    squares = (values - mean).square()
    variance = squares.nanmean(dim=dim) if dim is not None else squares.nanmean()
    correction = torch.where(count > 1, count / (count - 1).clamp(min=1), torch.full_like(variance, float("nan")))
    return (variance * correction).sqrt()


def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: str = "group") -> torch.Tensor:
    """Each completion's advantage over its group's mean reward (``rewards`` [completions], groups consecutive).

    Unscored completions (NaN) are left out of the means and get advantage 0.
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ConfigError(f"scale_rewards={scale_rewards!r} is unknown; use one of {', '.join(SCALE_REWARDS)}")
    if rewards.numel() % group_size:
        raise ConfigError(f"{rewards.numel()} completions do not form groups of {group_size}")
    groups = rewards.view(-1, group_size)
    advantages = (groups - groups.nanmean(dim=1, keepdim=True)).view(-1)
    if scale_rewards == "group":
        std = nan_std(groups, dim=1).repeat_interleave(group_size) if group_size > 1 else torch.zeros_like(rewards)
        advantages = advantages / (std + 1e-4)
    elif scale_rewards == "batch":
        std = nan_std(rewards) if rewards.numel() > 1 else torch.zeros(())
        advantages = advantages / (std + 1e-4)
    return advantages.nan_to_num(nan=0.0)


class PolicyLoss(NamedTuple):
    """The loss, and what the logs show of it (detached): mean KL to the reference (None when β = 0) and the
    share of completion tokens clipped below / above / in either region."""

    loss: torch.Tensor
    kl: torch.Tensor | None
    clipped_low: torch.Tensor
    clipped_high: torch.Tensor
    clipped: torch.Tensor


def policy_loss(
    logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str = "dapo",
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    old_logps: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    max_completion_length: int | None = None,
    tokens: torch.Tensor | float | None = None,
) -> PolicyLoss:
    """GRPO's clipped surrogate loss over completion tokens (module docstring).

    ``logps``, ``old_logps``, ``ref_logps`` and ``mask`` are [completions, tokens]; ``advantages`` [completions].
    ``max_completion_length`` is needed by ``dr_grpo``; ``tokens`` (the completion tokens of the whole generation
    batch) by ``dapo``, defaulting to this batch's.
    """
    if loss_type not in LOSS_TYPES:
        raise ConfigError(f"loss_type={loss_type!r} is unknown; use one of {', '.join(LOSS_TYPES)}")
    mask = mask.to(logps.dtype)
    old_logps = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(logps - old_logps)
    advantage = advantages[:, None]
    per_token = -torch.min(ratio * advantage, ratio.clamp(1 - epsilon_low, 1 + epsilon_high) * advantage)
    kl = None
    if beta != 0.0:
        if ref_logps is None:
            raise ConfigError("beta > 0 needs the reference log-probabilities (ref_logps)")
        gap = ref_logps - logps
        per_token_kl = torch.exp(gap) - gap - 1
        per_token = per_token + beta * per_token_kl
        kl = _masked_mean(per_token_kl.detach(), mask)
    masked = per_token * mask
    if loss_type == "grpo":
        loss = (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = masked.sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ConfigError("loss_type='dr_grpo' needs max_completion_length")
        loss = masked.sum() / (per_token.shape[0] * max_completion_length)
    else:
        total = mask.sum() if tokens is None else torch.as_tensor(tokens, dtype=logps.dtype)
        loss = masked.sum() / total.clamp(min=1.0)
    low = ((ratio < 1 - epsilon_low) & (advantage < 0)).to(logps.dtype).detach()
    high = ((ratio > 1 + epsilon_high) & (advantage > 0)).to(logps.dtype).detach()
    return PolicyLoss(
        loss, kl, _masked_mean(low, mask), _masked_mean(high, mask), _masked_mean((low + high).clamp(max=1), mask)
    )


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1.0)
