"""Tool calling: TRL and sharegpt rows become the same records; the plain layout (SmolLM2's template has no
tool support) and a template's own tool support both put the loss on the assistant's calls and answers only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from data_shapes import WEATHER, sharegpt_tool_rows, trl_tool_rows, write_rows
from deltatune.data import (
    DataError,
    Message,
    ToolCall,
    encode_conversation,
    load_records,
    render,
)

# A tool-aware template (as Qwen2.5's does: tools in the system turn, calls in its own markup).
NATIVE = (
    "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<call>{{ c.function.name }} {{ c.function.arguments | tojson }}"
    "</call>{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)


def labelled_text(tokenizer, example) -> str:
    return tokenizer.decode([i for i, label in zip(example["input_ids"], example["labels"]) if label != -100])


def test_trl_and_sharegpt_tool_rows_become_the_same_records(tmp_path: Path) -> None:
    trl = load_records(write_rows(tmp_path / "trl.jsonl", trl_tool_rows()))
    sharegpt = load_records(write_rows(tmp_path / "sharegpt.json", sharegpt_tool_rows()))
    assert (trl.format, sharegpt.format) == ("messages", "sharegpt")
    assert [r.messages for r in trl.records] == [r.messages for r in sharegpt.records]
    first = trl.records[0]
    assert first.messages[1] == Message("assistant", "", (ToolCall("get_weather", '{"city": "Paris"}'),))
    assert first.messages[2] == Message("tool", '{"temp": 10}')
    assert json.loads(first.tools) == [{"type": "function", "function": WEATHER}]
    assert json.loads(sharegpt.records[0].tools) == [WEATHER]
    assert str(trl.records[3].origin) == f"{tmp_path / 'trl.jsonl'}: row 4"


def test_plain_layout_puts_loss_on_calls_and_answers_not_on_tool_results(tmp_path: Path, tokenizer) -> None:
    record = load_records(write_rows(tmp_path / "s.json", sharegpt_tool_rows())).records[0]
    text = render(tokenizer, record.messages, tools=record.tools)
    assert '<tools>\n{"name": "get_weather"' in text and "<|im_start|>system\nYou can call these functions:" in text
    assert '<|im_start|>user\n<tool_response>\n{"temp": 10}\n</tool_response><|im_end|>' in text
    example = encode_conversation(tokenizer, record)
    assert labelled_text(tokenizer, example) == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
        "It is 10 degrees in Paris.<|im_end|>"
    )
    assert tokenizer.decode(example["input_ids"]) == text.rstrip("\n")


def test_parallel_calls_and_their_results_share_one_turn_each(tmp_path: Path, tokenizer) -> None:
    calls = [{"name": "get_weather", "arguments": {"city": c}} for c in ("Oslo", "Rome")]
    row = {
        "conversations": [
            {"from": "human", "value": "Oslo or Rome?"},
            {"from": "function_call", "value": json.dumps(calls)},
            {"from": "observation", "value": "5"},
            {"from": "observation", "value": "25"},
            {"from": "gpt", "value": "Rome is warmer."},
        ],
        "tools": json.dumps([WEATHER]),
    }
    record = load_records(write_rows(tmp_path / "p.json", [row])).records[0]
    text = render(tokenizer, record.messages, tools=record.tools)
    assert (
        text.count('<tool_call>\n{"name": "get_weather"') == 2 and text.count("<|im_start|>user\n<tool_response>") == 1
    )
    assert "</tool_response>\n<tool_response>\n25" in text
    labelled = labelled_text(tokenizer, encode_conversation(tokenizer, record))
    assert (
        labelled.count("<tool_call>") == 2 and "25" not in labelled and labelled.endswith("Rome is warmer.<|im_end|>")
    )


def test_a_template_with_tool_support_renders_tools_itself(tmp_path: Path, smollm2_dir) -> None:
    native = AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)
    native.chat_template = NATIVE
    record = load_records(write_rows(tmp_path / "t.jsonl", trl_tool_rows())).records[0]
    text = render(native, record.messages, tools=record.tools)
    assert (
        text.startswith('<|im_start|>system\nTools: [{"type": "function", "function": {"name": "get_weather"')
        and "<tool_call>" not in text
    )
    assert '<|im_start|>tool\n{"temp": 10}<|im_end|>' in text
    assert labelled_text(native, encode_conversation(native, record)) == (
        '<call>get_weather {"city": "Paris"}</call><|im_end|>It is 10 degrees in Paris.<|im_end|>'
    )


TOOL_ERRORS = [
    (
        {"from": "function_call", "value": '{"name": "get_time", "arguments": {}}'},
        json.dumps([WEATHER]),
        "'conversations' message 2 calls 'get_time', which column 'tools' does not offer (it has get_weather)",
    ),
    (
        {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}'},
        json.dumps([WEATHER]),
        "'conversations' message 2: the function call is not valid JSON",
    ),
    (
        {"from": "function_call", "value": '{"name": "get_weather", "arguments": "Paris"}'},
        json.dumps([WEATHER]),
        "'conversations' message 2: the arguments of 'get_weather' are not valid JSON",
    ),
    (
        {"from": "function_call", "value": '{"name": "get_weather"}'},
        '[{"name": "get_weather"',
        "column 'tools' is not valid JSON",
    ),
    (
        {"from": "function_call", "value": '{"name": "get_weather"}'},
        '[{"description": "no name"}]',
        "column 'tools' item 1 is not a function schema with a 'name'",
    ),
    (
        {"from": "observation", "value": "21"},
        json.dumps([WEATHER]),
        "'conversations' message 2: a tool result must follow an assistant message that calls a tool",
    ),
]


@pytest.mark.parametrize(("turn", "tools", "message"), TOOL_ERRORS, ids=[m[:40] for *_, m in TOOL_ERRORS])
def test_bad_tool_rows_are_one_line_errors(tmp_path: Path, turn: dict, tools: str, message: str) -> None:
    row = {
        "conversations": [{"from": "human", "value": "Weather?"}, turn, {"from": "gpt", "value": "Sunny."}],
        "tools": tools,
    }
    path = write_rows(tmp_path / "bad.jsonl", [row])
    with pytest.raises(DataError) as info:
        load_records(path)
    assert str(info.value).startswith(f"{path}: row 1: {message}"), str(info.value)


def test_trl_tool_calls_only_on_assistant_turns(tmp_path: Path) -> None:
    row = trl_tool_rows()[0]
    row["messages"][0]["tool_calls"] = row["messages"][1]["tool_calls"]
    with pytest.raises(DataError, match="'messages' message 1: only assistant messages make tool calls, not user"):
        load_records(write_rows(tmp_path / "bad.jsonl", [row]))
