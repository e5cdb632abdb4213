"""``TrainConfig``: the flat, documented keys of ``deltatune train``, parsed from YAML and key=value."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from ..errors import ConfigError

EMBEDDED_MODEL = "smollm2"
EMBEDDED_DATA = "chatterbot"


@dataclass
class TrainConfig:
    """Every key of a training run. The defaults are the embedded quick start: LoRA SFT of
    SmolLM2-135M-Instruct on chatterbot question/answer pairs, a few minutes on a laptop CPU."""

    model: str = field(default=EMBEDDED_MODEL, metadata={"help": "model folder, or 'smollm2' (embedded)"})
    data: str = field(default=EMBEDDED_DATA, metadata={"help": "data set, or 'chatterbot' (embedded)"})
    output_dir: str = field(default="outputs/quickstart", metadata={"help": "where the adapter and metrics go"})
    r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA alpha (update scaled by alpha / r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input path"})
    target_modules: str = field(default="all-linear", metadata={"help": "comma-separated names, a regex, or all-linear"})
    max_steps: int = field(default=60, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=8, metadata={"help": "examples per step"})
    learning_rate: float = field(default=1e-3, metadata={"help": "peak learning rate (AdamW, cosine decay)"})
    warmup_steps: int = field(default=5, metadata={"help": "linear warm-up steps"})
    max_length: int = field(default=128, metadata={"help": "tokens per example (longer ones are cut)"})
    eval_fraction: float = field(default=0.1, metadata={"help": "share of distinct questions held out"})
    eval_examples: int = field(default=96, metadata={"help": "held-out examples scored before and after"})
    seed: int = field(default=0, metadata={"help": "seed for the split, the adapter init and the data order"})

    def __post_init__(self) -> None:
        for name in ("r", "max_steps", "batch_size", "max_length", "eval_examples"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be positive")
        if not 0 < self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction={self.eval_fraction} must be between 0 and 1")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate={self.learning_rate} must be positive")

    @property
    def target_modules_spec(self) -> list[str] | str:
        """``target_modules`` as LoraConfig takes it: "all-linear", a regex, or a list of names."""
        spec = self.target_modules.strip()
        if spec == "all-linear" or any(ch in spec for ch in "*()[]|\\^$?+"):
            return spec
        return [name.strip() for name in spec.split(",") if name.strip()]

    @classmethod
    def from_sources(cls, config_file: str | None, overrides: list[str]) -> TrainConfig:
        """Defaults, then a YAML file, then ``key=value`` overrides (values parsed as YAML scalars)."""
        values: dict[str, Any] = {}
        if config_file:
            values.update(_read_yaml(Path(config_file)))
        for item in overrides:
            key, sep, raw = item.partition("=")
            if not sep or not key:
                raise ConfigError(f"override {item!r} is not key=value; e.g. max_steps=100")
            values[key.strip()] = yaml.safe_load(raw) if raw else ""
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        hints = get_type_hints(cls)
        fields = {f.name for f in dataclasses.fields(cls)}
        typed = {}
        for key, value in values.items():
            if key not in fields:
                guess = difflib.get_close_matches(key, fields, n=1)
                hint = f"; did you mean {guess[0]!r}?" if guess else f"; known keys: {', '.join(sorted(fields))}"
                raise ConfigError(f"unknown config key {key!r}{hint}")
            typed[key] = _coerce(key, value, hints[key])
        return cls(**typed)


def _read_yaml(path: Path) -> dict[str, Any]:
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


def _coerce(key: str, value: Any, kind: type) -> Any:
    if kind is str and isinstance(value, list):
        return ",".join(str(item) for item in value)
    fractional = kind is int and isinstance(value, float) and not value.is_integer()
    try:
        if isinstance(value, bool) or fractional:
            raise TypeError
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r} must be a {kind.__name__}") from None
