"""Reading ``deltatune train``'s values: a YAML config file, ``key=value`` overrides, and each value in
its key's type, with one-line ``ConfigError``s (torch-free, like ``config``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from deltatune.errors import ConfigError

# How a wrong value's expected type is said: "max_steps=2.5 must be an integer".
_KIND_WORDS = {int: "an integer", float: "a number", str: "text"}


def override_value(item: str, raw: str, text: bool) -> Any:
    """The value of the override ``item``: ``raw`` parsed as a YAML scalar (safe loading: tags never run).
    A ``text`` key keeps ``raw`` as written unless it parses to a string (``'a b'`` -> ``a b``)."""
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        if text:
            return raw
        raise ConfigError(f"override {item!r} is not a valid YAML value; quote it, e.g. key='text'") from None
    return raw if text and not isinstance(value, str) else value


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must be a mapping of key: value, got {type(data).__name__}")
    return data


def coerce(key: str, value: Any, kind: type) -> Any:
    if kind is str and isinstance(value, list):
        return ",".join(str(item) for item in value)
    if kind is str and isinstance(value, dict):  # a YAML mapping (columns)
        return json.dumps(value)
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be true or false")
    fractional = kind is int and isinstance(value, float) and not value.is_integer()
    try:
        if isinstance(value, bool) or fractional or value is None:
            raise TypeError
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r} must be {_KIND_WORDS.get(kind, kind.__name__)}") from None
