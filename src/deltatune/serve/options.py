"""``deltatune serve``'s options, and every check of them that needs no torch (so a mistyped flag or folder
answers at once, before the model loads)."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

from deltatune.errors import ConfigError
from deltatune.serve.adapters import parse_adapter_flag, read_adapter_config

# runtime.loading.DTYPES and runtime.quantization.QUANTIZATIONS, written out so flags are checked before torch loads
DTYPE_NAMES = ("float32", "bfloat16", "float16", "fp32", "bf16", "fp16")
QUANTIZATION_NAMES = ("none", "nf4", "fp4", "int8")
PREFIX_CACHE_TOKENS = 4096  # prompt-start tokens whose keys and values a server keeps (generation/prefix_cache.py)


@dataclasses.dataclass
class ServeOptions:
    """What ``deltatune serve``'s flags ask for (see docs/serving.md)."""

    model: str | None = None
    adapters: list[str] = dataclasses.field(default_factory=list)  # NAME=PATH
    served_model_name: str | None = None
    max_concurrent: int = 32
    max_prompt_tokens: int | None = None
    dtype: str = "float32"
    quantization: str = "none"
    adapter_root: str | None = None
    seed: int = 0
    packed_weights: bool = True  # decode on oneDNN-packed linear weights on a CPU (kernels.packed_linear)
    prefix_cache: int = PREFIX_CACHE_TOKENS  # tokens of shared prompt starts kept with their keys and values


def check_options(options: ServeOptions) -> list[tuple[str, str, dict]]:
    """The startup adapters as (name, folder, config), after every check that needs no torch."""
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"deltatune serve needs {' and '.join(missing)}: pip install 'deltatune[serve]'")
    if options.max_concurrent < 1:
        raise ConfigError(f"--max-concurrent={options.max_concurrent} must be at least 1")
    if options.max_prompt_tokens is not None and options.max_prompt_tokens < 1:
        raise ConfigError(f"--max-prompt-tokens={options.max_prompt_tokens} must be at least 1")
    if options.prefix_cache < 0:
        raise ConfigError(f"--prefix-cache={options.prefix_cache} must be a number of tokens, 0 (none) or more")
    if options.dtype not in DTYPE_NAMES:
        raise ConfigError(f"--dtype={options.dtype!r} is unknown; use one of {', '.join(DTYPE_NAMES)}")
    if options.quantization not in QUANTIZATION_NAMES:
        raise ConfigError(
            f"--quantization={options.quantization!r} is unknown; use one of {', '.join(QUANTIZATION_NAMES)}"
        )
    if options.adapter_root is not None and not Path(options.adapter_root).expanduser().is_dir():
        raise ConfigError(f"--adapter-root {options.adapter_root} is not a folder; create it or pass another")
    entries, names = [], set()
    for flag in options.adapters:
        name, folder = parse_adapter_flag(flag)
        if name in names or name == served_name(options):
            raise ConfigError(f"--adapter {flag!r}: the name {name!r} is served twice; give each adapter its own name")
        names.add(name)
        entries.append((name, folder, read_adapter_config(folder)))
    return entries


def base_model(options: ServeOptions, entries: list[tuple[str, str, dict]]) -> str:
    """--model, else the first adapter's base model, else the embedded SmolLM2."""
    first = entries[0][2].get("base_model_name_or_path") if entries else None
    return options.model or first or "smollm2"


def served_name(options: ServeOptions, entries: list[tuple[str, str, dict]] | None = None) -> str:
    return options.served_model_name or options.model or base_model(options, entries or [])
