"""KTO on transformers' ``Trainer``: unpaired desirable/undesirable completions, reference = adapter off.

KTO's reference point is KL(π‖π_ref), estimated per batch from mismatched prompt/completion pairs
(``preference_data.KTOCollator``), so a batch needs at least two rows.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import TrainingArguments

from deltatune.errors import ConfigError
from deltatune.train.losses import check_kto_settings, kto_loss
from deltatune.train.preference import PreferenceTrainer, resolve_pad_token_id
from deltatune.train.preference_data import KTOCollator


class KTOTrainer(PreferenceTrainer):
    """Kahneman-Tversky Optimization of a ``DeltaModel``.

    Logs ``rewards/chosen`` and ``rewards/rejected`` (mean β·(logπ − logπ_ref) of the desirable and
    undesirable completions), ``rewards/margins`` (their difference), ``kl`` (the clamped KL
    estimate) and ``rewards/accuracies``: the share of completions the implied reward puts on the
    right side of the reference point (ρ > KL for desirable ones, ρ < KL for undesirable ones).
    Without ``data_collator`` it uses ``KTOCollator``, padding with ``pad_token_id`` (default: the
    tokenizer's pad, else eos token) and cutting the mismatched pairs to ``max_length``.
    """

    def __init__(
        self,
        model: nn.Module,
        args: TrainingArguments | None = None,
        *,
        beta: float = 0.1,
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        pad_token_id: int | None = None,
        max_length: int | None = None,
        data_collator: Any = None,
        **kwargs: Any,
    ) -> None:
        check_kto_settings(beta, desirable_weight, undesirable_weight)
        if args is not None and args.per_device_train_batch_size < 2:
            raise ConfigError(
                f"KTO estimates its KL term from mismatched pairs within a batch; "
                f"per_device_train_batch_size={args.per_device_train_batch_size} must be at least 2"
            )
        self.beta, self.desirable_weight, self.undesirable_weight = beta, desirable_weight, undesirable_weight
        if data_collator is None:
            pad = resolve_pad_token_id(pad_token_id, kwargs.get("processing_class"))
            data_collator = KTOCollator(pad, max_length)
        super().__init__(model, args, data_collator=data_collator, **kwargs)

    def batch_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        policy = self.logps(model, inputs)
        with torch.no_grad():  # the KL estimate is detached: no graph needed
            policy_kl = self.logps(model, inputs, prefix="kl_")
        reference = self.reference_logps(model, inputs)
        reference_kl = self.reference_logps(model, inputs, prefix="kl_")
        desirable = inputs["desirable"].bool()
        result = kto_loss(
            policy,
            reference,
            desirable,
            policy_kl,
            reference_kl,
            beta=self.beta,
            desirable_weight=self.desirable_weight,
            undesirable_weight=self.undesirable_weight,
        )
        above_reference_point = result.rewards > self.beta * result.kl
        self.record(
            **{
                "rewards/chosen": result.rewards[desirable],
                "rewards/rejected": result.rewards[~desirable],
                "rewards/accuracies": (above_reference_point == desirable).float(),
                "kl": result.kl,
            }
        )
        return result.loss
