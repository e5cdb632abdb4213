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
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import ConfigError

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
_INFORMATIONAL_KEYS = frozenset({"peft_version", "auto_mapping", "megatron_core", "qalora_group_size"})


@dataclass
class DeltaConfig:
    """Fields shared by every method (peft's ``PeftConfig``)."""

    peft_type: ClassVar[str] = ""

    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False

    def __post_init__(self) -> None:
        _check_bool("inference_mode", self.inference_mode)
        if self.task_type is not None:
            self.task_type = str(self.task_type).upper()
            if self.task_type not in TASK_TYPES:
                raise ConfigError(
                    f"task_type={self.task_type!r} is unknown; use one of {', '.join(TASK_TYPES)} or None"
                )

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready dict peft writes: every field plus ``peft_type``."""
        data = {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
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
        config_cls = config_class_for(peft_type) if cls is DeltaConfig else cls
        if peft_type != config_cls.peft_type:
            raise ConfigError(f"adapter config has peft_type={peft_type!r}, expected {config_cls.peft_type!r}")
        known = {f.name for f in dataclasses.fields(config_cls)}
        kwargs = {key: value for key, value in data.items() if key in known}
        for key, value in data.items():
            if key in known or key in _INFORMATIONAL_KEYS or value in (None, False, {}, [], ""):
                continue
            raise ConfigError(
                f"adapter config sets {key}={value!r}, a peft feature deltatune does not support; "
                f"remove the key or use peft for this adapter"
            )
        return config_cls(**kwargs)

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


@dataclass
class LoraConfig(DeltaConfig):
    """LoRA (Hu et al., 2021): ``W = W0 + (alpha / r) * B @ A``, A: [r, in], B: [out, r], B = 0 at start.

    Args:
        r: rank of the update; the paper finds r in 1..8 often enough for attention weights.
        lora_alpha: scale numerator; the update is multiplied by ``lora_alpha / r``
            (``lora_alpha / sqrt(r)`` with ``use_rslora``), so changing r keeps the step size.
        lora_dropout: dropout probability on the adapter's input path only.
        target_modules: module names (exact full name or "."-suffix), a regex string fullmatched
            against the full module name, or ``"all-linear"``; None picks per-architecture defaults.
        exclude_modules: same matching rules as ``target_modules``, removed from the targets.
        bias: "none", "all" (train every bias of the model) or "lora_only" (biases of adapted layers).
        fan_in_fan_out: the base weight is stored [in, out] (GPT-2 ``Conv1D``); set automatically.
        modules_to_save: extra modules trained in full and saved with the adapter (e.g. a new head).
        init_lora_weights: True (Kaiming-uniform A, zero B), "gaussian" (normal A, std 1/r) or False
            (random A and B: the model changes at once; for tests).
        use_rslora: rank-stabilised scaling ``alpha / sqrt(r)``.
        layers_to_transform: adapt only these layer indices.
        layers_pattern: name of the layer list (e.g. "layers", "h") used to find the layer index.
        rank_pattern / alpha_pattern: per-module overrides, keys are regexes matched as suffixes.
    """

    peft_type: ClassVar[str] = "LORA"

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    bias: str = "none"
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    use_rslora: bool = False
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive_int("r", self.r)
        _check_positive_number("lora_alpha", self.lora_alpha)
        _check_bool("fan_in_fan_out", self.fan_in_fan_out)
        _check_bool("use_rslora", self.use_rslora)
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout={self.lora_dropout!r} must be a number in [0, 1)")
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"bias={self.bias!r} is unknown; use 'none', 'all' or 'lora_only'")
        if isinstance(self.init_lora_weights, str) and self.init_lora_weights.lower() == "gaussian":
            self.init_lora_weights = "gaussian"
        elif not isinstance(self.init_lora_weights, bool):
            raise ConfigError(
                f"init_lora_weights={self.init_lora_weights!r} is not supported; use True, False or 'gaussian'"
            )
        self.target_modules = _module_names("target_modules", self.target_modules)
        self.exclude_modules = _module_names("exclude_modules", self.exclude_modules)
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str) or not all(isinstance(m, str) and m for m in self.modules_to_save):
                raise ConfigError(f"modules_to_save={self.modules_to_save!r} must be a list of module names")
            self.modules_to_save = list(self.modules_to_save)
        self.layers_to_transform = _layer_indices(self.layers_to_transform)
        if self.layers_to_transform is not None and isinstance(self.target_modules, str):
            raise ConfigError("layers_to_transform cannot be used with a regex target_modules; put the layers in the regex")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("layers_pattern is only used with layers_to_transform; set both or neither")
        for key, value in self.rank_pattern.items():
            _check_regex("rank_pattern key", key)
            _check_positive_int(f"rank_pattern[{key!r}]", value)
        for key, value in self.alpha_pattern.items():
            _check_regex("alpha_pattern key", key)
            _check_positive_number(f"alpha_pattern[{key!r}]", value)

    def scaling(self, rank: int, alpha: float) -> float:
        """The factor in front of B @ A: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


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


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name}={value!r} must be a positive integer")


def _check_positive_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ConfigError(f"{name}={value!r} must be a positive finite number")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name}={value!r} must be true or false")


def _check_regex(name: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except (re.error, TypeError) as exc:
        raise ConfigError(f"{name} {pattern!r} is not a valid regex ({exc})") from None


def _module_names(name: str, value: Any) -> list[str] | str | None:
    """Normalise a target spec: None, a regex/"all-linear" string, or a sorted list of names."""
    if value is None:
        return value
    if isinstance(value, str):
        _check_regex(name, value)
        return value
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(item, str) and item for item in value):
        return sorted(set(value))
    raise ConfigError(f"{name}={value!r} must be a list of module names or a regex string")


def _layer_indices(value: Any) -> list[int] | int | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
        return list(value)
    raise ConfigError(f"layers_to_transform={value!r} must be a non-negative int or a list of them")
