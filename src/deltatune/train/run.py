"""One training run, end to end: validate, measure, train, save, check the saved adapter, report.

Order matters for the user: the config, the model path, the checkpoint and every data row are
checked before the model is loaded, so a typo costs a second, not a model load.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    EarlyStoppingCallback,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_callback import ProgressCallback

from deltatune.compat.transformers import allow_training_quantized
from deltatune.data import (
    EncodedSet,
    Record,
    RecordSet,
    TextExample,
    load_sources,
    mix,
    parse_weights,
    prompt_ids,
    split_records,
)
from deltatune.data.chat_defaults import write_chat_defaults
from deltatune.data.records import Conversation, Messages, PreferencePair, PromptOnly
from deltatune.errors import ConfigError, DataError, MergeError
from deltatune.model import DeltaModel, get_delta_model
from deltatune.runtime.checkpoints import checkpoint_step, latest_complete_checkpoint
from deltatune.runtime.loading import (
    base_model_id,
    load_model,
    load_tokenizer,
    model_folder,
)
from deltatune.runtime.quantization import is_quantized_model, prepare_for_kbit_training
from deltatune.train.config import TrainConfig
from deltatune.train.divergence import DivergenceGuard
from deltatune.train.evaluate import answer
from deltatune.train.precision import mixed_precision_flags, slow_half_precision_notice
from deltatune.train.progress import ProgressBar
from deltatune.train.report import plot_losses, write_metrics
from deltatune.train.stages import STAGES, Stage

SAMPLES = 3  # held-out questions answered before and after training, beside the data's own answer


@dataclass
class SampleAnswer:
    """A held-out question, the data's own answer to it (None where the data has none), and the model's."""

    question: str
    reference: str | None
    before: str
    after: str


@dataclass
class RunResult:
    """What a run measured; also written to ``<output_dir>/metrics.json``."""

    stage: str
    eval_before: dict[str, float]  # the base model (sft) / the untrained adapter (the preference stages)
    eval_after: dict[str, float]
    reloaded_max_logit_diff: float  # saved adapter, loaded back, vs the trained one
    merged_max_logit_diff: float | None  # merged weights vs the adapter; None: the method cannot merge
    sample_prompt: str | None
    answer_before: str | None
    answer_after: str | None
    answer_merged: str | None
    train_seconds: float
    tokens_per_second: float
    steps: int
    trainable_params: int
    total_params: int
    adapter_dir: str
    samples: list[SampleAnswer] = dataclasses.field(default_factory=list)  # the first is sample_prompt's
    diverged: str | None = None  # DivergenceGuard's line when the run stopped at a NaN/inf

    @property
    def eval_loss_before(self) -> float:
        return self.eval_before["eval_loss"]

    @property
    def eval_loss_after(self) -> float:
        return self.eval_after["eval_loss"]


def run_training(config: TrainConfig, log=print, callbacks: Sequence[TrainerCallback] = ()) -> RunResult:
    """Train ``config.method`` on ``config.data`` with ``config.stage``; see the module docstring.
    ``callbacks``: more ``TrainerCallback``s for the Trainer (e.g. a meter or a logger of one's own)."""
    config.check_inputs()  # data files, and max_length against the model's context, before anything loads
    set_seed(config.seed)
    stage = STAGES[config.stage]
    model_path = model_folder(config.model)
    checkpoint = _checkpoint(config, log)
    mixed_precision = mixed_precision_flags(config.precision)
    if notice := slow_half_precision_notice(mixed_precision):
        log(notice)
    progress = ProgressBar()
    guard = DivergenceGuard(log=log)  # a NaN/inf loss or weight stops the run at its last good adapter
    callbacks = [progress, guard, *_optional_callbacks(config), *callbacks]
    train_records, eval_records, sources = _records(config, stage, log)

    tokenizer = load_tokenizer(model_path)
    train_set, eval_set = (stage.encode(tokenizer, records, config) for records in (train_records, eval_records))
    log(f"train data: {train_set.summary(config.max_length)}")
    log(f"held-out data: {eval_set.summary(config.max_length)}")
    for name, encoded in (("training", train_set), ("held-out", eval_set)):
        if not encoded.examples:
            raise DataError(f"no {name} example is left after truncation to max_length={config.max_length}")

    scorer = {"num_labels": 1, "pad_token_id": tokenizer.pad_token_id} if stage.task_type == "SEQ_CLS" else {}
    model = load_model(model_path, stage.task_type, quantization=config.quantization, **scorer)
    if is_quantized_model(model):  # QLoRA: fp32 norms/head, input gradients, no CPU repacking of 4-bit weights
        prepare_for_kbit_training(model, config.gradient_checkpointing)
    model.config.use_cache = False  # training needs no KV cache (and packing needs none: see data.collate)
    delta = get_delta_model(model, config.delta_config(base_model_id(config.model)))
    allow_training_quantized(delta)  # transformers' Trainer trains a quantised base only under adapters
    trainable, total = delta.get_nb_trainable_parameters()
    log(f"{config.method}: {trainable:,} trainable of {total:,} parameters")
    arguments = _arguments(config, train_set, mixed_precision, stage)
    trainer = stage.trainer(config, delta, tokenizer, arguments, train_set.examples, eval_set.examples)
    trainer.remove_callback(ProgressCallback)
    for callback in callbacks:
        trainer.add_callback(callback)

    questions = _sample_questions(eval_records)
    prompt = questions[0][0] if questions else None
    if stage.task_type != "CAUSAL_LM":  # a scorer answers nothing: its prompt only probes the saved adapter
        questions = []
    # SFT's "before" is the base model; the preference stages score the untrained adapter (the base model,
    # or for rm the base under a new head).
    with delta.disable_adapter() if stage.name in ("sft", "grpo") else contextlib.nullcontext():
        before = trainer.evaluate()
    with delta.disable_adapter():
        answers_before = [answer(delta, tokenizer, question) for question, _ in questions]
    log(f"held-out {stage.metric} before: {_describe(before)}")

    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=checkpoint)
    train_seconds = time.perf_counter() - started
    delta.eval()  # Trainer leaves train mode (dropout) on
    after = trainer.evaluate()
    answers_after = [answer(delta, tokenizer, question) for question, _ in questions]
    samples = [
        SampleAnswer(question[-1].content, reference, before_text, after_text)
        for (question, reference), before_text, after_text in zip(questions, answers_before, answers_after)
    ]
    log(f"held-out {stage.metric} after:  {_describe(after)}")

    adapter_dir = Path(config.output_dir) / "adapter"
    if trainer.args.should_save:  # under torchrun only the main process writes
        delta.save_pretrained(adapter_dir)
        if note := write_chat_defaults(adapter_dir, train_records):
            log(note)
        tokenizer.save_pretrained(adapter_dir)
        log(f"adapter saved to {adapter_dir}")
    trainer.accelerator.wait_for_everyone()  # every process reads back what the main process wrote
    probe = _probe_ids(tokenizer, prompt, eval_set, delta)
    reloaded_diff = _reloaded_diff(delta, adapter_dir, probe)
    merged_diff, answer_merged = _merged_check(delta, tokenizer, prompt if questions else None, probe)

    state = trainer.state
    result = RunResult(
        stage=stage.name,
        eval_before=before,
        eval_after=after,
        reloaded_max_logit_diff=reloaded_diff,
        merged_max_logit_diff=merged_diff,
        sample_prompt=prompt[-1].content if prompt else None,
        answer_before=samples[0].before if samples else None,
        answer_after=samples[0].after if samples else None,
        answer_merged=answer_merged,
        samples=samples,
        diverged=guard.message,
        train_seconds=train_seconds,
        tokens_per_second=progress.tokens_per_second,
        steps=state.global_step,
        trainable_params=trainable,
        total_params=total,
        adapter_dir=str(adapter_dir),
    )
    history = [{"step": 0, **before}, *state.log_history]
    output = Path(config.output_dir)
    if trainer.args.should_save:
        write_metrics(
            output / "metrics.json",
            config=dataclasses.asdict(config),
            result=dataclasses.asdict(result),
            data=_data_stats(train_records, eval_records, train_set, eval_set, sources),
            log_history=history,
        )
        title = f"{stage.name} · {config.method} · {model_path.name}"
        plot_losses(output / "loss.png", history, title, samples, stage.loss_unit)
    return result


def _checkpoint(config: TrainConfig, log=print) -> str | None:
    """The checkpoint folder ``resume_from_checkpoint`` names ("last": the newest complete one), logged."""
    if not config.resume_from_checkpoint:
        return None
    if config.resume_from_checkpoint == "last":
        folder = Path(config.output_dir) / "checkpoints"
        path = latest_complete_checkpoint(folder)
        if path is None:
            raise ConfigError(
                f"resume_from_checkpoint=last: no complete checkpoint in {folder}; train without "
                f"resume_from_checkpoint, or point it at a checkpoint folder"
            )
    else:
        path = Path(config.resume_from_checkpoint)
        if not (path / "trainer_state.json").is_file():
            raise ConfigError(
                f"resume_from_checkpoint={str(path)!r} is not a checkpoint folder (no "
                f"trainer_state.json); point it at an output_dir/checkpoints/checkpoint-<step> "
                f"folder, or use last"
            )
    log(f"resuming from {path} (step {checkpoint_step(path)})")
    return str(path)


def _records(config: TrainConfig, stage: Stage, log) -> tuple[list[Record], list[Record], dict[str, tuple[int, int]]]:
    """(train, held-out, per source (rows, rows used)): every row validated; several sources are mixed by
    data_weights after the held-out split (``data.mixing``)."""
    ignore = [column.strip() for column in config.ignore_columns.split(",") if column.strip()]

    def checked(spec: str) -> list[RecordSet]:
        return [_checked(s, stage) for s in load_sources(spec, config.data_format, config.columns, ignore)]

    sets, eval_sets = checked(config.data), checked(config.eval_data) if config.eval_data else []
    records = [record for data in sets for record in data.records]
    for key, group in (("data", sets), ("eval_data", eval_sets)):
        for data in group:
            log(f"{key}: {data.source} — format {data.format}, {len(data)} rows")
    if config.eval_data:
        train = records
        held_out = [record for data in eval_sets for record in data.records]
    else:
        train, held_out = split_records(records, config.eval_fraction, config.seed)
        if not train or not held_out:
            raise DataError(
                f"{config.data}: {len(records)} examples are too few to hold out eval_fraction="
                f"{config.eval_fraction}; add rows or pass eval_data"
            )
        log(
            f"data: {len(records)} rows, {len(held_out)} held out (eval_fraction={config.eval_fraction}), "
            f"{min(len(held_out), config.eval_examples)} of them scored (eval_examples)"
        )
    mixed = mix(train, [data.source for data in sets], parse_weights(config.data_weights, len(sets)), config.seed)
    for line in mixed.summary() if len(sets) > 1 else []:
        log(f"data: {line}")
    return mixed.records, held_out[: config.eval_examples], mixed.counts


def _checked(data: RecordSet, stage: Stage) -> RecordSet:
    if data.kind not in stage.kinds:
        meant = next((s.name for s in STAGES.values() if data.kind in s.kinds), None)
        hint = f"did you mean stage={meant}?" if meant else "use `deltatune classify` for it"
        raise DataError(
            f"stage={stage.name} trains on {' or '.join(stage.kinds)} data, but {data.source} is "
            f"{data.kind} data (format {data.format}); {hint} (or e.g. data={stage.data_hint})"
        )
    return data


def _arguments(
    config: TrainConfig, train_set: EncodedSet, mixed_precision: dict[str, bool], stage: Stage
) -> TrainingArguments:
    steps = config.max_steps
    if not steps:
        rows = len(train_set.examples)  # an upper bound when packing
        steps = math.ceil(config.epochs * math.ceil(rows / config.batch_size) / config.gradient_accumulation_steps)
    notice = _warmup_notice(config, steps)
    if notice:
        print(f"notice: {notice}", file=sys.stderr)
    evaluate = "steps" if config.eval_steps else "no"
    return TrainingArguments(
        output_dir=str(Path(config.output_dir) / "checkpoints"),
        max_steps=config.max_steps or -1,
        num_train_epochs=config.epochs or 1.0,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        logging_steps=config.logging_steps or max(1, steps // 50),
        eval_strategy=evaluate,
        eval_steps=config.eval_steps or None,
        save_strategy="steps" if config.save_steps or config.early_stopping_patience else "no",
        save_steps=config.save_steps or config.eval_steps or 500,
        save_total_limit=config.save_total_limit or None,
        load_best_model_at_end=bool(config.early_stopping_patience),
        metric_for_best_model=f"eval_{stage.metric}" if config.early_stopping_patience else None,
        greater_is_better=(stage.metric == "reward") if config.early_stopping_patience else None,
        activation_checkpointing=config.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if config.gradient_checkpointing else None,
        **mixed_precision,
        report_to=[name for name in config.reporters() if name != "tensorboard"],  # TensorBoard: _optional_callbacks
        seed=config.seed,
        data_seed=config.seed,
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding" if stage.metric == "loss" else "no",  # GRPO counts its own
    )


def _warmup_notice(config: TrainConfig, steps: int) -> str | None:
    """One line when warm-up lasts the whole run of ``steps`` optimizer steps, else None: the learning rate
    then never reaches learning_rate (and a one-step run trains at 0)."""
    if not config.warmup_steps or config.warmup_steps < steps:
        return None
    return (
        f"warmup_steps={config.warmup_steps} covers the whole run ({steps} step{'' if steps == 1 else 's'}): the "
        f"learning rate never reaches learning_rate={config.learning_rate:g}"
        f"{' (the step trains at 0)' if steps == 1 else ''}; set warmup_steps below {steps}, e.g. 0"
    )


def _optional_callbacks(config: TrainConfig) -> list:
    """Early stopping and TensorBoard (tensorboard=true or report_to=tensorboard, into output_dir/tensorboard),
    when asked for (made before the model loads, so they fail first)."""
    callbacks = []
    if config.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(config.early_stopping_patience))
    if "tensorboard" in config.reporters():
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("tensorboard=true needs the tensorboard package: pip install tensorboard") from None
        from transformers.integrations import TensorBoardCallback

        callbacks.append(TensorBoardCallback(SummaryWriter(log_dir=str(Path(config.output_dir) / "tensorboard"))))
    return callbacks


def _sample_questions(records: list[Record]) -> list[tuple[Messages, str | None]]:
    """Up to ``SAMPLES`` held-out (prompt, the data's answer) pairs with distinct prompts; none for plain text."""
    questions: dict[str, tuple[Messages, str | None]] = {}
    for record in records:
        if isinstance(record, TextExample) or len(questions) == SAMPLES:
            break
        questions.setdefault(record.prompt[-1].content, (record.prompt, _reference(record)))
    return list(questions.values())


def _reference(record: Record) -> str | None:
    """The data's own answer: the conversation's next turn, the chosen answer, or a desirable completion."""
    if isinstance(record, Conversation):
        return record.messages[len(record.prompt)].content
    if isinstance(record, PreferencePair):
        return record.chosen[0].content
    if isinstance(record, PromptOnly):  # GRPO's data: its solution, when the rows carry one
        solution = dict(record.columns).get("solution")
        return None if solution is None else str(solution)
    return record.completion[0].content if record.label else None


def _probe_ids(tokenizer, prompt: Messages | None, eval_set: EncodedSet, model: DeltaModel) -> torch.Tensor:
    """One short input on which the trained, reloaded and merged adapters must agree."""
    ids = prompt_ids(tokenizer, prompt) if prompt else eval_set.examples[0]["input_ids"]
    return torch.tensor([ids], device=next(model.parameters()).device)


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def _reloaded_diff(delta: DeltaModel, adapter_dir: Path, probe: torch.Tensor) -> float:
    """Max |logit difference| between the trained adapter and its saved files loaded back beside it."""
    trained = _logits(delta, probe)
    delta.load_adapter(adapter_dir, adapter_name="reloaded")
    try:
        delta.set_adapter("reloaded")
        return (_logits(delta, probe) - trained).abs().max().item()
    finally:
        delta.set_adapter("default")
        delta.delete_adapter("reloaded")


def _merged_check(
    delta: DeltaModel, tokenizer, prompt: Messages | None, probe: torch.Tensor
) -> tuple[float | None, str | None]:
    """(max |logit difference| merged vs unmerged, the merged model's answer); (None, None) when the
    method cannot merge, or the base is quantised (merging would re-quantise it: the difference would
    measure the rounding, and unmerging would not give the trained base back). The weights are unmerged
    again afterwards."""
    if is_quantized_model(delta.base_model):
        return None, None
    unmerged = _logits(delta, probe)
    try:
        delta.merge_adapter(safe_merge=True)
    except MergeError:
        return None, None
    try:
        diff = (_logits(delta, probe) - unmerged).abs().max().item()
        return diff, answer(delta, tokenizer, prompt) if prompt else None
    finally:
        delta.unmerge_adapter()


def _data_stats(train_records, eval_records, train_set: EncodedSet, eval_set: EncodedSet, sources) -> dict:
    """Row and token counts; the cuts by reason and the per-source mix appear when there are any."""
    stats = {
        "train_records": len(train_records),
        "train_examples": len(train_set.examples),
        "train_tokens": train_set.n_tokens,
        "train_truncated": train_set.n_truncated,
        "train_dropped": train_set.n_dropped,
        "eval_records": len(eval_records),
        "eval_examples": len(eval_set.examples),
        "eval_truncated": eval_set.n_truncated,
        "eval_dropped": eval_set.n_dropped,
    }
    for name, encoded in (("train", train_set), ("eval", eval_set)):
        if encoded.reasons:
            stats[f"{name}_cuts"] = dict(encoded.reasons)
    if len(sources) > 1:
        stats["sources"] = {source: {"rows": have, "used": used} for source, (have, used) in sources.items()}
    return stats


def _describe(metrics: dict[str, float]) -> str:
    """ "2.7132 (perplexity 15.08)", plus the reward accuracy when the stage logs one; GRPO: the mean reward
    and each reward function's."""
    if "eval_reward" in metrics:
        parts = [f"{key.removeprefix('eval_rewards/')} {value:.3f}" for key, value in metrics.items() if "/" in key]
        return f"{metrics['eval_reward']:.4f}" + (f" ({', '.join(parts)})" if parts else "")
    text = f"{metrics['eval_loss']:.4f}"
    if "eval_perplexity" in metrics:
        text += f" (perplexity {metrics['eval_perplexity']:.2f})"
    accuracy = metrics.get("eval_rewards/accuracies")
    if accuracy is not None:
        text += f" (reward accuracy {accuracy:.3f})"
    return text
