"""Sequence classification: a LoRA adapter plus a new head learns a separable task on a tiny BERT,
and the embedded MiniLM learns chatterbot topics (slow)."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoTokenizer

from deltatune import LoraConfig, get_delta_model
from deltatune.data.records import LabelledText
from deltatune.errors import DataError
from deltatune.runtime.assets import minilm_path
from deltatune.train.classify import (
    ClassificationCollator,
    classification_accuracy,
    encode_labelled,
    run_classification,
    train_classifier,
)
from preference_helpers import training_args
from tiny_models import tiny_bert

# after a [CLS]-like token 1, class k draws its tokens from its own id range: separable, by reading the tokens
RANGES = [(10, 20), (20, 30), (30, 40)]


def separable_examples(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        low, high = RANGES[i % 3]
        tokens = [rng.randrange(low, high) for _ in range(rng.randrange(3, 8))]
        examples.append({"input_ids": [1, *tokens], "label": i % 3})
    return examples


def test_collator_pads_the_tokens_and_stacks_the_labels() -> None:
    examples = [{"input_ids": [5, 6, 7], "label": 2}, {"input_ids": [8], "label": 0}]
    batch = ClassificationCollator(pad_token_id=0)(examples)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [2, 0]


def test_encoding_refuses_a_label_the_training_data_lacks() -> None:
    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    encoded = encode_labelled(tokenizer, [LabelledText("Hello there", "greetings")], {"greetings": 4}, max_length=4)
    assert encoded == [{"input_ids": tokenizer("Hello there")["input_ids"][:4], "label": 4}]
    with pytest.raises(DataError, match="held-out label 'sports' never occurs"):
        encode_labelled(tokenizer, [LabelledText("Who won?", "sports")], {"greetings": 0}, max_length=16)


def test_run_refuses_data_with_one_label_before_loading_a_model(tmp_path) -> None:
    records = [LabelledText(f"question {i}", "only") for i in range(10)]
    with pytest.raises(DataError, match=r"needs two or more labels .* got 1 label"):
        run_classification(model_path=tmp_path / "no-model-here", records=records, output_dir=tmp_path)


def test_adapter_and_new_head_learn_a_separable_task_on_a_tiny_bert(tmp_path) -> None:
    train, held_out = separable_examples(96, seed=0), separable_examples(48, seed=1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="SEQ_CLS")
    model = get_delta_model(tiny_bert(), config)
    head_before = model.base_model.classifier.original_module.weight.detach().clone()
    before = classification_accuracy(model, held_out, pad_token_id=0)
    args = training_args(tmp_path, max_steps=40, per_device_train_batch_size=16)
    train_classifier(model, train, args, pad_token_id=0)
    after = classification_accuracy(model, held_out, pad_token_id=0)
    assert before < 0.6 and after >= 0.9, (before, after)  # chance is 1/3
    head = model.base_model.classifier
    assert torch.equal(head.original_module.weight, head_before)  # the original head stays as it was
    assert not torch.equal(head.modules_to_save["default"].weight, head_before)  # its trained copy moved
    assert "classifier.modules_to_save.default.weight" in model.adapter_state("default")  # saved with the adapter


@pytest.mark.slow
def test_minilm_learns_chatterbot_topics(tmp_path) -> None:
    result = run_classification(output_dir=tmp_path, max_steps=60, log=lambda line: None)
    assert len(result.labels) == 21 and result.eval_examples > 100
    assert result.accuracy_after > max(result.accuracy_before, result.majority_accuracy) + 0.1, result
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_classify_command_trains_a_tiny_classifier_from_a_file(tmp_path, capsys):
    """`deltatune classify --data` end to end on a tiny BERT saved to disk: exit 0 and the accuracy line."""
    from deltatune.cli.main import main

    model_dir, data_file = _tiny_classification_files(tmp_path)
    code = main(
        [
            "classify",
            "--model",
            str(model_dir),
            "--data",
            str(data_file),
            "--max-steps",
            "3",
            "--batch-size",
            "4",
            "--output-dir",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "held-out accuracy:" in out
    assert "{'" not in out  # one progress bar, not the Trainer's raw log dicts
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


def test_classify_command_refuses_conversation_data(tmp_path, capsys):
    from deltatune.cli.main import main

    data_file = tmp_path / "chat.jsonl"
    data_file.write_text('{"prompt": "Hi", "completion": "Hello"}\n')
    assert main(["classify", "--data", str(data_file)]) == 2
    assert "classify needs text/label rows" in capsys.readouterr().err


def _tiny_classification_files(tmp_path):
    import json

    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from deltatune.runtime.assets import minilm_path

    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, num_labels=2
    )
    model_dir = tmp_path / "tiny-bert"
    BertForSequenceClassification(config).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(model_dir)
    rows = [{"text": f"{word} number {i}", "label": word} for i in range(12) for word in ("apple", "rocket")]
    data_file = tmp_path / "labelled.jsonl"
    data_file.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return model_dir, data_file
