"""An adapter folder with its base: the adapter's config, the base model folder it names, the loaded model and
its tokenizer (what merge, generate, chat, eval and export start from)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open

from deltatune.config import DeltaConfig
from deltatune.errors import ConfigError
from deltatune.io import WEIGHTS_NAME
from deltatune.model import DeltaModel
from deltatune.runtime.loading import TASK_CLASSES, load_pretrained, load_tokenizer, model_folder
from deltatune.tuners.targeting import CLASSIFIER_HEADS

_TASK_CLASSES = {None: TASK_CLASSES["CAUSAL_LM"], **TASK_CLASSES}


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
    outputs = head_outputs(adapter) if config.task_type == "SEQ_CLS" else None
    options = {} if outputs is None else {"num_labels": outputs}
    base = load_pretrained(_TASK_CLASSES[config.task_type], base_path, dtype, allow_pickle, **options)
    return DeltaModel.from_pretrained(base, adapter, allow_pickle=allow_pickle).eval(), base_path


def head_outputs(adapter: str | os.PathLike) -> int | None:
    """How many outputs the classifier head saved with ``adapter`` has (1: a reward model), read from its
    safetensors header; None when it saved no head."""
    path = Path(adapter) / WEIGHTS_NAME
    if not path.is_file():
        return None
    with safe_open(path, "pt") as weights:
        for key in weights.keys():
            parts = key.split(".")
            if parts[-1] == "weight" and len(parts) > 1 and parts[-2] in CLASSIFIER_HEADS:
                return weights.get_slice(key).get_shape()[0]
    return None


def tokenizer_for(adapter: str | os.PathLike | None, base_path: Path):
    """The tokenizer saved with the adapter (training saves one there), else the base model's."""
    if adapter is not None and (Path(adapter) / "tokenizer_config.json").is_file():
        return load_tokenizer(adapter)
    return load_tokenizer(base_path)
