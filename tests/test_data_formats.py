"""Format detection and normalisation: every format becomes the right record, every bad row a one-line error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from deltatune.data import (
    FORMATS,
    Conversation,
    DataError,
    KTOExample,
    LabelledText,
    Message,
    PreferencePair,
    PromptOnly,
    TextExample,
    load_records,
)

U, A, S = "user", "assistant", "system"


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def conversation(*turns: tuple[str, str]) -> Conversation:
    return Conversation(tuple(Message(role, content) for role, content in turns))


def msgs(*turns: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in turns]


CASES = [
    (
        "messages",
        {"messages": msgs((S, "Be kind."), (U, "Hi"), (A, "Hello!"), (U, "Bye"), (A, "See you."))},
        conversation((S, "Be kind."), (U, "Hi"), (A, "Hello!"), (U, "Bye"), (A, "See you.")),
    ),
    (
        "sharegpt",
        {
            "conversations": [
                {"from": "system", "value": "Be kind."},
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Hello!"},
            ]
        },
        conversation((S, "Be kind."), (U, "Hi"), (A, "Hello!")),
    ),
    (
        "alpaca",
        {
            "instruction": "Add the numbers.",
            "input": "2 and 3",
            "output": "5",
            "system": "Be exact.",
            "history": [["What is 1+1?", "2"]],
        },
        conversation((S, "Be exact."), (U, "What is 1+1?"), (A, "2"), (U, "Add the numbers.\n\n2 and 3"), (A, "5")),
    ),
    ("alpaca", {"instruction": "Say hi.", "input": "", "output": "Hi."}, conversation((U, "Say hi."), (A, "Hi."))),
    (
        "prompt_completion",
        {"prompt": "What is AI?", "completion": "Machines that think."},
        conversation((U, "What is AI?"), (A, "Machines that think.")),
    ),
    (
        "prompt_completion",
        {"prompt": msgs((S, "Short."), (U, "Hi")), "completion": msgs((A, "Hello."))},
        conversation((S, "Short."), (U, "Hi"), (A, "Hello.")),
    ),
    ("text", {"text": "Once upon a time."}, TextExample("Once upon a time.")),
    ("classification", {"text": "What is AI?", "label": "ai"}, LabelledText("What is AI?", "ai")),
    ("classification", {"text": "What is AI?", "label": 3}, LabelledText("What is AI?", "3")),
    (
        "prompt",
        {"prompt": "What is 2+2?", "solution": "4", "level": 1},
        PromptOnly((Message("user", "What is 2+2?"),), "What is 2+2?", (("solution", "4"), ("level", 1))),
    ),
    (
        "prompt",
        {"prompt": msgs((S, "Be brief."), (U, "Hi")), "solution": "Hello"},
        PromptOnly((Message("system", "Be brief."), Message("user", "Hi")), None, (("solution", "Hello"),)),
    ),
    (
        "preference",
        {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."},
        PreferencePair((Message(U, "Hi"),), (Message(A, "Hello!"),), (Message(A, "Go away."),)),
    ),
    (
        "preference",
        {"chosen": msgs((U, "Hi"), (A, "Hello!")), "rejected": msgs((U, "Hi"), (A, "Go away."))},
        PreferencePair((Message(U, "Hi"),), (Message(A, "Hello!"),), (Message(A, "Go away."),)),
    ),
    (
        "preference",
        {
            "chosen": msgs((U, "a"), (A, "b"), (U, "c"), (A, "good")),
            "rejected": msgs((U, "a"), (A, "b"), (U, "c"), (A, "bad")),
        },
        PreferencePair(
            tuple(Message(r, c) for r, c in ((U, "a"), (A, "b"), (U, "c"))), (Message(A, "good"),), (Message(A, "bad"),)
        ),
    ),
    (
        "kto",
        {"prompt": "Hi", "completion": "Hello!", "label": True},
        KTOExample((Message(U, "Hi"),), (Message(A, "Hello!"),), True),
    ),
    (
        "kto",
        {"prompt": msgs((U, "Hi")), "completion": msgs((A, "Go away.")), "label": False},
        KTOExample((Message(U, "Hi"),), (Message(A, "Go away."),), False),
    ),
    (
        "sharegpt_preference",
        {
            "conversations": [{"from": "human", "value": "Hi"}],
            "chosen": {"from": "gpt", "value": "Hello!"},
            "rejected": [{"from": "gpt", "value": "Go away."}],
        },
        PreferencePair((Message(U, "Hi"),), (Message(A, "Hello!"),), (Message(A, "Go away."),)),
    ),
    (
        "alpaca_preference",
        {"instruction": "Say hi.", "input": "", "chosen": "Hi.", "rejected": "No."},
        PreferencePair((Message(U, "Say hi."),), (Message(A, "Hi."),), (Message(A, "No."),)),
    ),
    (
        "messages_kto",
        {"messages": msgs((U, "Hi"), (A, "Hello!")), "label": True},
        KTOExample((Message(U, "Hi"),), (Message(A, "Hello!"),), True),
    ),
    (
        "sharegpt_kto",
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Go away."}], "kto_tag": False},
        KTOExample((Message(U, "Hi"),), (Message(A, "Go away."),), False),
    ),
]


@pytest.mark.parametrize(("fmt", "row", "expected"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_each_format_is_detected_and_normalised(tmp_path: Path, fmt: str, row: dict, expected) -> None:
    data = load_records(write_jsonl(tmp_path / "d.jsonl", [row, row]))
    assert data.format == fmt
    assert data.records == [expected, expected]
    assert load_records(tmp_path / "d.jsonl", data_format=fmt).records == [expected, expected]


def test_every_format_has_a_detection_case() -> None:
    assert {case[0] for case in CASES} == set(FORMATS)


def test_kinds_follow_the_records(tmp_path: Path) -> None:
    kinds = {fmt: load_records(write_jsonl(tmp_path / f"{fmt}.jsonl", [row])).kind for fmt, row, _ in CASES}
    assert kinds == {
        "messages": "sft",
        "sharegpt": "sft",
        "alpaca": "sft",
        "prompt_completion": "sft",
        "text": "sft",
        "classification": "classification",
        "preference": "preference",
        "kto": "kto",
        "sharegpt_preference": "preference",
        "alpaca_preference": "preference",
        "messages_kto": "kto",
        "sharegpt_kto": "kto",
        "prompt": "prompt",
    }


def test_unread_columns_are_errors_unless_ignored_and_explicit_format_overrides_detection(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": 7, "text": "hello", "label": "x"}])
    with pytest.raises(
        DataError,
        match=r"d.jsonl: row 1: column 'id' is not read by the classification format .*"
        r"ignore_columns=id",
    ):
        load_records(path)
    assert load_records(path, ignore_columns=["id"]).format == "classification"
    with pytest.raises(DataError, match="column 'label' is not read by the text format .*did you mean stage=kto"):
        load_records(path, data_format="text", ignore_columns=["id"])
    assert load_records(path, data_format="text", ignore_columns=["id", "label"]).records == [TextExample("hello")]


def test_kto_labels_from_csv_strings(tmp_path: Path) -> None:
    path = tmp_path / "k.csv"
    path.write_text("prompt,completion,label\nHi,Hello,true\nHi,Go away,False\nHi,Yo,1\n", encoding="utf-8")
    assert [r.label for r in load_records(path).records] == [True, False, True]


ERRORS = [
    ({"prompt": "q", "completion": ""}, "row 2: column 'completion' is an empty completion"),
    ({"prompt": "q", "completion": "   "}, "row 2: column 'completion' is an empty completion"),
    ({"prompt": "q"}, "row 2: missing column 'completion'"),
    ({"prompt": 5, "completion": "a"}, "row 2: column 'prompt' must be a non-empty list of messages, got int 5"),
    ({"prompt": msgs((U, "q")), "completion": msgs((U, "a"))}, "row 2: column 'completion' holds a user message"),
    ({"prompt": msgs((U, "q"), (A, "a")), "completion": "b"}, "row 2: column 'prompt' must end with a user"),
]


@pytest.mark.parametrize(("bad", "message"), ERRORS, ids=[m for _, m in ERRORS])
def test_bad_rows_name_the_file_the_row_and_the_problem(tmp_path: Path, bad: dict, message: str) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "q", "completion": "a"}, bad])
    with pytest.raises(DataError) as info:
        load_records(path)
    assert str(info.value) == f"{path}: {message}" or str(info.value).startswith(f"{path}: {message}")
    assert "\n" not in str(info.value)


MESSAGE_ERRORS = [
    (msgs((U, "q"), ("bot", "a")), "'messages' message 2 has unknown role 'bot'; use one of system, user, assistant"),
    ([{"role": "user"}], "'messages' message 1 needs a 'content' string, got nothing"),
    ([{"role": "user", "content": 3}], "'messages' message 1 needs a 'content' string, got int 3"),
    (["hi"], "'messages' message 1 must be an object with 'role' and 'content', got str"),
    (msgs((U, "q")), "'messages' has no assistant message to train on"),
    (msgs((U, "q"), (A, "")), "'messages' message 2: empty completion"),
    (msgs((U, "q"), (S, "s"), (A, "a")), "'messages' message 2: a system message must come first"),
    ("hello", "column 'messages' must be a non-empty list of messages, got str"),
    ([], "column 'messages' must be a non-empty list of messages, got list"),
]


@pytest.mark.parametrize(("messages", "message"), MESSAGE_ERRORS, ids=[m for _, m in MESSAGE_ERRORS])
def test_bad_messages_are_reported_with_their_position(tmp_path: Path, messages, message: str) -> None:
    good = {"messages": msgs((U, "q"), (A, "a"))}
    path = write_jsonl(tmp_path / "chat.jsonl", [good, good, {"messages": messages}])
    with pytest.raises(DataError, match="^" + __import__("re").escape(f"{path}: row 3: {message}")):
        load_records(path)


OTHER_ERRORS = [
    (
        [{"conversations": [{"from": "robot", "value": "x"}]}],
        "row 1: 'conversations' message 1 has unknown role 'robot'",
    ),
    ([{"instruction": "i", "output": ""}], "row 1: column 'output' is an empty completion"),
    ([{"instruction": "i", "output": "o", "history": [["q"]]}], "row 1: column 'history' must be a list of"),
    ([{"instruction": 1, "output": "o"}], "row 1: column 'instruction' must be a string, got int"),
    (
        [{"prompt": "p", "completion": "c", "label": "maybe"}],
        "row 1: column 'label' must be true or false, got str 'maybe'",
    ),
    (
        [{"chosen": "a", "rejected": "b"}],
        "row 1: missing column 'prompt' (needed when chosen and rejected are strings)",
    ),
    (
        [{"chosen": msgs((U, "q"), (A, "a")), "rejected": msgs((U, "other"), (A, "b"))}],
        "row 1: chosen and rejected share no prompt",
    ),
    (
        [{"chosen": msgs((U, "q"), (A, "a")), "rejected": msgs((U, "q"), (A, "a"))}],
        "row 1: chosen and rejected are the same completion",
    ),
    ([{"text": ""}], "row 1: column 'text' is empty"),
    ([{"text": "t", "label": None}], "row 1: missing column 'label'"),
    ([{"question": "q", "answer": "a"}], "cannot tell the data format from the columns ['answer', 'question']"),
]


@pytest.mark.parametrize(("rows", "message"), OTHER_ERRORS, ids=[m for _, m in OTHER_ERRORS])
def test_other_format_errors(tmp_path: Path, rows: list, message: str) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError) as info:
        load_records(path)
    assert str(info.value).startswith(f"{path}: {message}"), str(info.value)


def test_unknown_explicit_format(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "x"}])
    with pytest.raises(DataError, match="data_format='chatml' is unknown; use auto or one of sharegpt_preference, "):
        load_records(path, data_format="chatml")
