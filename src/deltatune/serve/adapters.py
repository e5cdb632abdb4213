"""The adapter registry: the names the API serves, and for each adapter its folder, the name it has inside the
model and the system prompt it was trained with::

    served name   folder                          in the model   system prompt (deltatune.json)
    "smollm2"     (the base model)                 -              -
    "support"     /srv/outputs/support/adapter    "serve0"       "You are a support agent."
    "legal"       /srv/outputs/legal/adapter      "serve1"       None

The checks on a folder read only JSON and file names, so a mistyped flag is refused before torch loads.
Run-time loading accepts only folders under ``--adapter-root``: both paths are resolved first, so neither
``..`` nor a symlink can lead out of it.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import threading
from pathlib import Path

from deltatune.data.chat_defaults import stored_system
from deltatune.errors import ConfigError
from deltatune.serve.errors import Forbidden, NotFound, RequestError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
TASK_TYPES = (None, "CAUSAL_LM")


@dataclasses.dataclass(frozen=True)
class Adapter:
    """One served adapter."""

    name: str
    folder: Path
    internal: str  # its name inside the DeltaModel (served names may hold '/' or '.', which model names cannot)
    system: str | None
    base: str | None  # base_model_name_or_path in its config


def parse_adapter_flag(text: str) -> tuple[str, str]:
    """``NAME=PATH`` -> (name, path)."""
    name, sep, path = text.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise ConfigError(f"--adapter {text!r} is not NAME=PATH; e.g. --adapter support=outputs/support/adapter")
    return name.strip(), path.strip()


def check_name(name: str) -> str:
    """A served name: printable, no spaces, at most 200 characters."""
    if not name or len(name) > 200 or not name.isprintable() or any(c.isspace() for c in name):
        raise RequestError(
            f"adapter name {name!r} must be 1-200 printable characters without spaces; pick another name", "lora_name"
        )
    return name


def read_adapter_config(folder: str | os.PathLike) -> dict:
    """``folder``'s adapter config, after the checks that need no torch: a folder with adapter_config.json
    and safetensors weights, a LoRA adapter for a causal LM (the kinds that mix per row)."""
    path = Path(folder)
    if not path.is_dir():
        raise RequestError(f"{folder} is not a folder; pass an adapter folder (adapter_config.json + weights)", "path")
    if not (path / CONFIG_FILE).is_file():
        raise RequestError(f"{folder} has no {CONFIG_FILE}; is it an adapter folder?", "path")
    if not (path / WEIGHTS_FILE).is_file():
        raise RequestError(
            f"{folder} has no {WEIGHTS_FILE}; the server loads safetensors weights only (save the adapter again)",
            "path",
        )
    try:
        config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(f"{path / CONFIG_FILE} is not valid JSON ({exc}); save the adapter again", "path") from None
    if not isinstance(config, dict):
        raise RequestError(f"{path / CONFIG_FILE} must hold a JSON object; save the adapter again", "path")
    check_servable(config, folder)
    return config


def check_servable(config: dict, folder: str | os.PathLike) -> None:
    """Refuse, in one line, an adapter whose config says it cannot run per row beside others (the model-level
    check runs after loading)."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise RequestError(
            f"{folder}: its method is {peft_type}, and deltatune serve serves LoRA adapters only (they mix per row "
            f"in one batch); merge it into the base with `deltatune merge` and serve that model",
            "path",
        )
    if config.get("task_type") not in TASK_TYPES:
        raise RequestError(
            f"{folder} is a task_type={config.get('task_type')} adapter; deltatune serve answers with causal LM "
            f"adapters (task_type CAUSAL_LM)",
            "path",
        )


def check_runtime_loading(root: Path | None) -> Path:
    """``root``; a 403 naming the flag when run-time loading is off (no ``--adapter-root``)."""
    if root is None:
        raise Forbidden(
            "loading and unloading adapters at run time is off; start deltatune serve with --adapter-root DIR to "
            "allow it for adapter folders under DIR"
        )
    return root


def under_root(folder: str | os.PathLike, root: Path | None) -> Path:
    """``folder`` resolved, when it lies under ``root`` (resolved); else a 403 naming the fix."""
    root = check_runtime_loading(root)
    resolved = Path(folder).expanduser().resolve()
    if not resolved.is_relative_to(root):
        raise Forbidden(f"{folder} is not under the adapter root {root}; move the adapter there", "lora_path")
    return resolved


class Registry:
    """The served names (the base model's and every adapter's); safe to read from any thread."""

    def __init__(self, base_name: str, base_root: str, adapter_root: str | os.PathLike | None = None) -> None:
        self.base_name = base_name
        self.base_root = base_root
        self.adapter_root = Path(adapter_root).expanduser().resolve() if adapter_root is not None else None
        self._adapters: dict[str, Adapter] = {}
        self._internal_names = (f"serve{i}" for i in itertools.count())
        self._lock = threading.Lock()

    def describe(self, name: str, folder: str | os.PathLike) -> Adapter:
        """The registry entry ``name`` would get for ``folder`` (checked, not yet added)."""
        check_name(name)
        with self._lock:
            if name == self.base_name or name in self._adapters:
                raise RequestError(
                    f"the name {name!r} is already served; unload it first or pick another name", "lora_name"
                )
            internal = next(self._internal_names)
        config = read_adapter_config(folder)
        system = stored_system(folder)
        base = config.get("base_model_name_or_path")
        return Adapter(name, Path(folder).resolve(), internal, system, base)

    def add(self, adapter: Adapter) -> None:
        with self._lock:
            if adapter.name == self.base_name or adapter.name in self._adapters:
                raise RequestError(f"the name {adapter.name!r} is already served; pick another name", "lora_name")
            self._adapters[adapter.name] = adapter

    def remove(self, name: str) -> Adapter:
        with self._lock:
            if name not in self._adapters:
                raise NotFound(f"no adapter named {name!r} is loaded; loaded: {self._names()}", "lora_name")
            return self._adapters.pop(name)

    def resolve(self, name: str) -> Adapter | None:
        """The adapter a request's ``model`` names (None: the base model); a 404 listing the served names."""
        if name == self.base_name:
            return None
        with self._lock:
            adapter = self._adapters.get(name)
            if adapter is None:
                raise NotFound(f"The model `{name}` does not exist; served models: {self._names()}", "model")
            return adapter

    @property
    def adapters(self) -> list[Adapter]:
        with self._lock:
            return list(self._adapters.values())

    def _names(self) -> str:
        return ", ".join([self.base_name, *self._adapters])
