"""Small data files in the shapes people pass around: tool calls (TRL and sharegpt), sharegpt preference,
KTO as messages + label, a LLaMA-Factory dataset_info.json entry, and plain files to mix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

WEATHER = {
    "name": "get_weather",
    "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
CITIES = ["Paris", "Rome", "Oslo", "Lima", "Cairo", "Tokyo", "Quito", "Perth"]


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    """JSON Lines for ``.jsonl``, else one JSON array."""
    text = "".join(json.dumps(r) + "\n" for r in rows) if path.suffix == ".jsonl" else json.dumps(rows, indent=1)
    path.write_text(text, encoding="utf-8")
    return path


def trl_tool_rows() -> list[dict[str, Any]]:
    """TRL: assistant ``tool_calls``, ``tool`` turns, a ``tools`` list; every other row has no call."""
    rows = []
    for i, city in enumerate(CITIES):
        call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}
        turns = [{"role": "user", "content": f"Weather in {city}?"}]
        if i % 2 == 0:
            turns += [
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "name": "get_weather", "content": json.dumps({"temp": 10 + i})},
            ]
        turns.append({"role": "assistant", "content": f"It is {10 + i} degrees in {city}."})
        rows.append({"messages": turns, "tools": [{"type": "function", "function": WEATHER}]})
    return rows


def sharegpt_tool_rows() -> list[dict[str, Any]]:
    """LLaMA-Factory sharegpt: ``function_call`` / ``observation`` turns, ``tools`` as JSON text."""
    rows = []
    for i, city in enumerate(CITIES):
        turns = [{"from": "human", "value": f"Weather in {city}?"}]
        if i % 2 == 0:
            turns += [
                {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": city}})},
                {"from": "observation", "value": json.dumps({"temp": 10 + i})},
            ]
        turns.append({"from": "gpt", "value": f"It is {10 + i} degrees in {city}."})
        rows.append({"conversations": turns, "tools": json.dumps([WEATHER])})
    return rows


def sharegpt_preference_rows() -> list[dict[str, Any]]:
    """The conversation is the prompt; chosen is one message object, rejected a list (both allowed)."""
    return [
        {
            "conversations": [{"from": "human", "value": f"What is {i} plus {i}?"}],
            "chosen": {"from": "gpt", "value": f"It is {2 * i}."},
            "rejected": [{"from": "gpt", "value": f"It is {2 * i + 1}."}],
        }
        for i in range(8)
    ]


def kto_message_rows(label: str = "label") -> list[dict[str, Any]]:
    """TRL messages + a boolean ``label`` (or ``kto_tag``): even rows right (desirable), odd rows wrong."""
    return [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"It is {2 * i + i % 2}."},
            ],
            label: i % 2 == 0,
        }
        for i in range(8)
    ]


def chat_rows(n: int = 8) -> list[dict[str, Any]]:
    """Plain TRL messages: "Hi i" -> "Hello i!"."""
    return [
        {"messages": [{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": f"Hello {i}!"}]}
        for i in range(n)
    ]


def dataset_info(folder: Path) -> Path:
    """A dataset_info.json whose entry ``qa`` maps other column names (LLaMA-Factory's alpaca vocabulary)
    and whose entry ``chat`` reads OpenAI-style messages through sharegpt tags."""
    write_rows(
        folder / "qa.json",
        [{"question": f"What is {i} plus {i}?", "answer": f"It is {2 * i}.", "id": i} for i in range(8)],
    )
    write_rows(
        folder / "chat.jsonl",
        [
            {"dialog": [{"speaker": "client", "text": f"Hi {i}"}, {"speaker": "agent", "text": f"Hello {i}!"}]}
            for i in range(8)
        ],
    )
    info = {
        "qa": {"file_name": "qa.json", "columns": {"prompt": "question", "response": "answer"}},
        "chat": {
            "file_name": "chat.jsonl",
            "formatting": "sharegpt",
            "columns": {"messages": "dialog"},
            "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "client", "assistant_tag": "agent"},
        },
    }
    path = folder / "dataset_info.json"
    path.write_text(json.dumps(info, indent=1), encoding="utf-8")
    return path
