"""Tests for turning question/answer pairs into causal-LM training examples."""

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from deltatune.assets import QAPair, chatterbot_pairs, minilm_path
from deltatune.data.chatterbot import IGNORE_INDEX, collate_causal, encode_chat_pair, split_pairs


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)


@pytest.fixture()
def plain_tokenizer(smollm2_dir: Path) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)
    tokenizer.chat_template = None
    return tokenizer


def _labelled(example: dict[str, list[int]]) -> list[int]:
    return [label for label in example["labels"] if label != IGNORE_INDEX]


def test_split_groups_questions_and_is_deterministic() -> None:
    pairs = chatterbot_pairs()
    train, evaluation = split_pairs(pairs, eval_fraction=0.1, seed=0)
    assert len(train) + len(evaluation) == len(pairs)
    assert not {p.question for p in train} & {p.question for p in evaluation}
    n_questions = len({p.question for p in pairs})
    assert len({p.question for p in evaluation}) == round(0.1 * n_questions)
    assert split_pairs(pairs, eval_fraction=0.1, seed=0) == (train, evaluation)
    assert split_pairs(pairs, eval_fraction=0.1, seed=1) != (train, evaluation)


def test_split_keeps_every_answer_to_a_question_together() -> None:
    pairs = [QAPair("q1", "a", "t"), QAPair("q1", "b", "t"), QAPair("q2", "c", "t")]
    train, evaluation = split_pairs(pairs, eval_fraction=0.1)
    assert len(evaluation) in (1, 2)
    assert {p.question for p in evaluation} in ({"q1"}, {"q2"})
    assert split_pairs(pairs, eval_fraction=0.0) == (pairs, [])
    with pytest.raises(ValueError, match="eval_fraction"):
        split_pairs(pairs, eval_fraction=1.0)


def test_chat_encoding_labels_exactly_the_answer_and_end_of_turn(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    example = encode_chat_pair(tokenizer, "What is AI?", "A branch of computer science.")
    ids, labels = example["input_ids"], example["labels"]
    assert len(ids) == len(labels)
    assert tokenizer.decode(_labelled(example)) == "A branch of computer science.<|im_end|>"
    n_prompt = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    assert labels[n_prompt:] == ids[n_prompt:]
    assert all(label == IGNORE_INDEX for label in labels[:n_prompt])
    messages = [{"role": "user", "content": "What is AI?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(ids[:n_prompt]) == prompt
    assert ids[-1] == tokenizer.eos_token_id


def test_chat_encoding_uses_the_given_system_message(tokenizer: PreTrainedTokenizerBase) -> None:
    default = tokenizer.decode(encode_chat_pair(tokenizer, "Hi", "Hello.")["input_ids"])
    custom_ids = encode_chat_pair(tokenizer, "Hi", "Hello.", system="Be brief.")["input_ids"]
    custom = tokenizer.decode(custom_ids)
    assert "You are a helpful AI assistant named SmolLM" in default
    assert custom.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi")
    assert "SmolLM" not in custom


def test_encoding_truncates_to_max_length(tokenizer: PreTrainedTokenizerBase) -> None:
    full = encode_chat_pair(tokenizer, "Why?", "Because " * 50)
    cut = encode_chat_pair(tokenizer, "Why?", "Because " * 50, max_length=40)
    assert len(full["input_ids"]) > 40
    assert cut == {"input_ids": full["input_ids"][:40], "labels": full["labels"][:40]}


def test_plain_encoding_without_chat_template(plain_tokenizer: PreTrainedTokenizerBase) -> None:
    example = encode_chat_pair(plain_tokenizer, "What is AI?", "Machines that think.")
    assert plain_tokenizer.decode(example["input_ids"]) == (
        "Question: What is AI?\nAnswer: Machines that think.<|im_end|>"
    )
    assert plain_tokenizer.decode(_labelled(example)) == " Machines that think.<|im_end|>"
    with pytest.raises(ValueError, match="chat template"):
        encode_chat_pair(plain_tokenizer, "q", "a", system="s")


def test_plain_encoding_needs_an_eos_token() -> None:
    bert = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    with pytest.raises(ValueError, match="eos token"):
        encode_chat_pair(bert, "q", "a")


def test_non_prefix_chat_template_is_rejected(plain_tokenizer: PreTrainedTokenizerBase) -> None:
    plain_tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT>{% endif %}"
    )
    with pytest.raises(ValueError, match="not a prefix"):
        encode_chat_pair(plain_tokenizer, "q", "a")


def test_collate_right_pads(tokenizer: PreTrainedTokenizerBase) -> None:
    batch = [
        encode_chat_pair(tokenizer, "Hi", "Hello."),
        encode_chat_pair(tokenizer, "What is your favourite book?", "The dictionary."),
    ]
    lengths = [len(example["input_ids"]) for example in batch]
    out = collate_causal(batch, pad_token_id=tokenizer.pad_token_id)
    assert set(out) == {"input_ids", "attention_mask", "labels"}
    for tensor in out.values():
        assert tensor.shape == (2, max(lengths)) and tensor.dtype == torch.long
    for row, (example, n) in enumerate(zip(batch, lengths)):
        assert out["input_ids"][row, :n].tolist() == example["input_ids"]
        assert out["labels"][row, :n].tolist() == example["labels"]
        assert out["attention_mask"][row].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert (out["input_ids"][row, n:] == tokenizer.pad_token_id).all()
        assert (out["labels"][row, n:] == IGNORE_INDEX).all()
