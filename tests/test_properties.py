"""Property-based tests (hypothesis) of the parsers that see user input: the training config's keys and
values, and the data format detector and row normaliser. Whatever the input, the answer is a value
or the documented one-line error type, never a crash with another exception."""

from __future__ import annotations

import math
import string

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.trainer_utils import SchedulerType

from deltatune.data import FORMATS, detect_format
from deltatune.data.formats import normalise
from deltatune.data.readers import Table
from deltatune.errors import ConfigError, DataError
from deltatune.train.config import PRECISIONS, TrainConfig
from deltatune.train.methods import option_defaults

RUN_KEYS = TrainConfig.keys()
LORA_KEYS = list(option_defaults("lora"))
SCHEDULERS = [s.value for s in SchedulerType if s.value != "reduce_lr_on_plateau"]

# A folder or file name as people type it, where YAML reads it as that string (values are YAML scalars).
path_text = st.text(alphabet=string.ascii_letters + string.digits + "/._-", min_size=1, max_size=20).filter(
    lambda text: isinstance(yaml.safe_load(text), str) and yaml.safe_load(text) == text
)
positive_float = st.floats(min_value=1e-8, max_value=1e3, allow_nan=False, allow_infinity=False)
fraction = st.floats(min_value=1e-3, max_value=0.999)

VALID_RUN_VALUES = {
    "data": path_text,
    "output_dir": path_text,
    "learning_rate": positive_float,
    "batch_size": st.integers(1, 4096),
    "gradient_accumulation_steps": st.integers(1, 256),
    "max_length": st.integers(1, 1 << 16),
    "max_steps": st.integers(1, 10**7),
    "warmup_steps": st.integers(0, 10**4),
    "weight_decay": st.floats(min_value=0.0, max_value=1.0),
    "eval_fraction": fraction,
    "eval_examples": st.integers(1, 10**4),
    "save_steps": st.integers(0, 10**4),
    "save_total_limit": st.integers(0, 100),
    "logging_steps": st.integers(0, 10**4),
    "train_on_prompt": st.booleans(),
    "gradient_checkpointing": st.booleans(),
    "precision": st.sampled_from(PRECISIONS),
    "lr_scheduler": st.sampled_from(SCHEDULERS),
    "beta": positive_float,
    "seed": st.integers(0, 2**32),
}
VALID_LORA_VALUES = {
    "r": st.integers(1, 1024),
    "lora_alpha": st.integers(1, 4096) | positive_float,
    "lora_dropout": st.floats(min_value=0.0, max_value=0.99),
    "use_rslora": st.booleans(),
}


def _text(value) -> str:
    """How a user writes ``value`` after ``key=`` on the command line (floats as Python prints them: 1e-05)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


@settings(max_examples=150, deadline=None)
@given(
    st.dictionaries(st.sampled_from(sorted(VALID_RUN_VALUES)), st.just(None), max_size=8).flatmap(
        lambda keys: st.fixed_dictionaries({key: VALID_RUN_VALUES[key] for key in keys})
    ),
    st.dictionaries(st.sampled_from(sorted(VALID_LORA_VALUES)), st.just(None), max_size=4).flatmap(
        lambda keys: st.fixed_dictionaries({key: VALID_LORA_VALUES[key] for key in keys})
    ),
)
def test_valid_key_value_overrides_round_trip(run: dict, lora: dict) -> None:
    overrides = [f"{key}={_text(value)}" for key, value in {**run, **lora}.items()]
    parsed = TrainConfig.from_sources(None, overrides)
    for key, value in run.items():
        assert getattr(parsed, key) == value, key
    method = parsed.delta_config()
    for key, value in lora.items():
        assert getattr(method, key) == value, key
    direct = TrainConfig.from_dict({**run, **lora})  # what a YAML file with these values gives
    assert {key: getattr(parsed, key) for key in RUN_KEYS} == {key: getattr(direct, key) for key in RUN_KEYS}
    assert method == direct.delta_config()


unknown_key = st.text(alphabet=string.ascii_lowercase + string.digits + "_-.", min_size=1, max_size=24).filter(
    lambda key: key not in RUN_KEYS and key not in LORA_KEYS
)


@settings(max_examples=200, deadline=None)
@given(unknown_key, st.sampled_from(["1", "true", "x", "[1, 2]", ""]))
def test_an_unknown_key_is_a_config_error_naming_it(key: str, raw: str) -> None:
    for parse in (lambda: TrainConfig.from_sources(None, [f"{key}={raw}"]), lambda: TrainConfig.from_dict({key: raw})):
        try:
            parse()
        except ConfigError as exc:
            message = str(exc)
        else:
            raise AssertionError(f"{key!r} was accepted")
        assert message.startswith(f"unknown config key {key!r}; ")
        assert "did you mean '" in message or "`deltatune train --help` lists the keys" in message
        guess = message.partition("did you mean '")[2].partition("'")[0]
        assert not guess or guess in RUN_KEYS or guess in LORA_KEYS


def test_a_near_miss_gets_the_key_it_misses() -> None:
    for typo, key in (("learning_rat", "learning_rate"), ("lora_alhpa", "lora_alpha"), ("batchsize", "batch_size")):
        try:
            TrainConfig.from_dict({typo: 1})
        except ConfigError as exc:
            assert f"did you mean {key!r}?" in str(exc)
        else:
            raise AssertionError(typo)


yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([key for key in RUN_KEYS if key not in ("method", "stage")] + LORA_KEYS), yaml_values)
def test_any_value_for_a_known_key_is_accepted_or_a_config_error(key: str, value) -> None:
    """What a YAML file can hold (None, NaN, lists, mappings, ...) for any key: a config, or one ConfigError line."""
    try:
        config = TrainConfig.from_dict({key: value})
    except ConfigError as exc:
        assert "\n" not in str(exc)
        return
    if key in RUN_KEYS and isinstance(getattr(config, key), float):
        assert not math.isnan(getattr(config, key)), f"{key}=NaN was accepted"


# -- data format detection -----------------------------------------------------------------------

KNOWN_COLUMNS = sorted({column for fmt in FORMATS.values() for column in fmt.required} | {"input", "system", "history"})
column_names = st.sets(
    st.sampled_from(KNOWN_COLUMNS) | st.text(alphabet=string.ascii_lowercase + "_", max_size=8), max_size=8
)


@settings(max_examples=300, deadline=None)
@given(column_names)
def test_detection_picks_the_first_format_whose_columns_are_there(columns: set[str]) -> None:
    table = Table("train.jsonl", [(1, {column: "x" for column in columns})])
    fitting = [fmt.name for fmt in FORMATS.values() if fmt.matches(columns)]  # "a|b": either column
    if fitting:
        assert detect_format(table) == fitting[0]
        return
    try:
        detect_format(table)
    except DataError as exc:
        assert str(exc).startswith(f"train.jsonl: cannot tell the data format from the columns {sorted(columns)}")
    else:
        raise AssertionError("a table no format fits was given a format")


message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "assistant", "system", "tool"]) | st.text(max_size=4),
        "content": st.text(max_size=6) | yaml_values,
    },
) | st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt", "system", "x"]), "value": st.text(max_size=6)})
cell = st.text(max_size=8) | yaml_values | st.lists(message, max_size=4)
rows = st.lists(st.dictionaries(st.sampled_from(KNOWN_COLUMNS), cell, min_size=1, max_size=5), min_size=1, max_size=3)


@settings(max_examples=400, deadline=None)
@given(rows, st.sampled_from(["auto", *FORMATS]))
def test_any_rows_give_records_or_a_data_error_naming_the_source(table_rows: list[dict], data_format: str) -> None:
    table = Table("train.jsonl", list(enumerate(table_rows, start=1)))
    try:
        name, records = normalise(table, data_format)
    except DataError as exc:
        assert str(exc).startswith("train.jsonl: ") and "\n" not in str(exc)
        return
    assert name in FORMATS and len(records) == len(table_rows)
