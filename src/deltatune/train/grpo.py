"""GRPO (Shao et al., 2024) on transformers' ``Trainer``: sample, score, and move toward the better answers::

    prompts ──► GenerationEngine: G completions each ──► reward functions ──► group advantages
                                                                                   │
    policy_loss over micro-batches ◄── old / reference log-probs (reference: the adapter off) ◄┘

One generation serves ``steps_per_generation`` micro-batches (default: one optimizer step) and is used
``num_iterations`` times. Log-probabilities are taken at the sampling temperature, as TRL does. The
reference policy (``beta > 0``) is the same model with its adapter disabled: no second copy. Each
generation's sampling seed is derived from the run's seed and the optimizer step, so a run resumed at a
generation boundary samples what the uninterrupted run sampled.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler
from transformers import PreTrainedTokenizerBase, TrainingArguments

from deltatune.data import EncodedSet, PromptOnly
from deltatune.data.encoding import prompt_ids as chat_prompt_ids
from deltatune.errors import ConfigError, DataError
from deltatune.generation.engine import GenerationEngine
from deltatune.generation.sampling import SamplingParams
from deltatune.kernels.packed_linear import PackedWeights
from deltatune.kernels.segment_attention import use_segment_attention
from deltatune.train.completion_logps import completion_logps
from deltatune.train.grpo_settings import GRPOSettings
from deltatune.train.policy_loss import combine_rewards, group_advantages, nan_std, policy_loss
from deltatune.train.preference import PreferenceTrainer
from deltatune.train.rewards import NamedReward, score


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, records: Sequence[PromptOnly], max_prompt_length: int | None
) -> EncodedSet:
    """One example per prompt: ``prompt_input_ids`` (cut from the left to ``max_prompt_length``, counted), the prompt
    as reward functions see it (the data's string, or chat messages as ``{"role", "content"}`` dicts) and the
    row's other ``columns``. A string prompt is tokenized as it is (TRL's standard format); messages go through
    the model's chat template with the assistant's turn opened."""
    examples, cut = [], 0
    for record in records:
        if record.text is not None:
            ids = tokenizer(record.text, add_special_tokens=False)["input_ids"]
        else:
            ids = chat_prompt_ids(tokenizer, record.prompt)
        if max_prompt_length is not None and len(ids) > max_prompt_length:
            ids, cut = ids[-max_prompt_length:], cut + 1
        if not ids:
            raise DataError(f"prompt {record.prompt!r} has no tokens; every GRPO row needs a non-empty prompt")
        shown = record.text if record.text is not None else [m.as_dict() for m in record.prompt]
        examples.append({"prompt_input_ids": ids, "prompt": shown, "columns": dict(record.columns)})
    reasons = Counter({"prompt cut from the left": cut} if cut else {})
    return EncodedSet(examples, n_truncated=cut, n_dropped=0, reasons=reasons)


class RepeatBatchSampler(Sampler[list[int]]):
    """Batches of ``size`` prompt indices, shuffled anew each epoch from ``seed``, each batch yielded ``repeat``
    times (one generation serves that many micro-steps; the Trainer counts steps by batches)."""

    def __init__(self, count: int, size: int, repeat: int, seed: int) -> None:
        self.count, self.size, self.repeat, self.seed, self.epoch = count, size, repeat, seed, 0

    def __len__(self) -> int:
        return (self.count // self.size) * self.repeat

    def set_epoch(self, epoch: int) -> None:
        """The Trainer's start of an epoch (a resumed run gets the order it had)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        order = list(range(self.count))
        random.Random(self.seed * 100_003 + self.epoch).shuffle(order)
        self.epoch += 1
        for start in range(0, self.count - self.size + 1, self.size):
            for _ in range(self.repeat):
                yield order[start : start + self.size]


class GRPOTrainer(PreferenceTrainer):
    """GRPO with deltatune's generation engine, reward functions with TRL's signature and TRL's loss types.

    ``per_device_train_batch_size`` counts completions per micro-step, as in TRL; ``train_dataset`` holds
    ``encode_prompts``'s examples. ``eval_prompts`` are answered greedily by ``evaluate``, which reports their
    mean reward.
    """

    loss_is_scaled_for_ga = True  # batch_loss scales for accumulation itself (dapo counts the whole generation)

    def __init__(
        self,
        model: nn.Module,
        args: TrainingArguments,
        *,
        train_dataset: list[dict[str, Any]],
        rewards: Sequence[NamedReward],
        settings: GRPOSettings,
        processing_class: PreTrainedTokenizerBase,
        eval_prompts: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        self.settings, self.rewards, self.eval_prompts = settings, list(rewards), eval_prompts or []
        weights = settings.reward_weights or (1.0,) * len(self.rewards)
        if len(weights) != len(self.rewards):
            raise ConfigError(f"{len(weights)} reward_weights for {len(self.rewards)} reward functions; give one each")
        self.reward_weights = torch.tensor(weights, dtype=torch.float32)
        self.steps_per_generation = settings.steps_per_generation or args.gradient_accumulation_steps
        completions = args.per_device_train_batch_size * self.steps_per_generation
        if completions % settings.num_generations:
            raise ConfigError(
                f"batch_size x steps_per_generation = {completions} completions per generation do not form groups of "
                f"num_generations={settings.num_generations}; make the batch a multiple of it"
            )
        self.prompts_per_generation = completions // settings.num_generations
        if len(train_dataset) < self.prompts_per_generation:
            raise ConfigError(
                f"{len(train_dataset)} prompts, but one generation takes {self.prompts_per_generation}; add prompts "
                f"or lower batch_size"
            )
        eos = processing_class.eos_token_id
        self.stop_token_ids = {eos} if eos is not None else set()
        self.pad_token_id = processing_class.pad_token_id if processing_class.pad_token_id is not None else eos or 0
        self._buffer: list[dict[str, torch.Tensor]] = []
        self._micro_step = 0
        super().__init__(
            model,
            args,
            train_dataset=train_dataset,
            eval_dataset=self.eval_prompts or None,  # the Trainer's evaluations during training (eval_steps) call
            data_collator=list,  # evaluate() below, which answers these prompts greedily
            processing_class=processing_class,
            **kwargs,
        )
        self.uses_reference = settings.beta > 0
        if settings.padding_free:  # each row of the packed micro-batch attends alone (not through a T x T mask)
            use_segment_attention(getattr(model, "base_model", model))

    # -- data -------------------------------------------------------------------------------------
    def get_train_dataloader(self) -> DataLoader:
        sampler = RepeatBatchSampler(
            len(self.train_dataset),
            self.prompts_per_generation,
            self.steps_per_generation * self.settings.num_iterations,
            self.args.seed,
        )
        # prepared by accelerate, as Trainer's own loader is: under torchrun each process gets its own prompts
        return self.accelerator.prepare(DataLoader(self.train_dataset, batch_sampler=sampler, collate_fn=list))

    def _prepare_inputs(self, inputs):
        """In training, the micro-batch of completions for this micro-step (generating when a new one is due)."""
        if not self.model.training:
            return inputs
        every = self.steps_per_generation * self.settings.num_iterations
        if self._micro_step % every == 0 or not self._buffer:
            self._buffer = self._split(self._generate_and_score(inputs))
        batch = self._buffer[self._micro_step % self.steps_per_generation]
        self._micro_step += 1
        tokens = batch["prompt_mask"].sum() + batch["completion_mask"].sum()  # what this micro-step trains on
        self.state.num_input_tokens_seen += int(self.accelerator.gather(tokens.reshape(1)).sum())
        return batch

    def _split(self, generation: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """The generation, shuffled (seeded by the step), in ``steps_per_generation`` micro-batches."""
        rows = len(generation["advantages"])
        order = torch.randperm(rows, generator=torch.Generator().manual_seed(self._generation_seed()))
        size = rows // self.steps_per_generation
        return [
            {key: value[order[start : start + size]] if value.dim() else value for key, value in generation.items()}
            for start in range(0, rows, size)
        ]

    def _generation_seed(self) -> int:
        return self.args.seed * 1_000_003 + self.state.global_step

    # -- sampling and scoring ---------------------------------------------------------------------
    @torch.no_grad()
    def _generate_and_score(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """G completions per prompt, their rewards and advantages, and the log-probs the loss compares with."""
        settings, groups = self.settings, self.settings.num_generations
        prompts = [row for row in rows for _ in range(groups)]
        completions = self.sample([row["prompt_input_ids"] for row in prompts], seed=self._generation_seed())
        per_function = self.score_completions(prompts, completions)
        rewards = combine_rewards(per_function, self.reward_weights)
        advantages = group_advantages(rewards, groups, settings.scale_rewards)
        batch = self._tensors(prompts, completions)
        truncated = torch.tensor([c.finish_reason == "length" for c in completions])
        loss_mask = batch["completion_mask"] * (~truncated[:, None] if settings.mask_truncated_completions else 1)
        batch.update(advantages=advantages, loss_mask=loss_mask, generation_tokens=loss_mask.sum().float())
        if self.settings.beta > 0:
            with self.reference(self.model):
                batch["ref_logps"] = self._chunked_logps(batch)
        if self.settings.num_iterations > 1 or self.steps_per_generation > self.args.gradient_accumulation_steps:
            batch["old_logps"] = self._chunked_logps(batch)
        self._record_generation(per_function, rewards, completions, truncated)
        return batch

    def score_completions(self, prompts: list[dict[str, Any]], completions: list) -> torch.Tensor:
        """[completion, reward function] rewards (NaN: no opinion), the functions called with TRL's arguments:
        completions as text for string prompts and as one assistant message for chat prompts, every column."""
        texts = self.processing_class.batch_decode([c.output_ids for c in completions], skip_special_tokens=True)
        shown = [
            text if isinstance(p["prompt"], str) else [{"role": "assistant", "content": text}]
            for p, text in zip(prompts, texts)
        ]
        columns = {name: [p["columns"][name] for p in prompts] for name in prompts[0]["columns"]}
        ids = [c.output_ids for c in completions]
        return torch.tensor(score(self.rewards, [p["prompt"] for p in prompts], shown, ids, columns))

    def sample(self, prompt_ids: list[list[int]], seed: int, greedy: bool = False) -> list:
        """The engine's completions of ``prompt_ids`` (sampled with the settings, or greedy)."""
        settings = self.settings
        params = SamplingParams(
            max_new_tokens=settings.max_completion_length,
            temperature=0.0 if greedy else settings.temperature,
            top_p=settings.top_p,
            top_k=settings.top_k,
        )
        model = self.accelerator.unwrap_model(self.model)
        packed = PackedWeights(model)  # packed for this rollout's many steps, freed after it (the adapter moves)
        engine = GenerationEngine(
            model, self.stop_token_ids, max_batch=len(prompt_ids), seed=seed, packed_weights=packed
        )
        training = model.training
        model.eval()  # gradient checkpointing turns the KV cache off in training mode
        try:
            return engine.generate(prompt_ids, params)
        finally:
            model.train(training)

    def _tensors(self, prompts: list[dict[str, Any]], completions: list) -> dict[str, torch.Tensor]:
        """Prompts left-padded and completions right-padded, with their masks, on the model's device."""
        device = self.accelerator.device
        width = max(len(p["prompt_input_ids"]) for p in prompts)
        length = max(len(c.output_ids) for c in completions)
        prompt_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        prompt_mask = torch.zeros_like(prompt_ids)
        completion_ids = torch.full((len(prompts), length), self.pad_token_id, dtype=torch.long)
        completion_mask = torch.zeros_like(completion_ids)
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            prompt_ids[i, width - len(prompt["prompt_input_ids"]) :] = torch.tensor(prompt["prompt_input_ids"])
            prompt_mask[i, width - len(prompt["prompt_input_ids"]) :] = 1
            completion_ids[i, : len(completion.output_ids)] = torch.tensor(completion.output_ids)
            completion_mask[i, : len(completion.output_ids)] = 1
        tensors = dict(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            completion_ids=completion_ids,
            completion_mask=completion_mask,
        )
        return {key: value.to(device) for key, value in tensors.items()}

    def _chunked_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        size = self.args.per_device_train_batch_size
        rows = len(batch["prompt_ids"])
        return torch.cat(
            [
                self.completion_logps(self.model, {k: v[start : start + size] for k, v in batch.items() if v.dim()})
                for start in range(0, rows, size)
            ]
        )

    def completion_logps(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """log π(token) at the sampling temperature for every completion position: [rows, completion tokens]
        (0 at padding; ``train.completion_logps``)."""
        unwrapped = self.accelerator.unwrap_model(model, keep_torch_compile=False)
        return completion_logps(model, batch, self.settings.temperature, unwrapped, self.settings.padding_free)

    def _record_generation(self, per_function, rewards, completions, truncated) -> None:
        groups = rewards.view(-1, self.settings.num_generations)
        group_std = nan_std(groups, dim=1)
        values = {
            "reward": rewards.nan_to_num(0.0),
            "reward_std": group_std.nan_to_num(0.0),
            "frac_reward_zero_std": torch.isclose(group_std, torch.zeros_like(group_std)).float(),
            "completions/mean_length": torch.tensor([float(len(c.output_ids)) for c in completions]),
            "completions/clipped_ratio": truncated.float(),
        }
        for column, named in enumerate(self.rewards):
            scored = per_function[:, column]
            if not scored.isnan().all():
                values[f"rewards/{named.name}/mean"] = scored[~scored.isnan()]
        self.record(**values)

    # -- the loss ---------------------------------------------------------------------------------
    def batch_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        settings, accumulation = self.settings, self.args.gradient_accumulation_steps
        logps = self.completion_logps(model, inputs)
        result = policy_loss(
            logps,
            inputs["advantages"],
            inputs["loss_mask"],
            loss_type=settings.loss_type,
            epsilon_low=settings.epsilon,
            epsilon_high=settings.clip_high,
            old_logps=inputs.get("old_logps"),
            ref_logps=inputs.get("ref_logps"),
            beta=settings.beta,
            max_completion_length=settings.max_completion_length,
            tokens=inputs["generation_tokens"] * accumulation / self.steps_per_generation,
        )
        metrics = {"clip_ratio/low_mean": result.clipped_low, "clip_ratio/high_mean": result.clipped_high}
        metrics["clip_ratio/region_mean"] = result.clipped
        if result.kl is not None:
            metrics["kl"] = result.kl
        self.record(**metrics)
        return result.loss if settings.loss_type == "dapo" else result.loss / accumulation

    # -- evaluation -------------------------------------------------------------------------------
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """The mean reward of greedy answers to the held-out prompts (each reward function's too)."""
        prompts = self.eval_prompts if eval_dataset is None else eval_dataset
        metrics = held_out_reward(self, prompts, prefix=metric_key_prefix)
        self.log(dict(metrics))
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


def held_out_reward(trainer: GRPOTrainer, prompts: list[dict[str, Any]], prefix: str = "eval") -> dict[str, float]:
    """``{prefix}_reward`` (weighted, as trained) and ``{prefix}_rewards/<function>`` over greedy answers."""
    if not prompts:
        return {}
    completions = trainer.sample([p["prompt_input_ids"] for p in prompts], seed=0, greedy=True)
    table = trainer.score_completions(prompts, completions)
    rewards = combine_rewards(table, trainer.reward_weights)
    metrics = {f"{prefix}_reward": float(rewards.nanmean())}
    for column, named in enumerate(trainer.rewards):
        metrics[f"{prefix}_rewards/{named.name}"] = float(table[:, column].nanmean())
    return metrics
