"""ORPO and SimPO on transformers' ``Trainer``: preference optimisation without a reference model.

Both score a pair by the policy's per-token mean log-probabilities ``ℓ = logπ(y|x) / |y|`` of its two
completions, from one forward pass over the chosen rows stacked on the rejected rows; no reference
forward pass is ever run. The losses are ``losses.orpo_loss`` and ``losses.simpo_loss``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainingArguments

from deltatune.data.encoding import IGNORE_INDEX
from deltatune.train.losses import (
    check_beta,
    check_simpo_settings,
    completion_lengths,
    orpo_loss,
    sequence_logprob,
    simpo_loss,
)
from deltatune.train.preference import PairTrainer


class ReferenceFreeTrainer(PairTrainer):
    """A pair trainer whose loss needs the policy alone (the adapter is never disabled)."""

    uses_reference = False

    def mean_logps(
        self, model: nn.Module, batch: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits [2 * pairs, seq, vocab], ℓ_chosen [pairs], ℓ_rejected [pairs]) of one forward pass."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        labels = batch["labels"]
        mean = sequence_logprob(logits, labels) / completion_lengths(labels).clamp(min=1)
        chosen, rejected = mean.chunk(2)
        return logits, chosen, rejected


class ORPOTrainer(ReferenceFreeTrainer):
    """Odds Ratio Preference Optimization of a ``DeltaModel``: the chosen rows' NLL (every token, prompt
    included, as TRL computes it) plus β times the odds-ratio term.

    Logs ``rewards/chosen`` and ``rewards/rejected`` (β·ℓ), ``rewards/margins``, ``rewards/accuracies``
    (share of pairs whose chosen ℓ is the higher), ``nll_loss``, and under TRL's names ``log_odds_chosen``
    (the log-odds o of chosen over rejected) and ``log_odds_ratio`` (logσ(o), the term β weighs).
    """

    def __init__(self, model: nn.Module, args: TrainingArguments | None = None, *, beta: float = 0.1, **kwargs: Any):
        check_beta(beta)
        self.beta = beta
        super().__init__(model, args, **kwargs)

    def batch_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        logits, chosen, rejected = self.mean_logps(model, inputs)
        pairs = len(chosen)
        tokens = inputs["input_ids"][:pairs].masked_fill(inputs["attention_mask"][:pairs] == 0, IGNORE_INDEX)
        nll = -sequence_logprob(logits[:pairs], tokens).sum() / completion_lengths(tokens).sum().clamp(min=1)
        result = orpo_loss(chosen, rejected, nll, beta=self.beta)
        self.record_rewards(
            result.chosen_rewards,
            result.rejected_rewards,
            nll_loss=nll,
            log_odds_chosen=result.log_odds,
            log_odds_ratio=F.logsigmoid(result.log_odds),
        )
        return result.loss


class SimPOTrainer(ReferenceFreeTrainer):
    """Simple Preference Optimization of a ``DeltaModel`` (TRL: ``CPOTrainer(loss_type="simpo")`` with
    ``cpo_alpha=0``; LLaMA-Factory: ``pref_loss=simpo``): a logistic loss on β·(ℓ_chosen − ℓ_rejected) − γ.

    Logs ``rewards/chosen`` and ``rewards/rejected`` (β·ℓ), ``rewards/margins`` (the loss asks for at
    least γ) and ``rewards/accuracies`` (share of pairs whose chosen ℓ is the higher).
    """

    def __init__(
        self,
        model: nn.Module,
        args: TrainingArguments | None = None,
        *,
        beta: float = 2.0,
        gamma: float = 0.5,
        label_smoothing: float = 0.0,
        **kwargs: Any,
    ) -> None:
        check_simpo_settings(beta, gamma, label_smoothing)
        self.beta, self.gamma, self.label_smoothing = beta, gamma, label_smoothing
        super().__init__(model, args, **kwargs)

    def batch_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        _, chosen, rejected = self.mean_logps(model, inputs)
        result = simpo_loss(chosen, rejected, self.beta, self.gamma, self.label_smoothing)
        self.record_rewards(result.chosen_rewards, result.rejected_rewards)
        return result.loss
