"""Adapter methods by name for ``deltatune train``: ``method=lora`` -> ``LoraConfig``.

Every method registered in ``deltatune.tuners`` is available, named after its ``peft_type`` in
lower case ("lora", "bottleneck", ...). Its hyper-parameters are the fields of its config class,
set as flat keys (``r=16 lora_alpha=32``); each config class's ``train_defaults`` holds the command line's
defaults where they differ from the class's (LoRA on every linear layer, as the quick start trains it), and
its ``run_defaults`` the run keys that suit the method (a prompt method's learning rate).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Mapping
from typing import Any, get_type_hints

from deltatune.config import DeltaConfig
from deltatune.errors import ConfigError
from deltatune.tuners import config_classes

# Fields every config has; the training run sets them, not the user.
_RUN_FIELDS = {f.name for f in dataclasses.fields(DeltaConfig)}
_REGEX_CHARS = re.compile(r"[*()\[\]|\\^$?+]")


def methods() -> dict[str, type[DeltaConfig]]:
    """Method name -> config class, for every registered tuner."""
    return {cls.peft_type.lower(): cls for cls in config_classes()}


def method_class(name: str) -> type[DeltaConfig]:
    """The config class of method ``name``; a ConfigError with a suggestion when it is unknown."""
    known = methods()
    key = name.lower().replace("-", "_")
    if key not in known:
        guess = difflib.get_close_matches(key, known, n=1)
        hint = f"did you mean {guess[0]!r}? " if guess else ""
        raise ConfigError(f"method={name!r} is unknown; {hint}methods: {', '.join(known)}")
    return known[key]


def option_defaults(name: str) -> dict[str, Any]:
    """The hyper-parameters of method ``name`` and their defaults on the command line."""
    cls = method_class(name)
    defaults = {
        f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        for f in dataclasses.fields(cls)
        if f.name not in _RUN_FIELDS
    }
    return {**defaults, **cls.train_defaults}


def methods_taking(key: str) -> list[str]:
    """The methods that have hyper-parameter ``key`` (e.g. "r" -> ["lora"])."""
    return [name for name in methods() if key in option_defaults(name)]


def build_config(name: str, options: Mapping[str, Any], task_type: str | None, base_model: str | None) -> DeltaConfig:
    """The validated config of method ``name`` with the CLI defaults, then ``options``, applied."""
    cls = method_class(name)
    defaults = option_defaults(name)
    unknown = [key for key in options if key not in defaults]
    if unknown:
        raise ConfigError(f"{unknown[0]!r} is not a hyper-parameter of method={name}; it takes {', '.join(defaults)}")
    hints = get_type_hints(cls)
    class_defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    values = {}
    for key, value in {**defaults, **options}.items():
        if value is None and class_defaults[key] is not None:
            raise ConfigError(f"{key}=None is not a value for method={name}; leave the key out to get its default")
        values[key] = _typed(str(hints[key]), value)
    return cls(**values, task_type=task_type, base_model_name_or_path=base_model)


def _typed(hint: str, value: Any) -> Any:
    """A command-line string in the field's type: "1e-4" -> 1e-4 for a float field (YAML 1.1 reads
    exponents without a dot as strings); "q_proj,v_proj" -> ["q_proj", "v_proj"] for a list of
    names, where a regex or "all-linear" stays a string if the field accepts one."""
    if not isinstance(value, str):
        return value
    if "float" in hint and "str" not in hint:
        try:
            return float(value)
        except ValueError:
            return value  # the config class names the problem
    if "list[str]" not in hint:
        return value
    accepts_str = re.search(r"\|\s*str\b|\bstr\s*\|", hint) is not None
    if accepts_str and (value.strip() == "all-linear" or _REGEX_CHARS.search(value)):
        return value.strip()
    return [name.strip() for name in value.split(",") if name.strip()]
