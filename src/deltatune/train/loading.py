"""Find and load models, tokenizers and adapters from local folders (or the embedded assets).

A model is named by a folder holding ``config.json``, or by an embedded name: "smollm2"
(SmolLM2-135M-Instruct) or "minilm" (all-MiniLM-L6-v2), or their hub ids, which adapters of them
record so their files travel (resolved to the embedded copies, offline). Nothing is downloaded, no code a model
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
from ..quantization import check_quantization, loading_options, saved_quantization

EMBEDDED_MODELS: dict[str, Callable[[], Path]] = {"smollm2": assets.smollm2_path, "minilm": assets.minilm_path}
HUB_IDS = {"smollm2": assets.SMOLLM2_HUB_ID, "minilm": assets.MINILM_HUB_ID}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # fmt: skip
_TASK_CLASSES = {None: AutoModelForCausalLM, "CAUSAL_LM": AutoModelForCausalLM, "SEQ_CLS": AutoModelForSequenceClassification}


def model_folder(model: str | os.PathLike) -> Path:
    """The folder of ``model``: an embedded name or its hub id (``HUB_IDS``; a local folder of that
    name wins), or a local folder with config.json."""
    path = Path(model)
    embedded = {hub_id: name for name, hub_id in HUB_IDS.items()}.get(str(model), str(model))
    if embedded in EMBEDDED_MODELS and not (path / "config.json").is_file():
        return EMBEDDED_MODELS[embedded]()
    if not (path / "config.json").is_file():
        names = ", ".join(repr(name) for name in EMBEDDED_MODELS)
        raise ConfigError(f"model={str(model)!r} is not a model folder (no config.json); use {names} or a local path")
    return path


def base_model_id(model: str | os.PathLike) -> str:
    """What an adapter records as ``base_model_name_or_path``: an embedded model's public hub id, else
    ``model`` as the user gave it."""
    return HUB_IDS.get(str(model), str(model))


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer in ``path``, with a pad token (its eos when it has none)."""
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32, allow_pickle: bool = False, quantization: str = "none"
) -> torch.nn.Module:
    """A causal LM (mixed precision, when a run asks for it, runs under autocast over fp32 weights), its
    linear layers held as ``quantization`` asks (``deltatune.quantization``; "none": as saved)."""
    device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    check_quantization(quantization, device)
    config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    options = loading_options(quantization, config, dtype)
    if options or saved_quantization(config) != "none":  # bitsandbytes layers are placed at load time
        options["device_map"] = {"": torch.cuda.current_device()} if device == "cuda" else device
    return _from_pretrained(AutoModelForCausalLM, path, dtype, allow_pickle, **options)


def load_saved_class(path: str | os.PathLike, allow_pickle: bool = False) -> torch.nn.Module:
    """The model in ``path`` as the class it was saved as (``config.architectures``), else ``AutoModel``."""
    config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    architecture = (config.architectures or [None])[0]
    cls = getattr(transformers, architecture, None) if architecture else None
    cls = cls or transformers.AutoModel
    return _from_pretrained(cls, path, torch.float32, allow_pickle)


def _from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype, allow_pickle: bool, **options) -> torch.nn.Module:
    """``cls.from_pretrained`` from local files, with no remote code, from safetensors weights unless
    pickles are allowed; a torn or corrupt weights file is a one-line ``ConfigError``."""
    if not allow_pickle and not any(Path(path).glob("*.safetensors")):
        raise ConfigError(f"{path} has no .safetensors weights; pickled weights (.bin) can run code when loaded, "
                          f"so convert them to safetensors (from Python: allow_pickle=True, if you trust their "
                          f"source)")  # fmt: skip
    safetensors_only = {} if allow_pickle else {"use_safetensors": True}
    try:
        return cls.from_pretrained(
            path, dtype=dtype, local_files_only=True, trust_remote_code=False, **safetensors_only, **options
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
