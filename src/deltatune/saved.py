"""An adapter folder with its base: the adapter's config, the base model folder it names, the loaded model and
its tokenizer (what merge, generate, chat, eval and export start from)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from deltatune.config import DeltaConfig
from deltatune.errors import ConfigError
from deltatune.model import DeltaModel
from deltatune.runtime.loading import load_pretrained, load_tokenizer, model_folder

_TASK_CLASSES = {
    None: AutoModelForCausalLM,
    "CAUSAL_LM": AutoModelForCausalLM,
    "SEQ_CLS": AutoModelForSequenceClassification,
}


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
        raise ConfigError(
            f"{adapter}: task_type={config.task_type} adapters are not supported here; use CAUSAL_LM or SEQ_CLS"
        )
    base = load_pretrained(_TASK_CLASSES[config.task_type], base_path, dtype, allow_pickle)
    return DeltaModel.from_pretrained(base, adapter, allow_pickle=allow_pickle).eval(), base_path


def tokenizer_for(adapter: str | os.PathLike | None, base_path: Path):
    """The tokenizer saved with the adapter (training saves one there), else the base model's."""
    if adapter is not None and (Path(adapter) / "tokenizer_config.json").is_file():
        return load_tokenizer(adapter)
    return load_tokenizer(base_path)
