"""Preference losses as pure functions of per-sequence log-probabilities.

Notation: ``logπ(y|x)`` is the summed log-probability of a completion ``y`` given its prompt ``x``
(``sequence_logprob``), under the trained policy ``π`` or the frozen reference ``π_ref``; the
implied reward of a completion is ``r = β·(logπ(y|x) − logπ_ref(y|x))``.

* DPO (Rafailov et al., 2023), sigmoid loss with label smoothing ε (cDPO, Mitchell 2023):
  ``z = r_chosen − r_rejected``, ``loss = −(1−ε)·logσ(z) − ε·logσ(−z)``.
* IPO (Azar et al., 2023), as TRL computes it: with per-token log-ratios
  ``h = (logπ − logπ_ref)_chosen / n_chosen − (logπ − logπ_ref)_rejected / n_rejected``,
  ``loss = (h − 1/(2β))²``.
* KTO (Ethayarajh et al., 2024), with the log-ratio ``ρ = logπ − logπ_ref`` and
  ``KL = max(0, mean of ρ over mismatched prompt/completion pairs)`` (a detached estimate):
  ``loss = w_d·(1 − σ(β(ρ − KL)))`` for a desirable completion, ``w_u·(1 − σ(β(KL − ρ)))`` for
  an undesirable one, averaged over the batch.

Reference-free losses use the per-token mean ``ℓ = logπ(y|x) / |y|`` and log their rewards as ``β·ℓ``:

* ORPO (Hong et al., 2024), as TRL computes it: with the log-odds ``o = ℓ_chosen − ℓ_rejected −
  (log(1 − e^ℓ_chosen) − log(1 − e^ℓ_rejected))``, ``loss = NLL(chosen) − β·mean(logσ(o))``.
* SimPO (Meng et al., 2024), TRL's ``CPOTrainer(loss_type="simpo")``: ``z = β·(ℓ_chosen − ℓ_rejected) − γ``,
  ``loss = −(1−ε)·logσ(z) − ε·logσ(−z)``.
* Bradley-Terry reward modelling, as TRL's ``RewardTrainer``: for scalar scores ``s``,
  ``loss = −logσ(s_chosen − s_rejected − m) + c·mean((s_chosen + s_rejected)²)``, margin ``m`` (0 when
  absent) and centring weight ``c`` (0 when absent).

Every loss is the batch mean; rewards come back detached, one per example, for logging.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from deltatune.data.encoding import IGNORE_INDEX
from deltatune.errors import ConfigError

DPO_LOSS_TYPES = ("sigmoid", "ipo")


class PreferenceLoss(NamedTuple):
    """A DPO-family loss (scalar) and the detached per-pair rewards β·(logπ − logπ_ref)."""

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


class ORPOLoss(NamedTuple):
    """The ORPO loss (scalar), the detached rewards β·ℓ, and the detached log-odds o per pair (for logging)."""

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    log_odds: torch.Tensor


class KTOLoss(NamedTuple):
    """The KTO loss (scalar), the detached per-example rewards β·(logπ − logπ_ref), and the KL estimate."""

    loss: torch.Tensor
    rewards: torch.Tensor
    kl: torch.Tensor


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ_t log p(labels[t] | tokens < t) over the labelled tokens of each row: [batch, seq, vocab] -> [batch].

    ``logits[:, t]`` predicts ``labels[:, t + 1]`` (the causal shift is done here); positions whose
    label is -100 (prompt, padding) contribute nothing.
    """
    if logits.shape[:2] != labels.shape:
        raise ConfigError(
            f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}; pass [batch, seq] labels"
        )
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    picked = logits.gather(-1, targets.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)
    token_logps = picked - logits.logsumexp(-1)
    return (token_logps * mask).sum(-1)


def completion_lengths(labels: torch.Tensor) -> torch.Tensor:
    """The number of tokens ``sequence_logprob`` sums over, per row."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(-1)


def check_dpo_settings(beta: float, label_smoothing: float, loss_type: str) -> None:
    """Raise ConfigError unless beta > 0, loss_type is known and 0 <= label_smoothing < 0.5 (sigmoid only)."""
    if loss_type not in DPO_LOSS_TYPES:
        raise ConfigError(f"loss_type={loss_type!r} is unknown; use one of {', '.join(DPO_LOSS_TYPES)}")
    check_beta(beta, label_smoothing)
    if label_smoothing and loss_type != "sigmoid":
        raise ConfigError(f"label_smoothing applies to the sigmoid loss only; set it to 0 for loss_type={loss_type!r}")


def check_beta(beta: float, label_smoothing: float = 0.0) -> None:
    """Raise ConfigError unless beta > 0 and 0 <= label_smoothing < 0.5."""
    if not beta > 0:
        raise ConfigError(f"beta={beta} must be positive (typical: 0.1)")
    if not 0 <= label_smoothing < 0.5:
        raise ConfigError(f"label_smoothing={label_smoothing} must be in [0, 0.5)")


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> PreferenceLoss:
    """DPO sigmoid (cDPO with ``label_smoothing``) or IPO loss from per-sequence log-probs, all [batch].

    IPO divides each log-ratio by its completion's token count (``*_lengths``; 1 when omitted).
    """
    check_dpo_settings(beta, label_smoothing, loss_type)
    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    if loss_type == "sigmoid":
        z = beta * (chosen_ratio - rejected_ratio)
        losses = _smoothed_logistic(z, label_smoothing)
    else:
        h = chosen_ratio / _per_token(chosen_lengths) - rejected_ratio / _per_token(rejected_lengths)
        losses = (h - 1 / (2 * beta)) ** 2
    return PreferenceLoss(losses.mean(), beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def _smoothed_logistic(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """−(1−ε)·logσ(z) − ε·logσ(−z), per element."""
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def _per_token(lengths: torch.Tensor | None) -> torch.Tensor | float:
    return 1.0 if lengths is None else lengths.clamp(min=1)


def check_kto_settings(beta: float, desirable_weight: float, undesirable_weight: float) -> None:
    """Raise ConfigError unless beta and both class weights are positive."""
    settings = {"beta": beta, "desirable_weight": desirable_weight, "undesirable_weight": undesirable_weight}
    for name, value in settings.items():
        if not value > 0:
            raise ConfigError(f"{name}={value} must be positive")


def kto_loss(
    policy: torch.Tensor,
    reference: torch.Tensor,
    desirable: torch.Tensor,
    policy_kl: torch.Tensor,
    reference_kl: torch.Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> KTOLoss:
    """KTO loss from per-sequence log-probs [batch], a bool ``desirable`` mask [batch], and the log-probs
    of mismatched prompt/completion pairs (``policy_kl``, ``reference_kl``, any length >= 1)."""
    check_kto_settings(beta, desirable_weight, undesirable_weight)
    kl = (policy_kl - reference_kl).mean().detach().clamp(min=0)
    ratio = policy - reference
    desirable = desirable.to(torch.bool)
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
        undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))),
    )
    return KTOLoss(losses.mean(), beta * ratio.detach(), kl)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x < 0, stable on both sides of −log 2 (Mächler, 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor, chosen_nll: torch.Tensor, beta: float = 0.1
) -> ORPOLoss:
    """ORPO: ``chosen_nll − β·mean(logσ(o))``, o the log-odds ratio of the per-token mean log-probs [batch]."""
    check_beta(beta)
    chosen, rejected = chosen_mean_logps.float(), rejected_mean_logps.float()
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    loss = chosen_nll - beta * F.logsigmoid(log_odds).mean()
    return ORPOLoss(loss, beta * chosen.detach(), beta * rejected.detach(), log_odds.detach())


def check_simpo_settings(beta: float, gamma: float, label_smoothing: float = 0.0) -> None:
    """Raise ConfigError unless beta > 0, gamma >= 0 and 0 <= label_smoothing < 0.5."""
    check_beta(beta, label_smoothing)
    if not (math.isfinite(gamma) and gamma >= 0):
        raise ConfigError(f"gamma={gamma} must be 0 or more (the target reward margin; typical: 0.5)")


def simpo_loss(
    chosen_mean_logps: torch.Tensor,
    rejected_mean_logps: torch.Tensor,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """SimPO: mean of ``−(1−ε)·logσ(z) − ε·logσ(−z)``, ``z = β·(ℓ_chosen − ℓ_rejected) − γ`` (ℓ: mean log-probs)."""
    check_simpo_settings(beta, gamma, label_smoothing)
    z = beta * (chosen_mean_logps - rejected_mean_logps) - gamma
    losses = _smoothed_logistic(z, label_smoothing)
    return PreferenceLoss(losses.mean(), beta * chosen_mean_logps.detach(), beta * rejected_mean_logps.detach())


def bradley_terry_loss(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_rewards_coefficient: float | None = None,
) -> torch.Tensor:
    """Reward-model loss: ``mean(−logσ(s_chosen − s_rejected − m)) + c·mean((s_chosen + s_rejected)²)``, all [batch]."""
    difference = chosen_scores - rejected_scores
    if margin is not None:
        difference = difference - margin
    loss = -F.logsigmoid(difference).mean()
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * ((chosen_scores + rejected_scores) ** 2).mean()
    return loss
