"""The training stages of ``deltatune train``: how each encodes its records and builds its Trainer.

* ``sft``: causal-LM cross-entropy on the labelled (assistant) tokens of conversations or text.
* ``dpo``: ``preference.DPOTrainer`` on ``PreferencePair`` records.
* ``kto``: ``kto.KTOTrainer`` on ``KTOExample`` records (preference pairs are unpaired first).
* ``orpo``, ``simpo``: ``reference_free.ORPOTrainer`` / ``SimPOTrainer`` on ``PreferencePair`` records.
* ``rm``: ``reward.RewardTrainer`` on ``PreferencePair`` records (with their optional margin), over a
  one-output sequence-classification model.
* ``grpo``: ``grpo.GRPOTrainer`` on ``PromptOnly`` records, scored by ``reward_funcs``.

Every pair stage encodes its pairs as DPO does (``encode_preference_pairs``: the same left-cut
truncation and the same counts).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase, Trainer, TrainingArguments

from deltatune.data import (
    EncodedSet,
    PreferencePair,
    Record,
    collate_causal,
    encode_records,
    pack_examples,
    unpair,
)
from deltatune.data.collate import collate_padding_free
from deltatune.data.encoding import Example
from deltatune.errors import DataError
from deltatune.kernels.segment_attention import use_segment_attention
from deltatune.train.config import TrainConfig
from deltatune.train.evaluate import heldout_loss, perplexity
from deltatune.train.grpo import GRPOTrainer, encode_prompts
from deltatune.train.kto import KTOTrainer
from deltatune.train.lm_loss import causal_lm_loss
from deltatune.train.preference import DPOTrainer
from deltatune.train.preference_data import encode_kto_examples, encode_preference_pairs
from deltatune.train.reference_free import ORPOTrainer, SimPOTrainer
from deltatune.train.reward import RewardTrainer
from deltatune.train.rewards import load_reward_functions
from deltatune.train.trainer import DeltaTrainer
from deltatune.tuners.prompt.config import PromptLearningConfig


class SFTTrainer(DeltaTrainer):
    """Supervised fine-tuning: the causal-LM loss on labelled tokens, with logits formed at those
    positions only (``lm_loss.causal_lm_loss``). ``evaluate`` reports the mean cross-entropy per
    labelled token over the whole eval set (``heldout_loss``, the same loss path) and exp of it."""

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        """Σ loss / the labelled tokens of the whole optimizer step (``num_items_in_batch``, which the
        Trainer counts over every accumulated micro-batch), so accumulation gives the big batch's mean."""
        if return_outputs:
            raise NotImplementedError("SFTTrainer.compute_loss returns the loss only (no logits are formed)")
        loss = causal_lm_loss(model, inputs, self.accelerator.unwrap_model(model, keep_torch_compile=False))
        tokens = loss.tokens if num_items_in_batch is None else int(num_items_in_batch)
        return loss.total / max(tokens, 1)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        with self.autocast_smart_context_manager():
            loss = heldout_loss(
                self.model, dataset, self.data_collator, self.args.per_device_eval_batch_size, desc=metric_key_prefix
            )
        metrics = {f"{metric_key_prefix}_loss": loss, f"{metric_key_prefix}_perplexity": perplexity(loss)}
        self.log(dict(metrics))  # log() adds the step, epoch and token count to the dict it gets
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


TrainerFactory = Callable[[TrainConfig, Any, PreTrainedTokenizerBase, TrainingArguments, list, list], Trainer]


@dataclass(frozen=True)
class Stage:
    """A stage: the record kinds it trains on, its encoder and its Trainer factory."""

    name: str
    kinds: tuple[str, ...]
    encode: Callable[[PreTrainedTokenizerBase, Sequence[Record], TrainConfig], EncodedSet]
    trainer: TrainerFactory
    data_hint: str  # the built-in data set to suggest when the kind is wrong
    loss_unit: str  # what one loss value averages over (loss.png's legend names it)
    task_type: str = "CAUSAL_LM"  # the model it trains: a causal LM, or a scorer (SEQ_CLS, one output)
    metric: str = "loss"  # what its evaluation reports and the logs call it: "loss", or GRPO's "reward"


def _sft_trainer(config, model, tokenizer, args, train: list[Example], evaluation: list[Example]) -> Trainer:
    if config.packing:
        train = pack_examples(train, config.max_length)
    padding_free = sft_padding_free(config)
    if padding_free:  # each example of a row attends alone (not through the row's T x T mask)
        use_segment_attention(model.base_model)
    collate = collate_padding_free if padding_free else collate_causal
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        data_collator=lambda batch: collate(batch, tokenizer.pad_token_id),
    )


def sft_padding_free(config: TrainConfig) -> bool:
    """Whether SFT batches are padding-free rows: asked for, not packed already, and no virtual tokens."""
    return config.padding_free and not config.packing and not isinstance(config.delta_config(), PromptLearningConfig)


def _encode_sft(tokenizer, records, config) -> EncodedSet:
    return encode_records(tokenizer, records, config.max_length, config.train_on_prompt, config.truncation_side)


def _encode_rm(tokenizer, records, config) -> EncodedSet:
    return encode_preference_pairs(tokenizer, records, config.max_length, config.max_prompt_length or None)


def _encode_pairs(tokenizer, records, config) -> EncodedSet:
    """DPO, ORPO and SimPO pairs."""
    _refuse_margins(records, config.stage)
    return _encode_rm(tokenizer, records, config)


def _refuse_margins(records: Sequence[Record], stage: str) -> None:
    """A DataError for a pair with a margin: only a reward model reads that column."""
    with_margin = next((record for record in records if getattr(record, "margin", None) is not None), None)
    if with_margin is not None:
        where = f"{with_margin.origin.source} row {with_margin.origin.row}" if with_margin.origin else "a pair"
        raise DataError(f"{where}: stage={stage} does not read the margin column (stage=rm does); drop the column")


def _dpo_trainer(config, model, tokenizer, args, train, evaluation) -> Trainer:
    return DPOTrainer(model, args, beta=config.beta, loss_type=config.loss_type, **_data(tokenizer, train, evaluation))


def _orpo_trainer(config, model, tokenizer, args, train, evaluation) -> Trainer:
    return ORPOTrainer(model, args, beta=config.beta, **_data(tokenizer, train, evaluation))


def _simpo_trainer(config, model, tokenizer, args, train, evaluation) -> Trainer:
    return SimPOTrainer(model, args, beta=config.beta, gamma=config.gamma, **_data(tokenizer, train, evaluation))


def _rm_trainer(config, model, tokenizer, args, train, evaluation) -> Trainer:
    return RewardTrainer(model, args, **_data(tokenizer, train, evaluation))


def _data(tokenizer, train: list[Example], evaluation: list[Example]) -> dict[str, Any]:
    return {"train_dataset": train, "eval_dataset": evaluation, "processing_class": tokenizer}


def _encode_kto(tokenizer, records, config) -> EncodedSet:
    _refuse_margins(records, config.stage)
    records = [kto for r in records for kto in (unpair([r]) if isinstance(r, PreferencePair) else [r])]
    return encode_kto_examples(tokenizer, records, config.max_length, config.max_prompt_length or None)


def _kto_trainer(config, model, tokenizer, args, train, evaluation) -> Trainer:
    return KTOTrainer(
        model,
        args,
        beta=config.beta,
        desirable_weight=config.desirable_weight,
        undesirable_weight=config.undesirable_weight,
        max_length=config.max_length,
        **_data(tokenizer, train, evaluation),
    )


def _encode_grpo(tokenizer, records, config) -> EncodedSet:
    return encode_prompts(tokenizer, records, config.max_prompt_length or config.max_length)


def _grpo_trainer(config, model, tokenizer, args, train, evaluation) -> Trainer:
    return GRPOTrainer(
        model,
        args,
        train_dataset=train,
        rewards=load_reward_functions(config.reward_funcs),
        settings=config.grpo_settings(),
        processing_class=tokenizer,
        eval_prompts=evaluation,
    )


STAGES: dict[str, Stage] = {
    "sft": Stage("sft", ("sft",), _encode_sft, _sft_trainer, "chatterbot", "answer tokens"),
    "dpo": Stage("dpo", ("preference",), _encode_pairs, _dpo_trainer, "chatterbot-preference-synthetic", "pairs"),
    "kto": Stage("kto", ("kto", "preference"), _encode_kto, _kto_trainer, "chatterbot-kto-synthetic", "examples"),
    "orpo": Stage("orpo", ("preference",), _encode_pairs, _orpo_trainer, "chatterbot-preference-synthetic", "pairs"),
    "simpo": Stage("simpo", ("preference",), _encode_pairs, _simpo_trainer, "chatterbot-preference-synthetic", "pairs"),
    "rm": Stage("rm", ("preference",), _encode_rm, _rm_trainer, "chatterbot-preference-synthetic", "pairs", "SEQ_CLS"),
    "grpo": Stage("grpo", ("prompt",), _encode_grpo, _grpo_trainer, "units-synthetic", "completions", metric="reward"),
}
