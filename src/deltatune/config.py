"""Adapter configurations: dataclasses with peft's field names, validated at construction.

A config is pure data. It round-trips through ``adapter_config.json`` in peft's layout
(indent 2, sorted keys, only keys peft knows), so files written here load in peft and vLLM,
and files written by peft load here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from deltatune.errors import ConfigError

CONFIG_NAME = "adapter_config.json"

TASK_TYPES = (
    "CAUSAL_LM",
    "SEQ_CLS",
    "SEQ_2_SEQ_LM",
    "TOKEN_CLS",
    "QUESTION_ANS",
    "FEATURE_EXTRACTION",
)

# Keys peft writes for its own bookkeeping; they carry no meaning for the adapter itself.
_INFORMATIONAL_KEYS = frozenset({"peft_version", "auto_mapping"})


@dataclass
class DeltaConfig:
    """Fields shared by every method (peft's ``PeftConfig``)."""

    peft_type: ClassVar[str] = ""
    # What ``deltatune train method=<peft_type lower case>`` uses where it differs from the class's (peft's)
    # defaults: the method's hyper-parameters, and the run's keys (learning rate, warm-up) that suit it; both
    # measured on the embedded model (docs/methods.md). The family's config module is their one home.
    train_defaults: ClassVar[dict[str, Any]] = {}
    run_defaults: ClassVar[dict[str, Any]] = {}

    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False

    def __post_init__(self) -> None:
        check_bool("inference_mode", self.inference_mode)
        if self.task_type is not None:
            self.task_type = str(self.task_type).upper()
            if self.task_type not in TASK_TYPES:
                raise ConfigError(
                    f"task_type={self.task_type!r} is unknown; use one of {', '.join(TASK_TYPES)} or None"
                )

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready dict peft writes: every field plus ``peft_type``."""
        data = {f.name: jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        data["peft_type"] = self.peft_type
        return data

    def save(self, directory: str | os.PathLike) -> None:
        """Write ``adapter_config.json`` into ``directory`` (which must exist)."""
        with open(os.path.join(directory, CONFIG_NAME), "w", encoding="utf-8") as handle:
            handle.write(self.to_json())

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeltaConfig:
        """Build the config a dict describes, accepting peft's extra keys when they are unset.

        peft writes dozens of keys for features deltatune does not have (``use_dora``,
        ``loftq_config``, ...). A key left at its neutral value (None, False, {}, [], "") is
        ignored; a key that turns an unsupported feature on is an error, never silently dropped.
        """
        data = dict(data)
        peft_type = data.pop("peft_type", cls.peft_type)
        if cls is DeltaConfig:  # the method's own class reads it (it may check the file's own keys first)
            return config_class_for(peft_type).from_dict({**data, "peft_type": peft_type})
        if peft_type != cls.peft_type:
            raise ConfigError(f"adapter config has peft_type={peft_type!r}, expected {cls.peft_type!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {key: value for key, value in data.items() if key in known}
        for key, value in data.items():
            if key in known or key in _INFORMATIONAL_KEYS or value in (None, False, {}, [], ""):
                continue
            raise ConfigError(
                f"adapter config sets {key}={value!r}, a peft feature deltatune does not support; "
                f"remove the key or use peft for this adapter"
            )
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> DeltaConfig:
        """Read ``adapter_config.json`` from ``directory``."""
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise ConfigError(f"no {CONFIG_NAME} in {directory}; is this an adapter directory?")
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a JSON object, got {type(data).__name__}")
        return cls.from_dict(data)


def config_class_for(peft_type: str) -> type[DeltaConfig]:
    """The config class for a ``peft_type`` string read from a file."""
    classes = {cls.peft_type: cls for cls in _config_classes()}
    if peft_type not in classes:
        raise ConfigError(
            f"peft_type={peft_type!r} is not supported by deltatune; supported: {', '.join(sorted(classes))}"
        )
    return classes[peft_type]


def _config_classes() -> list[type[DeltaConfig]]:
    found, pending = [], list(DeltaConfig.__subclasses__())
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return [cls for cls in found if cls.peft_type]


def jsonable(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name}={value!r} must be a positive integer")


def check_positive_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ConfigError(f"{name}={value!r} must be a positive finite number")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name}={value!r} must be true or false")


def check_probability(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ConfigError(f"{name}={value!r} must be a number in [0, 1)")


def choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """The entry of ``choices`` that ``value`` spells, ignoring case; a ConfigError listing them otherwise."""
    spelled = {choice.lower(): choice for choice in choices}
    if isinstance(value, str) and value.lower() in spelled:
        return spelled[value.lower()]
    raise ConfigError(f"{name}={value!r} is unknown; use one of {', '.join(choices)}")


def modules_to_save_names(value: Any) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(m, str) and m for m in value):
        raise ConfigError(f"modules_to_save={value!r} must be a list of module names")
    return list(value)


def check_regex(name: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except (re.error, TypeError) as exc:
        raise ConfigError(f"{name} {pattern!r} is not a valid regex ({exc})") from None


def module_names(name: str, value: Any) -> list[str] | str | None:
    """Normalise a target spec: None, a regex/"all-linear" string, or a sorted list of names."""
    if value is None:
        return value
    if isinstance(value, str):
        check_regex(name, value)
        return value
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(item, str) and item for item in value):
        return sorted(set(value))
    raise ConfigError(f"{name}={value!r} must be a list of module names or a regex string")


def pattern_dict(name: str, value: Any) -> dict[str, Any]:
    """A per-module override mapping (regex -> value); None, as some files write it, is an empty one."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{name}={value!r} must be a mapping of module regex -> value")
    return dict(value)


def layer_indices(value: Any) -> list[int] | int | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    if isinstance(value, (list, tuple)) and all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value
    ):
        return list(value)
    raise ConfigError(f"layers_to_transform={value!r} must be a non-negative int or a list of them")


def check_layer_choice(config: Any, refuse_regex_targets: bool = True) -> None:
    """Normalise ``config.layers_to_transform`` and check it with ``layers_pattern`` (after ``target_modules`` is
    normalised): ``layers_pattern`` only with ``layers_to_transform`` (as peft), and, with
    ``refuse_regex_targets``, no ``layers_to_transform`` with a regex ``target_modules`` (deltatune's rule:
    the layers belong in the regex)."""
    config.layers_to_transform = layer_indices(config.layers_to_transform)
    if refuse_regex_targets and config.layers_to_transform is not None and isinstance(config.target_modules, str):
        raise ConfigError("layers_to_transform cannot be used with a regex target_modules; put the layers in the regex")
    if config.layers_pattern and config.layers_to_transform is None:
        raise ConfigError("layers_pattern is only used with layers_to_transform; set both or neither")


def check_rank_alpha_patterns(config: Any, check_alpha: Callable[[str, Any], None] = check_positive_number) -> None:
    """Normalise and check ``config.rank_pattern`` (module regex -> positive int rank) and
    ``config.alpha_pattern`` (module regex -> an alpha that ``check_alpha`` accepts)."""
    config.rank_pattern = pattern_dict("rank_pattern", config.rank_pattern)
    config.alpha_pattern = pattern_dict("alpha_pattern", config.alpha_pattern)
    for key, value in config.rank_pattern.items():
        check_regex("rank_pattern key", key)
        check_positive_int(f"rank_pattern[{key!r}]", value)
    for key, value in config.alpha_pattern.items():
        check_regex("alpha_pattern key", key)
        check_alpha(f"alpha_pattern[{key!r}]", value)


def without_defaults(config: DeltaConfig, data: dict[str, Any], names: frozenset[str]) -> dict[str, Any]:
    """``data`` (``config.to_dict()``) without the fields in ``names`` that are at their default."""
    for f in dataclasses.fields(config):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if f.name in names and data[f.name] == jsonable(default):
            del data[f.name]
    return data
