"""Preference trainers' shared machinery, and DPO on transformers' ``Trainer``, with the reference model
for free: the same weights, adapter off.

DPO compares the policy's log-probabilities with a frozen reference model's. With an adapter the
reference is the base model, which is already in memory: ``with model.disable_adapter():`` under
``torch.no_grad()`` runs it, so no second copy of the model is ever made. Works with every
deltatune method whose ``DeltaModel`` can disable its adapter. The examples and batches are
described in ``preference_data``.
"""

from __future__ import annotations

import contextlib
import copy
from collections import defaultdict
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn
from transformers import TrainingArguments

from deltatune.errors import ConfigError
from deltatune.train.losses import (
    check_dpo_settings,
    completion_lengths,
    dpo_loss,
    sequence_logprob,
)
from deltatune.train.preference_data import PreferenceCollator
from deltatune.train.trainer import DeltaTrainer


class PreferenceTrainer(DeltaTrainer):
    """What the preference stages share: the disabled-adapter reference (for the stages that have one,
    ``uses_reference``), dropout off, and reward metrics in the logs.

    Subclasses implement ``batch_loss`` with ``self.logps`` and ``self.reference_logps`` and
    report metrics with ``self.record``; each logging step writes the mean of what was recorded
    since the last one (``eval_``-prefixed during evaluation), and ``rewards/margins`` = mean
    chosen reward − mean rejected reward.
    """

    loss_is_scaled_for_ga = False  # a per-batch mean: Trainer divides it by the accumulation steps
    uses_reference = True  # False: a reference-free loss, which never disables the adapter

    def __init__(
        self, model: nn.Module, args: TrainingArguments | None = None, *, disable_dropout: bool = True, **kwargs: Any
    ) -> None:
        if self.uses_reference and not callable(getattr(model, "disable_adapter", None)):
            raise ConfigError(
                f"{type(self).__name__} needs a DeltaModel (its disabled adapter is the reference model), "
                f"got {type(model).__name__}; wrap the model with deltatune.get_delta_model(model, config)"
            )
        if disable_dropout:  # policy and reference must see the same network, as in TRL
            for module in model.modules():
                if isinstance(module, nn.Dropout):
                    module.p = 0.0
        super().__init__(model=model, args=keep_columns(args), **kwargs)
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

    def logps(self, model: nn.Module, batch: Mapping[str, torch.Tensor], prefix: str = "") -> torch.Tensor:
        """Summed completion log-probs [rows] of ``{prefix}input_ids`` / ``attention_mask`` / ``labels``."""
        logits = model(
            input_ids=batch[f"{prefix}input_ids"], attention_mask=batch[f"{prefix}attention_mask"], use_cache=False
        ).logits
        return sequence_logprob(logits, batch[f"{prefix}labels"])

    def reference_logps(self, model: nn.Module, batch: Mapping[str, torch.Tensor], prefix: str = "") -> torch.Tensor:
        """``logps`` of the reference model: the same model with its adapter disabled, without gradients."""
        with self.reference(model):
            return self.logps(model, batch, prefix)

    @contextlib.contextmanager
    def reference(self, model: nn.Module) -> Iterator[None]:
        """Inside the block, ``model`` is the frozen reference (adapters off, no autograd graph)."""
        with torch.no_grad(), self.accelerator.unwrap_model(model).disable_adapter():
            yield

    def record(self, **values: torch.Tensor) -> None:
        """Keep per-example (or per-batch) metric values until the next log line."""
        mode = "train" if self.model.training else "eval"
        for name, value in values.items():
            self._metrics[mode][name].extend(value.detach().float().reshape(-1).tolist())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        means = {name: sum(values) / len(values) for name, values in self._metrics[mode].items() if values}
        if "rewards/chosen" in means and "rewards/rejected" in means:
            means["rewards/margins"] = means["rewards/chosen"] - means["rewards/rejected"]
        logs.update({prefix + name: value for name, value in means.items()})
        self._metrics[mode].clear()
        super().log(logs, start_time)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, None]:
        """Trainer's entry point: the stage's ``batch_loss`` (a per-batch mean; there are no outputs to return)."""
        loss = self.batch_loss(model, inputs)
        return (loss, None) if return_outputs else loss

    def batch_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The stage's loss on one batch, with its metrics recorded (``record``)."""
        raise NotImplementedError

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor, None, None]:
        """Evaluation scores the preference loss only (there are no logits or label ids to gather)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


class PairTrainer(PreferenceTrainer):
    """A preference trainer on chosen/rejected pairs. Without ``data_collator`` it uses ``PreferenceCollator``
    (the chosen rows over the rejected rows), padding with ``pad_token_id`` (default: the tokenizer's pad,
    else eos token)."""

    def __init__(
        self,
        model: nn.Module,
        args: TrainingArguments | None = None,
        *,
        pad_token_id: int | None = None,
        data_collator: Any = None,
        **kwargs: Any,
    ) -> None:
        if data_collator is None:
            data_collator = PreferenceCollator(resolve_pad_token_id(pad_token_id, kwargs.get("processing_class")))
        super().__init__(model, args, data_collator=data_collator, **kwargs)

    def record_rewards(self, chosen: torch.Tensor, rejected: torch.Tensor, **more: torch.Tensor) -> None:
        """Record the per-pair rewards, ``rewards/accuracies`` (chosen > rejected) and ``more`` metrics."""
        accuracies = (chosen > rejected).float()
        self.record(
            **{"rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/accuracies": accuracies}, **more
        )


class DPOTrainer(PairTrainer):
    """Direct Preference Optimization (sigmoid / cDPO, or IPO) of a ``DeltaModel``.

    Logs ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins`` (their difference) and
    ``rewards/accuracies`` (share of pairs whose chosen reward is the higher), where a reward is
    β·(logπ − logπ_ref) of a completion.
    """

    def __init__(
        self,
        model: nn.Module,
        args: TrainingArguments | None = None,
        *,
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        **kwargs: Any,
    ) -> None:
        check_dpo_settings(beta, label_smoothing, loss_type)
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        super().__init__(model, args, **kwargs)

    def batch_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        policy_chosen, policy_rejected = self.logps(model, inputs).chunk(2)
        reference_chosen, reference_rejected = self.reference_logps(model, inputs).chunk(2)
        chosen_lengths, rejected_lengths = completion_lengths(inputs["labels"]).chunk(2)
        result = dpo_loss(
            policy_chosen,
            policy_rejected,
            reference_chosen,
            reference_rejected,
            beta=self.beta,
            label_smoothing=self.label_smoothing,
            loss_type=self.loss_type,
            chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths,
        )
        self.record_rewards(
            result.chosen_rewards,
            result.rejected_rewards,
            **{"logps/chosen": policy_chosen, "logps/rejected": policy_rejected},
        )
        return result.loss


def keep_columns(args: TrainingArguments | None) -> TrainingArguments:
    """``args`` (Trainer's defaults when None) with ``remove_unused_columns=False``, copied when it changes:
    the collators read their own columns, which Trainer would otherwise drop as unknown to
    ``DeltaModel.forward(*args, **kwargs)``."""
    if args is None:
        return TrainingArguments(output_dir="tmp_trainer", remove_unused_columns=False)
    if not args.remove_unused_columns:
        return args
    args = copy.copy(args)
    args.remove_unused_columns = False
    return args


def resolve_pad_token_id(pad_token_id: int | None, processing_class: Any) -> int:
    """``pad_token_id`` if given, else the tokenizer's pad token, else its eos token."""
    if pad_token_id is not None:
        return pad_token_id
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(processing_class, name, None)
        if value is not None:
            return value
    raise ConfigError("cannot tell the padding token; pass pad_token_id=... or a tokenizer as processing_class")
