"""Sequence classification with an adapter and a new head; the demo: the embedded MiniLM encoder
learns the chatterbot topic of a question.

The model is ``AutoModelForSequenceClassification`` over the encoder, with a freshly initialised
head (``classifier``, or ``score``) of ``num_labels`` outputs. With ``task_type="SEQ_CLS"`` the head
is added to ``modules_to_save``, so it trains in full and is saved with the adapter, while the
encoder learns through the adapter only. The loss is the model's cross-entropy over the labels;
accuracy is the share of held-out texts whose arg-max logit is their label.

Run the demo with ``python -m deltatune.train.classify``.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_callback import ProgressCallback

from deltatune.config import DeltaConfig
from deltatune.data.chatterbot import chatterbot_topics
from deltatune.data.records import LabelledText
from deltatune.data.split import split_records
from deltatune.errors import DataError
from deltatune.model import get_delta_model
from deltatune.runtime import assets
from deltatune.train.preference import keep_columns
from deltatune.train.progress import ProgressBar
from deltatune.train.trainer import DeltaTrainer
from deltatune.tuners.lora.config import LoraConfig

ClassificationExample = dict[str, Any]  # {"input_ids": list[int], "label": int}


@dataclass
class ClassificationResult:
    """What ``run_classification`` measured on the held-out split."""

    labels: list[str]
    train_examples: int
    eval_examples: int
    majority_accuracy: float  # always answering the most frequent training label
    accuracy_before: float  # the untrained head
    accuracy_after: float
    train_seconds: float
    trainable_params: int
    total_params: int


def encode_labelled(
    tokenizer: Any, records: Sequence[LabelledText], label_ids: Mapping[str, int], max_length: int
) -> list[ClassificationExample]:
    """Token ids (with the tokenizer's special tokens, cut to ``max_length``) and the label's index."""
    unknown = sorted({r.label for r in records} - set(label_ids))
    if unknown:
        raise DataError(f"held-out label {unknown[0]!r} never occurs in the training data; add examples of it")
    return [
        {
            "input_ids": tokenizer(r.text, truncation=True, max_length=max_length)["input_ids"],
            "label": label_ids[r.label],
        }
        for r in records
    ]


@dataclass
class ClassificationCollator:
    """Right-pads ``input_ids`` (``attention_mask`` 0 on padding) and stacks the labels into ``labels`` [batch]."""

    pad_token_id: int

    def __call__(self, batch: Sequence[ClassificationExample]) -> dict[str, torch.Tensor]:
        width = max(len(example["input_ids"]) for example in batch)
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, example in enumerate(batch):
            input_ids[row, : len(example["input_ids"])] = torch.tensor(example["input_ids"])
            attention_mask[row, : len(example["input_ids"])] = 1
        labels = torch.tensor([example["label"] for example in batch], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@torch.no_grad()
def classification_accuracy(
    model: nn.Module, examples: Sequence[ClassificationExample], pad_token_id: int, batch_size: int = 64
) -> float:
    """Share of ``examples`` whose arg-max logit is their label (the model is run in eval mode)."""
    was_training = model.training
    model.eval()
    collate = ClassificationCollator(pad_token_id)
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size])
        inputs = {key: batch[key].to(device) for key in ("input_ids", "attention_mask")}
        logits = model(**inputs).logits
        correct += int((logits.argmax(-1).cpu() == batch["labels"]).sum())
    model.train(was_training)
    return correct / max(len(examples), 1)


def train_classifier(
    model: nn.Module, train: Sequence[ClassificationExample], args: TrainingArguments, pad_token_id: int
) -> DeltaTrainer:
    """Fit a ``DeltaModel`` classifier on ``train`` with transformers' Trainer; returns the trainer."""
    collate = ClassificationCollator(pad_token_id)
    trainer = DeltaTrainer(model=model, args=keep_columns(args), train_dataset=list(train), data_collator=collate)
    trainer.remove_callback(ProgressCallback)  # one progress bar, not a printed dict per log
    trainer.add_callback(ProgressBar())
    trainer.train()
    return trainer


def run_classification(
    model_path: str | Path | None = None,
    records: Sequence[LabelledText] | None = None,
    adapter: DeltaConfig | None = None,
    output_dir: str | Path = "outputs/classify",
    max_steps: int = 100,
    batch_size: int = 32,
    learning_rate: float = 2e-3,
    max_length: int = 64,
    eval_fraction: float = 0.2,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> ClassificationResult:
    """Train a sequence classifier and print held-out accuracy before and after.

    Defaults: the embedded MiniLM encoder (``model_path=None``), chatterbot questions labelled by
    topic (``records=None``), LoRA r=8 on every linear layer plus the new head (``adapter=None``).
    ``eval_fraction`` of the distinct texts is held out; the adapter is saved to ``output_dir/adapter``.
    """
    set_seed(seed)
    records = list(chatterbot_topics() if records is None else records)
    train_records, eval_records = split_records(records, eval_fraction, seed, key=lambda r: r.text)
    labels = sorted({r.label for r in train_records})
    if len(labels) < 2 or not eval_records:
        raise DataError(
            f"classification needs two or more labels to train on and held-out texts; got {len(labels)} label(s) "
            f"and {len(eval_records)} held-out texts from {len(records)} records"
        )
    label_ids = {label: i for i, label in enumerate(labels)}
    path = assets.minilm_path() if model_path is None else Path(model_path)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    train = encode_labelled(tokenizer, train_records, label_ids, max_length)
    held_out = encode_labelled(tokenizer, eval_records, label_ids, max_length)
    majority = Counter(r.label for r in train_records).most_common(1)[0][0]
    majority_accuracy = sum(r.label == majority for r in eval_records) / len(eval_records)
    log(
        f"data: {len(train)} training / {len(held_out)} held-out texts, {len(labels)} labels "
        f"(always answering {majority!r} scores {majority_accuracy:.1%})"
    )

    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=label_ids, local_files_only=True
    )
    pad = tokenizer.pad_token_id
    accuracy_before = classification_accuracy(model, held_out, pad)
    log(f"held-out accuracy before: {accuracy_before:.1%} (untrained head)")

    config = adapter or LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
    config = dataclasses.replace(config, task_type="SEQ_CLS")
    delta = get_delta_model(model, config)
    trainable, total = delta.get_nb_trainable_parameters()
    log(f"{config.peft_type} + new head: {trainable:,} trainable of {total:,} parameters")

    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, max_steps // 20),
        logging_steps=max(1, max_steps // 10),
        save_strategy="no",
        report_to=[],
        seed=seed,
        data_seed=seed,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
    )
    start = time.perf_counter()
    train_classifier(delta, train, args, pad)
    seconds = time.perf_counter() - start
    accuracy_after = classification_accuracy(delta, held_out, pad)
    log(f"held-out accuracy after {max_steps} steps ({seconds:.0f} s): {accuracy_after:.1%}")
    delta.save_pretrained(Path(output_dir) / "adapter")
    return ClassificationResult(
        labels, len(train), len(held_out), majority_accuracy, accuracy_before, accuracy_after, seconds, trainable, total
    )


if __name__ == "__main__":
    print(asdict(run_classification()))
