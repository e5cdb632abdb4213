"""The training system prompt travels with the adapter (``chat_defaults``); what a run says about its data
and its resume; Ctrl-C in ``chat`` (one answer) and in ``train`` (how to resume)."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import pytest

from deltatune.cli import chat
from deltatune.cli.generate import system_prompt
from deltatune.cli.main import main
from deltatune.data import Conversation, KTOExample, Message, TextExample
from deltatune.data.chat_defaults import (
    FILE,
    common_system,
    stored_system,
    write_chat_defaults,
)
from deltatune.errors import ConfigError
from deltatune.train.config import TrainConfig
from deltatune.train.run import run_training
from sft_helpers import TINY_RUN, save_tiny_chat_model

TUTOR = "You are a maths tutor."


def conversation(system: str | None, n: int = 0) -> Conversation:
    opening = (Message("system", system),) if system else ()
    return Conversation((*opening, Message("user", f"What is {n} plus {n}?"), Message("assistant", f"It is {2 * n}.")))


def test_the_most_common_system_prompt_is_chosen_and_the_others_are_counted() -> None:
    assert common_system([conversation(TUTOR)] * 3) == (TUTOR, f"system prompt {TUTOR!r} (in 3 of 3 training rows)")
    system, line = common_system([conversation(TUTOR)] * 3 + [conversation("Be brief."), conversation(None)])
    assert system == TUTOR
    assert (
        line
        == f"system prompt {TUTOR!r} (in 3 of 5 training rows; the most common of 2 different ones; 1 rows have none)"
    )
    prompts = [
        KTOExample((Message("system", "Be kind."), Message("user", "Hi")), (Message("assistant", "Hello"),), True)
    ]
    assert common_system(prompts)[0] == "Be kind."


def test_no_default_when_most_rows_have_no_system_prompt() -> None:
    assert common_system([conversation(None), TextExample("plain text")]) == (None, None)
    system, line = common_system([conversation(None)] * 2 + [conversation(TUTOR)])
    assert system is None and line.startswith("no chat default stored: 2 of 3 training rows have no system prompt")


def test_the_file_is_written_beside_the_adapter_and_a_stale_one_removed(tmp_path: Path) -> None:
    line = write_chat_defaults(tmp_path, [conversation(TUTOR)])
    assert line.endswith(f"saved as the chat default in {tmp_path / FILE}")
    assert json.loads((tmp_path / FILE).read_text()) == {"system": TUTOR}
    assert stored_system(tmp_path) == TUTOR
    assert write_chat_defaults(tmp_path, [conversation(None)]) is None
    assert not (tmp_path / FILE).exists() and stored_system(tmp_path) is None


def test_a_broken_file_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / FILE).write_text('["not a mapping"]')
    with pytest.raises(ConfigError, match=f"{FILE} is not valid .*; fix or delete it$"):
        stored_system(tmp_path)


def args(**values) -> argparse.Namespace:
    return argparse.Namespace(**{"system": None, "adapter": None, "model": None, **values})


def test_generate_uses_the_stored_prompt_unless_system_is_given(tmp_path: Path, capsys) -> None:
    write_chat_defaults(tmp_path, [conversation(TUTOR)])
    assert system_prompt(args(adapter=str(tmp_path))) == TUTOR
    assert f"system prompt from {tmp_path}/{FILE}: {TUTOR!r}" in capsys.readouterr().err
    assert system_prompt(args(model=str(tmp_path))) == TUTOR  # a merged model keeps it
    assert system_prompt(args(adapter=str(tmp_path), system="Be brief.")) == "Be brief."
    assert system_prompt(args(adapter=str(tmp_path), system="")) is None
    assert system_prompt(args(model="smollm2")) is None


def fake_stdin(monkeypatch: pytest.MonkeyPatch, *lines: str) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(line + "\n" for line in lines)))


def test_ctrl_c_during_an_answer_drops_that_exchange_only(monkeypatch, capsys) -> None:
    seen: list[list[str]] = []

    def reply(messages: list[Message]) -> str:
        seen.append([m.content for m in messages])
        if messages[-1].content == "slow":
            raise KeyboardInterrupt
        return f"re: {messages[-1].content}"

    fake_stdin(monkeypatch, "first", "slow", "second", "/exit")
    assert chat.converse(reply, TUTOR, interactive=False) == 0
    out, err = capsys.readouterr()
    assert out == "re: first\nre: second\n"
    assert "(answer stopped; the question is left out of the conversation)" in err
    assert seen[-1] == [TUTOR, "first", "re: first", "second"]


def test_ctrl_c_at_the_prompt_ends_the_chat(monkeypatch, capsys) -> None:
    def interrupted(prompt: str = "") -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr("builtins.input", interrupted)
    assert chat.converse(lambda messages: "never", None, interactive=True) == 0
    assert capsys.readouterr().out == ""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A one-step run (checkpoint at step 1) on rows most of which carry the tutor's system prompt."""
    root = tmp_path_factory.mktemp("defaults")
    rows = [
        {"messages": [m.as_dict() for m in conversation(TUTOR if n % 5 else "Be brief.", n).messages]}
        for n in range(30)
    ]
    data = root / "system.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    files = {"root": root, "model": save_tiny_chat_model(root / "model"), "data": data}
    files["log"] = train(files, "first", max_steps=1, save_steps=1)
    return files


def train(files: dict[str, Path], output: str, **keys) -> list[str]:
    lines: list[str] = []
    values = {
        **TINY_RUN,
        "model": str(files["model"]),
        "data": str(files["data"]),
        "output_dir": str(files["root"] / output),
    }
    run_training(TrainConfig.from_dict({**values, **keys}), log=lines.append)
    return lines


def test_a_run_names_the_data_format_and_stores_the_system_prompt(tiny) -> None:
    adapter = tiny["root"] / "first" / "adapter"
    assert f"data: {tiny['data']} — format messages, 30 rows" in tiny["log"]
    assert json.loads((adapter / FILE).read_text()) == {"system": TUTOR}
    assert any(
        line.startswith(f"system prompt {TUTOR!r} (in ") and "the most common of 2 different ones" in line
        for line in tiny["log"]
    )


def test_a_resumed_run_says_where_it_continues(tiny) -> None:
    checkpoint = tiny["root"] / "first" / "checkpoints" / "checkpoint-1"
    log = train(tiny, "resumed", max_steps=2, resume_from_checkpoint=str(checkpoint))
    assert f"resuming from {checkpoint} (step 1)" in log


def test_an_interrupted_train_says_how_to_resume(tiny, monkeypatch, capsys) -> None:
    def interrupted(config, log=print, callbacks=()):
        raise KeyboardInterrupt

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr("deltatune.train.run.run_training", interrupted)
    first = tiny["root"] / "first"
    assert main(["train", f"output_dir={first}", "max_steps=3", "resume_from_checkpoint=x"]) == 130
    err = capsys.readouterr().err
    assert err == (
        f"deltatune train: interrupted; continue from {first / 'checkpoints' / 'checkpoint-1'} (step 1) with: "
        f"deltatune train output_dir={first} max_steps=3 resume_from_checkpoint=last\n"
    )
    assert main(["train", f"output_dir={tiny['root'] / 'new'}"]) == 130
    assert "interrupted; no checkpoint was written to " in capsys.readouterr().err


def test_generate_sends_the_stored_prompt_to_the_model(tiny, monkeypatch, capsys) -> None:
    sent: list[list[Message]] = []

    def answer(model, tokenizer, messages: list[Message], *args, **sampling) -> str:
        sent.append(messages)
        return "ok"

    monkeypatch.setattr("deltatune.train.evaluate.answer", answer)
    adapter = str(tiny["root"] / "first" / "adapter")
    assert main(["generate", "--adapter", adapter, "Hi"]) == 0
    assert main(["generate", "--adapter", adapter, "--system", "", "Hi"]) == 0
    assert sent == [[Message("system", TUTOR), Message("user", "Hi")], [Message("user", "Hi")]]
    assert capsys.readouterr().out == "ok\nok\n"


def test_a_merged_model_keeps_the_prompt(tiny, capsys) -> None:
    merged = tiny["root"] / "merged"
    assert main(["merge", str(tiny["root"] / "first" / "adapter"), str(merged)]) == 0
    assert stored_system(merged) == TUTOR
