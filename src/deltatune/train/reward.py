"""Reward modelling on transformers' ``Trainer``: a scalar head scores each prompt + completion, and the
Bradley-Terry loss (``losses.bradley_terry_loss``) teaches it to score the chosen completion higher.

The model is a sequence-classification model with one output (``num_labels=1``) under an adapter with
``task_type="SEQ_CLS"``, so the new head trains in full and is saved with the adapter; a batch is
``PreferenceCollator``'s (the chosen rows over the rejected rows, plus ``margin`` when the data has one).
``reward_model.load_reward_function`` turns the saved adapter back into a reward function.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import TrainingArguments

from deltatune.train.losses import bradley_terry_loss
from deltatune.train.preference import PairTrainer


class RewardTrainer(PairTrainer):
    """Bradley-Terry reward modelling of a ``DeltaModel`` over a one-output classification model.

    Logs ``rewards/chosen`` and ``rewards/rejected`` (the mean scores), ``rewards/margins`` and
    ``rewards/accuracies``: the pairwise accuracy, the share of pairs scored chosen > rejected.
    ``center_rewards_coefficient`` (TRL's; None: off) pulls the scores of each pair towards 0.
    """

    uses_reference = False

    def __init__(
        self,
        model: nn.Module,
        args: TrainingArguments | None = None,
        *,
        center_rewards_coefficient: float | None = None,
        **kwargs: Any,
    ) -> None:
        self.center_rewards_coefficient = center_rewards_coefficient
        super().__init__(model, args, **kwargs)

    def batch_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        scores = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False).logits
        chosen, rejected = scores.squeeze(-1).float().chunk(2)
        loss = bradley_terry_loss(chosen, rejected, inputs.get("margin"), self.center_rewards_coefficient)
        self.record_rewards(chosen.detach(), rejected.detach())
        return loss
