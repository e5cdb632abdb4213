"""One supervised fine-tuning run, end to end: measure, train, save, reload, merge, measure again."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments, set_seed

from .. import assets
from ..config import LoraConfig
from ..data.chatterbot import collate_causal, encode_chat_pair, split_pairs
from ..errors import ConfigError
from ..model import DeltaModel, get_delta_model
from .config import EMBEDDED_DATA, EMBEDDED_MODEL, TrainConfig
from .evaluate import answer, heldout_loss, perplexity
from .trainer import DeltaTrainer


@dataclass
class RunResult:
    """What a run measured; also written to ``<output_dir>/metrics.json``."""

    eval_loss_before: float
    eval_loss_after: float
    eval_loss_reloaded: float
    merged_max_logit_diff: float
    sample_question: str
    answer_before: str
    answer_after: str
    answer_merged: str
    train_seconds: float
    trainable_params: int
    total_params: int


def run_training(config: TrainConfig, log=print) -> RunResult:
    """Fine-tune ``config.model`` with LoRA on ``config.data`` and prove the adapter round-trips."""
    set_seed(config.seed)
    model_path = _model_path(config.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_examples, eval_examples, question = _chatterbot_examples(config, tokenizer)
    log(f"data: {len(train_examples)} training / {len(eval_examples)} held-out examples")

    def collate(batch):
        return collate_causal(batch, tokenizer.pad_token_id)

    model = _load_model(model_path)
    loss_before = heldout_loss(model, eval_examples, collate, desc="held-out loss (base)")
    answer_before = answer(model, tokenizer, question)
    log(f"held-out loss before: {loss_before:.4f} (perplexity {perplexity(loss_before):.2f})")

    lora = LoraConfig(
        r=config.r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.target_modules_spec,
        task_type="CAUSAL_LM",
        base_model_name_or_path=None if config.model == EMBEDDED_MODEL else config.model,
    )
    delta = get_delta_model(model, lora)
    trainable, total = delta.get_nb_trainable_parameters()
    log(f"LoRA r={config.r} on {config.target_modules}: {trainable:,} trainable of {total:,} parameters")

    started = time.perf_counter()
    _trainer(config, delta, tokenizer, train_examples, collate).train()
    train_seconds = time.perf_counter() - started

    loss_after = heldout_loss(delta, eval_examples, collate, desc="held-out loss (adapter)")
    answer_after = answer(delta, tokenizer, question)
    log(f"held-out loss after:  {loss_after:.4f} (perplexity {perplexity(loss_after):.2f})")

    adapter_dir = Path(config.output_dir) / "adapter"
    delta.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    log(f"adapter saved to {adapter_dir}")

    reloaded = DeltaModel.from_pretrained(_load_model(model_path), adapter_dir)
    loss_reloaded = heldout_loss(reloaded, eval_examples, collate, desc="held-out loss (reloaded)")
    merged = reloaded.merge_and_unload()
    probe = collate(eval_examples[: config.batch_size])
    with torch.no_grad():
        diff = (merged(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
                - delta(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits)  # fmt: skip
    answer_merged = answer(merged, tokenizer, question)

    result = RunResult(
        eval_loss_before=loss_before,
        eval_loss_after=loss_after,
        eval_loss_reloaded=loss_reloaded,
        merged_max_logit_diff=diff.abs().max().item(),
        sample_question=question,
        answer_before=answer_before,
        answer_after=answer_after,
        answer_merged=answer_merged,
        train_seconds=train_seconds,
        trainable_params=trainable,
        total_params=total,
    )
    (Path(config.output_dir) / "metrics.json").write_text(
        json.dumps({"config": asdict(config), "result": asdict(result)}, indent=2) + "\n", encoding="utf-8"
    )
    return result


def _model_path(model: str) -> Path:
    if model == EMBEDDED_MODEL:
        return assets.smollm2_path()
    path = Path(model)
    if not (path / "config.json").is_file():
        raise ConfigError(f"model={model!r} is not a model folder (no config.json); use 'smollm2' or a local path")
    return path


def _load_model(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)


def _chatterbot_examples(config: TrainConfig, tokenizer) -> tuple[list[dict], list[dict], str]:
    if config.data != EMBEDDED_DATA:
        raise ConfigError(f"data={config.data!r} is not supported yet; use 'chatterbot' (the embedded corpus)")
    train_pairs, eval_pairs = split_pairs(assets.chatterbot_pairs(), config.eval_fraction, config.seed)
    eval_pairs = eval_pairs[: config.eval_examples]

    def encode(pairs):
        return [encode_chat_pair(tokenizer, p.question, p.answer, max_length=config.max_length) for p in pairs]

    return encode(train_pairs), encode(eval_pairs), eval_pairs[0].question


def _trainer(config: TrainConfig, model: DeltaModel, tokenizer, train_examples, collate) -> DeltaTrainer:
    args = TrainingArguments(
        output_dir=str(Path(config.output_dir) / "checkpoints"),
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_steps,
        lr_scheduler_type="cosine",
        logging_steps=max(1, config.max_steps // 10),
        save_strategy="no",
        report_to=[],
        seed=config.seed,
        data_seed=config.seed,
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
    )
    return DeltaTrainer(
        model=model, args=args, train_dataset=train_examples, data_collator=collate, processing_class=tokenizer
    )
