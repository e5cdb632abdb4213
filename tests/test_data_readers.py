"""Readers for every file type and for local ``datasets`` objects, with row numbers and read errors."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deltatune.data import BUILTIN, Conversation, DataError, Message, load_records
from deltatune.data.readers import read_table

ROWS = [
    {"prompt": "What is AI?", "completion": "Machines that think."},
    {"prompt": "Who are you?", "completion": "A bot."},
    {"prompt": "1984?", "completion": "A novel, 1949."},
]
EXPECTED = [Conversation((Message("user", r["prompt"]), Message("assistant", r["completion"]))) for r in ROWS]


def write(path: Path) -> Path:
    """``ROWS`` in the file type named by ``path``'s suffix."""
    if path.suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(row) for row in ROWS) + "\n", encoding="utf-8")
    elif path.suffix == ".json":
        path.write_text(json.dumps(ROWS, indent=1), encoding="utf-8")
    elif path.suffix in (".csv", ".tsv"):
        sep = "\t" if path.suffix == ".tsv" else ","
        lines = [sep.join(("prompt", "completion"))]
        lines += [sep.join(f'"{row[key]}"' for key in ("prompt", "completion")) for row in ROWS]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    elif path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(ROWS), path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".tsv", ".parquet"])
def test_every_file_type_reads_the_same_records(tmp_path: Path, suffix: str) -> None:
    data = load_records(write(tmp_path / f"train{suffix}"))
    assert (data.format, data.records, data.source) == ("prompt_completion", EXPECTED, str(tmp_path / f"train{suffix}"))


def test_csv_keeps_numbers_as_text(tmp_path: Path) -> None:
    """A CSV cell is the string written, so an answer like "1949" is not turned into a number."""
    path = tmp_path / "n.csv"
    path.write_text("prompt,completion\nYear?,1949\n", encoding="utf-8")
    assert load_records(path).records[0].messages[1].content == "1949"


def test_csv_quote_left_open_is_an_error_not_one_long_cell(tmp_path: Path) -> None:
    """Read loosely, an opened quote swallows every later line into one cell; strictly, it is named."""
    path = tmp_path / "q.csv"
    path.write_text('prompt,completion\nHi,"Hello\nBye,See you\n', encoding="utf-8")
    with pytest.raises(
        DataError,
        match=r"q\.csv: the row starting on line 2: unexpected end of data; a cell with quotes in it must be "
        r'quoted whole, its own quotes doubled \("say ""hi""\"\)',
    ):
        read_table(path)
    path.write_text('prompt,completion\nHi,"Hel"lo\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"row starting on line 2: ',' expected after '\"'"):
        read_table(path)
    path.write_text('prompt,completion\nHi,"say ""hi"""\n', encoding="utf-8")
    assert read_table(path).rows == [(1, {"prompt": "Hi", "completion": 'say "hi"'})]


def test_datasets_objects_and_saved_folders(tmp_path: Path) -> None:
    dataset = datasets.Dataset.from_list(ROWS)
    assert load_records(dataset).records == EXPECTED
    dataset.save_to_disk(str(tmp_path / "saved"))
    assert load_records(tmp_path / "saved").records == EXPECTED
    splits = datasets.DatasetDict({"train": dataset, "test": dataset.select([2])})
    splits.save_to_disk(str(tmp_path / "dict"))
    assert load_records(tmp_path / "dict").records == EXPECTED  # "train" by default
    assert load_records(f"{tmp_path / 'dict'}#test").records == EXPECTED[2:]
    assert load_records(splits, split="test").records == EXPECTED[2:]
    with pytest.raises(DataError, match=r"dict\[?.*: no split 'dev'; the dataset has train, test"):
        load_records(tmp_path / "dict", split="dev")


def test_jsonl_rows_are_numbered_by_line(tmp_path: Path) -> None:
    path = tmp_path / "gaps.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": ""}\n', encoding="utf-8")
    assert [number for number, _ in read_table(path).rows] == [1, 3, 4]
    with pytest.raises(DataError, match=f"^{path}: row 4: column 'text' is empty$"):
        load_records(path)


def test_json_lines_in_a_json_file(tmp_path: Path) -> None:
    path = tmp_path / "lines.json"
    path.write_text('{"text": "a"}\n{"text": "b"}\n', encoding="utf-8")
    assert len(load_records(path)) == 2


READ_ERRORS = [
    ("missing.jsonl", None, "data file {path} does not exist"),
    ("d.txt", "text", "{path}: unknown data file type '.txt'; use one of .jsonl, .json, .csv, .tsv, .parquet"),
    ("d.jsonl", '{"text": "a"}\n{"text": \n', "{path}: row 2: not valid JSON (Expecting value at column 10)"),
    ("d.jsonl", '{"text": "a"}\n["x"]\n', "{path}: row 2: expected a JSON object, got list"),
    ("d.jsonl", "\n\n", "{path}: no rows; the file holds no examples"),
    ("d.json", '{"text": ', "{path}: not valid JSON (Expecting value at line 1)"),
    ("d.json", '[{"text": "a"}, 3]', "{path}: row 2: expected a JSON object, got int"),
    ("d.json", '"text"', "{path}: expected a JSON array of objects, got str"),
    ("d.csv", "text\na\nb,c\n", "{path}: row 2: more cells than the 1 header columns"),
    ("d.csv", "text\n", "{path}: no rows; the file holds no examples"),
    ("d.parquet", "not parquet", "{path}: not a readable Parquet file"),
]


@pytest.mark.parametrize(("name", "content", "message"), READ_ERRORS, ids=[m for _, _, m in READ_ERRORS])
def test_read_errors_name_the_file(tmp_path: Path, name: str, content: str | None, message: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_records(path)
    assert str(info.value).startswith(message.format(path=path)), str(info.value)


def test_non_utf8_and_plain_folders_are_refused(tmp_path: Path) -> None:
    (tmp_path / "latin.jsonl").write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match="latin.jsonl: not UTF-8 text"):
        load_records(tmp_path / "latin.jsonl")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="is a folder but not one written by datasets' save_to_disk"):
        load_records(tmp_path / "folder")


def test_builtin_sources_and_their_formats() -> None:
    formats = {name: (data.format, data.kind) for name, data in ((name, load_records(name)) for name in BUILTIN)}
    assert formats == {
        "chatterbot": ("messages", "sft"),
        "chatterbot-topics": ("classification", "classification"),
        "chatterbot-preference-synthetic": ("preference", "preference"),
        "chatterbot-kto-synthetic": ("kto", "kto"),
        "units-synthetic": ("prompt", "prompt"),
        "units-preference-synthetic": ("preference", "preference"),
    }
    with pytest.raises(DataError, match="data='chatterbot' is built in, in the messages format"):
        load_records("chatterbot", data_format="text")


def test_the_generated_unit_task_has_exact_answers_and_distinct_prompts() -> None:
    data = load_records("units-synthetic")
    assert len(data) == 190 and len({record.prompt[-1].content for record in data.records}) == 190
    record = next(r for r in data.records if r.prompt[-1].content.startswith("How many minutes are in 7 hours?"))
    assert dict(record.columns) == {"solution": "420"} and record.text is None


def test_the_unit_preference_pairs_prefer_the_number_alone_as_asked() -> None:
    pairs = load_records("units-preference-synthetic").records
    prompts = [record.prompt[-1].content for record in load_records("units-synthetic").records]
    assert [pair.prompt[-1].content for pair in pairs] == prompts
    pair = next(p for p in pairs if p.prompt[-1].content.startswith("How many minutes are in 7 hours?"))
    assert (pair.chosen[0].content, pair.rejected[0].content) == ("420", "There are 420 minutes in 7 hours.")
