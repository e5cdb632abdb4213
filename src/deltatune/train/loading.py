"""Find and load models, tokenizers and adapters from local folders (or the embedded assets).

A model is named by a folder holding ``config.json``, or by an embedded name: "smollm2"
(SmolLM2-135M-Instruct) or "minilm" (all-MiniLM-L6-v2). Nothing is downloaded, no code a model
folder ships is run (``trust_remote_code=False``), and weights are read from safetensors only: a
pickled ``pytorch_model.bin`` can run code when loaded, so it needs ``allow_pickle=True``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from .. import assets
from ..config import DeltaConfig
from ..errors import ConfigError
from ..model import DeltaModel

EMBEDDED_MODELS: dict[str, Callable[[], Path]] = {"smollm2": assets.smollm2_path, "minilm": assets.minilm_path}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TASK_CLASSES = {None: AutoModelForCausalLM, "CAUSAL_LM": AutoModelForCausalLM, "SEQ_CLS": AutoModelForSequenceClassification}


def model_folder(model: str | os.PathLike) -> Path:
    """The folder of ``model``: an embedded name, or a local folder with config.json."""
    if str(model) in EMBEDDED_MODELS:
        return EMBEDDED_MODELS[str(model)]()
    path = Path(model)
    if not (path / "config.json").is_file():
        names = ", ".join(repr(name) for name in EMBEDDED_MODELS)
        raise ConfigError(f"model={str(model)!r} is not a model folder (no config.json); use {names} or a local path")
    return path


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer in ``path``, with a pad token (its eos when it has none)."""
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32, allow_pickle: bool = False
) -> torch.nn.Module:
    """A causal LM (mixed precision, when a run asks for it, runs under autocast over fp32 weights)."""
    return _from_pretrained(AutoModelForCausalLM, path, dtype, allow_pickle)


def load_saved_class(path: str | os.PathLike, allow_pickle: bool = False) -> torch.nn.Module:
    """The model in ``path`` as the class it was saved as (``config.architectures``), else ``AutoModel``."""
    config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    architecture = (config.architectures or [None])[0]
    cls = getattr(transformers, architecture, None) if architecture else None
    cls = cls or transformers.AutoModel
    return _from_pretrained(cls, path, torch.float32, allow_pickle)


def _from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype, allow_pickle: bool) -> torch.nn.Module:
    """``cls.from_pretrained`` from local files, with no remote code, from safetensors weights unless
    pickles are allowed; a torn or corrupt weights file is a one-line ``ConfigError``."""
    if not allow_pickle and not any(Path(path).glob("*.safetensors")):
        raise ConfigError(f"{path} has no .safetensors weights; pickled weights (.bin) can run code when loaded, "
                          f"so convert them to safetensors (from Python: allow_pickle=True, if you trust their "
                          f"source)")  # fmt: skip
    safetensors_only = {} if allow_pickle else {"use_safetensors": True}
    try:
        return cls.from_pretrained(
            path, dtype=dtype, local_files_only=True, trust_remote_code=False, **safetensors_only
        )
    except SafetensorError as exc:
        raise ConfigError(f"{path}: the model weights are not a readable safetensors file ({exc}); copy or "
                          f"save the model again") from None


def adapter_base(adapter: str | os.PathLike, model: str | None) -> tuple[DeltaConfig, Path]:
    """(the adapter's config, the base model folder): ``model`` if given, else the adapter's
    ``base_model_name_or_path``, else the embedded SmolLM2."""
    config = DeltaConfig.from_pretrained(adapter)
    return config, model_folder(model or config.base_model_name_or_path or "smollm2")


def load_adapted(
    adapter: str | os.PathLike, model: str | None = None, dtype: torch.dtype = torch.float32, allow_pickle: bool = False
) -> tuple[DeltaModel, Path]:
    """(the base model with the adapter loaded, frozen and in eval mode; the base folder)."""
    config, base_path = adapter_base(adapter, model)
    if config.task_type not in _TASK_CLASSES:
        raise ConfigError(f"{adapter}: task_type={config.task_type} adapters are not supported here; use "
                          f"CAUSAL_LM or SEQ_CLS")  # fmt: skip
    base = _from_pretrained(_TASK_CLASSES[config.task_type], base_path, dtype, allow_pickle)
    return DeltaModel.from_pretrained(base, adapter, allow_pickle=allow_pickle).eval(), base_path


def tokenizer_for(adapter: str | os.PathLike | None, base_path: Path):
    """The tokenizer saved with the adapter (training saves one there), else the base model's."""
    if adapter is not None and (Path(adapter) / "tokenizer_config.json").is_file():
        return load_tokenizer(adapter)
    return load_tokenizer(base_path)
