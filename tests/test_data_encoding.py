"""Token ids and labels: exactly the assistant/completion tokens are labelled, truncation is counted,
packing computes what the examples compute alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
)

from deltatune.data import (
    IGNORE_INDEX,
    Conversation,
    DataError,
    Message,
    TextExample,
    collate_causal,
    encode_completion,
    encode_conversation,
    encode_records,
    pack_examples,
    prompt_ids,
    render,
)
from deltatune.runtime.assets import minilm_path

U, A, S = "user", "assistant", "system"


def chat(*turns: tuple[str, str]) -> Conversation:
    return Conversation(tuple(Message(role, content) for role, content in turns))


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)


@pytest.fixture()
def plain_tokenizer(smollm2_dir: Path) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)
    tokenizer.chat_template = None
    return tokenizer


def labelled_spans(tokenizer, example: dict[str, list[int]]) -> list[str]:
    """The decoded runs of consecutive labelled tokens."""
    spans, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    return [tokenizer.decode(span) for span in spans + ([current] if current else [])]


def test_single_turn_labels_exactly_the_answer_and_end_of_turn(tokenizer) -> None:
    example = encode_conversation(tokenizer, chat((U, "What is AI?"), (A, "A branch of computer science.")))
    assert labelled_spans(tokenizer, example) == ["A branch of computer science.<|im_end|>"]
    n_prompt = next(i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX)
    assert example["input_ids"][:n_prompt] == prompt_ids(tokenizer, [Message(U, "What is AI?")])
    assert example["input_ids"][-1] == tokenizer.eos_token_id  # the template's trailing newline is dropped


def test_multi_turn_labels_every_assistant_turn(tokenizer) -> None:
    conversation = chat((S, "Be brief."), (U, "Hi"), (A, "Hello."), (U, "How are you?"), (A, "Fine."), (U, "Bye"))
    example = encode_conversation(tokenizer, conversation)
    assert labelled_spans(tokenizer, example) == ["Hello.<|im_end|>", "Fine.<|im_end|>"]
    text = tokenizer.decode(example["input_ids"])
    assert text == render(tokenizer, conversation.messages[:5]).removesuffix("\n")  # the trailing user turn is dropped
    full = tokenizer(render(tokenizer, conversation.messages[:5]))["input_ids"]
    assert example["input_ids"] == full[: len(example["input_ids"])]  # same ids as tokenising the whole text


def test_completion_encoding_leaves_prompt_assistant_turns_unlabelled(tokenizer) -> None:
    prompt = (Message(U, "Hi"), Message(A, "Hello."), Message(U, "Joke?"))
    example = encode_completion(tokenizer, prompt, (Message(A, "No."),))
    assert labelled_spans(tokenizer, example) == ["No.<|im_end|>"]
    same = encode_conversation(tokenizer, Conversation((*prompt, Message(A, "No."))))
    assert same["input_ids"] == example["input_ids"]
    assert labelled_spans(tokenizer, same) == ["Hello.<|im_end|>", "No.<|im_end|>"]


def test_train_on_prompt_labels_everything(tokenizer) -> None:
    conversation = chat((U, "Hi"), (A, "Hello."), (U, "Bye"), (A, "Ciao."))
    example = encode_conversation(tokenizer, conversation, train_on_prompt=True)
    assert example["labels"] == example["input_ids"]
    assert example["input_ids"] == encode_conversation(tokenizer, conversation)["input_ids"]


def test_system_message_replaces_the_template_default(tokenizer) -> None:
    default = tokenizer.decode(encode_conversation(tokenizer, chat((U, "Hi"), (A, "Hello.")))["input_ids"])
    custom = tokenizer.decode(
        encode_conversation(tokenizer, chat((S, "Be brief."), (U, "Hi"), (A, "Hello.")))["input_ids"]
    )
    assert "You are a helpful AI assistant named SmolLM" in default
    assert custom.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi")
    assert "SmolLM" not in custom


def test_plain_format_without_chat_template(plain_tokenizer) -> None:
    example = encode_conversation(
        plain_tokenizer, chat((S, "Be brief."), (U, "What is AI?"), (A, "Machines."), (U, "And?"), (A, "That think."))
    )
    assert plain_tokenizer.decode(example["input_ids"]) == (
        "Be brief.\n\nQuestion: What is AI?\nAnswer: Machines.<|im_end|>\nQuestion: And?\nAnswer: That think.<|im_end|>"
    )
    assert labelled_spans(plain_tokenizer, example) == [" Machines.<|im_end|>", " That think.<|im_end|>"]
    assert plain_tokenizer.decode(prompt_ids(plain_tokenizer, [Message(U, "Hi")])) == "Question: Hi\nAnswer:"


def test_plain_format_needs_an_eos_token() -> None:
    bert = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    with pytest.raises(DataError, match="needs a tokenizer with an eos token"):
        encode_conversation(bert, chat((U, "q"), (A, "a")))


def test_a_template_that_does_not_render_in_order_is_refused(plain_tokenizer) -> None:
    plain_tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT>{% endif %}"
    )
    with pytest.raises(DataError, match="not a prefix"):
        encode_conversation(plain_tokenizer, chat((U, "q"), (A, "a")))


def test_text_examples_are_labelled_in_full_with_eos(tokenizer) -> None:
    encoded = encode_records(tokenizer, [TextExample("Once upon a time.")], max_length=64)
    (example,) = encoded.examples
    assert tokenizer.decode(example["input_ids"]) == "Once upon a time.<|im_end|>"
    assert example["labels"] == example["input_ids"]


def test_truncation_is_counted_and_label_free_examples_are_dropped(tokenizer) -> None:
    short = chat((U, "Why?"), (A, "Because."))
    long_answer = chat((U, "Why?"), (A, "Because " * 50))
    long_prompt = chat((U, "Why " * 80), (A, "Because."))
    full = encode_conversation(tokenizer, long_answer)
    encoded = encode_records(tokenizer, [short, long_answer, long_prompt], max_length=40)
    assert (encoded.n_truncated, encoded.n_dropped, len(encoded.examples)) == (2, 1, 2)
    assert encoded.examples[1] == {"input_ids": full["input_ids"][:40], "labels": full["labels"][:40]}
    assert encoded.summary(40) == (
        f"2 examples, {encoded.n_tokens:,} tokens; 2 longer than max_length=40 "
        "(cut at the end: 1, dropped, no answer token left: 1)"
    )


def test_collate_right_pads(tokenizer) -> None:
    batch = [
        encode_conversation(tokenizer, chat((U, "Hi"), (A, "Hello."))),
        encode_conversation(tokenizer, chat((U, "What is your favourite book?"), (A, "The dictionary."))),
    ]
    lengths = [len(example["input_ids"]) for example in batch]
    out = collate_causal(batch, pad_token_id=tokenizer.pad_token_id)
    assert set(out) == {"input_ids", "attention_mask", "labels"}
    for row, (example, n) in enumerate(zip(batch, lengths)):
        assert out["input_ids"][row, :n].tolist() == example["input_ids"]
        assert out["labels"][row, :n].tolist() == example["labels"]
        assert out["attention_mask"][row].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert (out["input_ids"][row, n:] == tokenizer.pad_token_id).all()
        assert (out["labels"][row, n:] == IGNORE_INDEX).all()


def test_packing_fills_rows_first_fit_decreasing() -> None:
    examples = [{"input_ids": [i] * n, "labels": [i] * n} for i, n in enumerate([5, 3, 6, 2, 4], start=1)]
    rows = pack_examples(examples, max_length=8)
    assert [row["input_ids"] for row in rows] == [[3] * 6 + [4] * 2, [1] * 5 + [2] * 3, [5] * 4]
    assert rows[0]["position_ids"] == [0, 1, 2, 3, 4, 5, 0, 1]
    assert rows[0]["labels"] == [IGNORE_INDEX] + [3] * 5 + [IGNORE_INDEX, 4]
    with pytest.raises(ValueError, match="does not fit max_length=4"):
        pack_examples(examples, max_length=4)


def test_packed_rows_compute_what_each_example_computes_alone(tokenizer) -> None:
    """Restarting position ids make transformers mask attention across packed examples."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_cache=False,
    )
    model = LlamaForCausalLM(config).eval()
    examples = [
        encode_conversation(tokenizer, chat((U, q), (A, a)))
        for q, a in (("Hi", "Hello."), ("What is AI?", "Machines."), ("Bye", "Ciao, see you soon."))
    ]
    rows = pack_examples(examples, max_length=200)
    assert len(rows) == 1
    batch = collate_causal(
        rows + [examples[0] | {"position_ids": list(range(len(examples[0]["input_ids"])))}], tokenizer.pad_token_id
    )  # a padded second row
    assert "attention_mask" not in batch
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        start = 0
        for example in sorted(examples, key=lambda e: -len(e["input_ids"])):
            n = len(example["input_ids"])
            alone = model(input_ids=torch.tensor([example["input_ids"]])).logits[0]
            torch.testing.assert_close(packed[0, start : start + n], alone, atol=1e-5, rtol=1e-5)
            start += n
        n = len(examples[0]["input_ids"])
        alone = model(input_ids=torch.tensor([examples[0]["input_ids"]])).logits[0]
        torch.testing.assert_close(packed[1, :n], alone, atol=1e-5, rtol=1e-5)
