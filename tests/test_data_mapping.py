"""Column mapping, LLaMA-Factory dataset_info entries, mixing several sources, and truncation that keeps
preference rows (prompt cut from the left, answer from the right), each cut counted by reason."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from data_shapes import chat_rows, dataset_info, kto_message_rows, write_rows
from deltatune.data import (
    Conversation,
    DataError,
    KTOExample,
    Message,
    PreferencePair,
    encode_records,
    load_records,
    load_sources,
    mix,
    parse_weights,
)
from deltatune.train.preference_data import (
    encode_kto_examples,
    encode_preference_pairs,
    fit,
)

QA = Conversation((Message("user", "What is 1 plus 1?"), Message("assistant", "It is 2.")))


@pytest.mark.parametrize(
    "columns",
    ['{"prompt": "q", "completion": "a"}', {"prompt": "q", "completion": "a"}, {"prompt": "q", "response": "a"}],
)
def test_columns_rename_to_our_names_json_or_mapping(tmp_path: Path, columns) -> None:
    path = write_rows(tmp_path / "d.jsonl", [{"q": "What is 1 plus 1?", "a": "It is 2."}])
    data = load_records(path, columns=columns)
    assert data.records == [QA]
    assert data.format == ("alpaca" if "response" in columns else "prompt_completion")  # LLaMA-Factory's names


def test_mapping_errors_name_the_column(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "d.jsonl", [{"q": "Hi", "a": "Hello"}])
    with pytest.raises(
        DataError,
        match=r"d.jsonl: columns maps 'completion' to 'answer', which is not a column; "
        r"the columns are q, a",
    ):
        load_records(path, columns={"prompt": "q", "completion": "answer"})
    with pytest.raises(DataError, match="columns: 'question' is not a column any format reads"):
        load_records(path, columns={"question": "q"})
    with pytest.raises(DataError, match="columns: unknown sharegpt tag 'speaker_tag'"):
        load_records(path, columns={"speaker_tag": "q"})


def test_a_dataset_info_entry_maps_columns_and_sharegpt_tags(tmp_path: Path) -> None:
    info = dataset_info(tmp_path)
    qa = load_records(f"{info}#qa", ignore_columns=["id"])
    assert (qa.format, qa.records[1]) == ("alpaca", QA)
    chat = load_records(f"{info}#chat")
    assert chat.format == "sharegpt"
    assert chat.records[0] == Conversation((Message("user", "Hi 0"), Message("assistant", "Hello 0!")))
    with pytest.raises(DataError, match="column 'id' is not read by the alpaca format"):
        load_records(f"{info}#qa")


def test_dataset_info_entries_that_cannot_be_read_are_refused(tmp_path: Path) -> None:
    info = dataset_info(tmp_path)
    entries = json.loads(info.read_text())
    entries["hub"] = {"hf_hub_url": "someone/data"}
    entries["ranked"] = {**entries["chat"], "ranking": True}
    info.write_text(json.dumps(entries), encoding="utf-8")
    with pytest.raises(
        DataError, match=r"dataset_info.json#hub: key 'hf_hub_url' is not supported \(nothing is downloaded\)"
    ):
        load_records(f"{info}#hub")
    with pytest.raises(DataError, match="says ranking=true, but the rows are sft data"):
        load_records(f"{info}#ranked")
    with pytest.raises(DataError, match="no entry 'nope'; it has qa, chat"):
        load_records(f"{info}#nope")


def test_kto_labels_must_be_booleans(tmp_path: Path) -> None:
    rows = kto_message_rows()
    rows[2]["label"] = "maybe"
    with pytest.raises(DataError, match="row 3: column 'label' must be true or false, got str 'maybe'"):
        load_records(write_rows(tmp_path / "k.jsonl", rows))
    assert load_records(write_rows(tmp_path / "t.jsonl", kto_message_rows("kto_tag"))).format == "messages_kto"


def test_mixing_resizes_each_source_by_its_weight(tmp_path: Path) -> None:
    a = write_rows(tmp_path / "a.jsonl", chat_rows(4))
    b = write_rows(tmp_path / "b.jsonl", chat_rows(12))
    sets = load_sources(f"{a},{b}")
    records = [r for s in sets for r in s.records]
    mixed = mix(records, [s.source for s in sets], parse_weights("1,1", 2), seed=0)
    assert mixed.counts == {str(a): (4, 8), str(b): (12, 8)}
    assert mixed.summary() == [f"{a}: 4 rows -> 8 (4 repeated)", f"{b}: 12 rows -> 8 (4 unused)"]
    from_a = [r for r in mixed.records if r.origin.source == str(a)]
    assert Counter(from_a) == Counter({r: 2 for r in sets[0].records})  # two whole passes
    assert mix(records, [s.source for s in sets], None).records == records
    assert mix(records, [s.source for s in sets], parse_weights("1,1", 2), seed=0).records == mixed.records


@pytest.mark.parametrize(
    ("text", "message"),
    [("1,2,3", "has 3 weights for 2 data sources"), ("1,x", "must be comma-separated numbers"), ("0,0", "not all 0")],
)
def test_bad_weights(text: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        parse_weights(text, 2)


def side(prompt: int, answer: int) -> dict[str, list[int]]:
    """An encoded example: prompt tokens 100.., answer tokens 200.."""
    ids = list(range(100, 100 + prompt)) + list(range(200, 200 + answer))
    return {"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]}


def test_fit_cuts_the_prompt_from_the_left_then_the_answer_from_the_right() -> None:
    reasons = Counter()
    assert fit({"x": side(5, 5)}, 16, 8, reasons) == {"x": side(5, 5)} and not reasons
    cut = fit({"chosen": side(20, 6), "rejected": side(20, 3)}, 16, 8, reasons)["chosen"]  # prompt keeps 10
    assert cut["input_ids"] == list(range(110, 120)) + list(range(200, 206))
    cut = fit({"x": side(20, 30)}, 16, 4, reasons)["x"]  # prompt keeps 4, answer 12
    assert cut["input_ids"] == list(range(116, 120)) + list(range(200, 212))
    assert reasons == {"prompt cut from the left": 2, "answer cut from the right": 1}
    assert fit({"x": side(20, 30)}, 16, 16, reasons) is None
    assert reasons["dropped, no answer token fits after the prompt"] == 1


def test_long_prompts_keep_their_preference_and_kto_rows(smollm2_dir) -> None:
    """The issue's case: prompts longer than max_length used to cost the whole row."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)
    prompt = (Message("user", "Tell me everything. " * 40 + "What is 1 plus 1?"),)
    pair = PreferencePair(prompt, (Message("assistant", "It is 2."),), (Message("assistant", "It is 3."),))
    encoded = encode_preference_pairs(tokenizer, [pair] * 3, max_length=64)
    assert (len(encoded.examples), encoded.n_truncated, encoded.n_dropped) == (3, 3, 0)
    assert encoded.reasons == {"prompt cut from the left": 3}
    example = encoded.examples[0]
    assert tokenizer.decode(example["chosen_input_ids"]).endswith(
        "What is 1 plus 1?<|im_end|>\n<|im_start|>assistant\nIt is 2.<|im_end|>"
    )
    kto = encode_kto_examples(tokenizer, [KTOExample(prompt, pair.chosen, True)], max_length=64, max_prompt_length=40)
    assert len(kto.examples) == 1 and len(kto.examples[0]["input_ids"]) == 64
    assert kto.summary(64) == "1 examples, 64 tokens; 1 longer than max_length=64 (prompt cut from the left: 1)"


def test_sft_truncation_side_left_keeps_the_end(smollm2_dir) -> None:
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)
    long_prompt = Conversation((Message("user", "Why " * 80), Message("assistant", "Because.")))
    assert encode_records(tokenizer, [long_prompt], 40).reasons == {"dropped, no answer token left": 1}
    left = encode_records(tokenizer, [long_prompt], 40, truncation_side="left")
    assert left.reasons == {"cut at the start": 1}
    assert tokenizer.decode(left.examples[0]["input_ids"]).endswith("assistant\nBecause.<|im_end|>")
