"""Find and load models, tokenizers and adapters from local folders (or the embedded assets).

A model is named by a folder holding ``config.json``, by an embedded name: "smollm2"
(SmolLM2-135M-Instruct) or "minilm" (all-MiniLM-L6-v2), or their hub ids, which adapters of them
record so their files travel (resolved to the embedded copies, offline, always), or by any other hub id
("Org/Name"): its snapshot in the Hugging Face cache (``HF_HUB_CACHE``) is used as it is, with no
network call; an id not cached yet is downloaded into that cache, unless ``HF_HUB_OFFLINE`` is set.
No code a model folder ships is run (``trust_remote_code=False``), and weights are read from
safetensors only: a pickled ``pytorch_model.bin`` can run code when loaded, so it needs ``allow_pickle=True``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from deltatune.errors import ConfigError
from deltatune.runtime import assets
from deltatune.runtime.quantization import (
    check_quantization,
    loading_options,
    saved_quantization,
)

EMBEDDED_MODELS: dict[str, Callable[[], Path]] = {"smollm2": assets.smollm2_path, "minilm": assets.minilm_path}
HUB_IDS = {"smollm2": assets.SMOLLM2_HUB_ID, "minilm": assets.MINILM_HUB_ID}
# The model class of each adapter task type deltatune trains or loads.
TASK_CLASSES = {"CAUSAL_LM": AutoModelForCausalLM, "SEQ_CLS": AutoModelForSequenceClassification}
DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def model_folder(model: str | os.PathLike) -> Path:
    """The folder of ``model``: an embedded name or its hub id (``HUB_IDS``; a local folder of that
    name wins), a local folder with config.json, or a hub id ("Org/Name", see ``hub_folder``)."""
    path = Path(model)
    embedded = {hub_id: name for name, hub_id in HUB_IDS.items()}.get(str(model), str(model))
    if embedded in EMBEDDED_MODELS and not (path / "config.json").is_file():
        return EMBEDDED_MODELS[embedded]()
    if (path / "config.json").is_file():
        return path
    if not path.exists() and HUB_ID.fullmatch(str(model)):
        return hub_folder(str(model))
    names = ", ".join(repr(name) for name in EMBEDDED_MODELS)
    raise ConfigError(
        f"model={str(model)!r} is not a model folder (no config.json); use {names}, a local path or a hub id (Org/Name)"
    )


# A hub model id, "Org/Name" (huggingface_hub's rule: letters, digits, "-", "_", "."; no "--" or "..";
# the parts start and end with a letter or digit). A path that exists on disk is never taken for one.
HUB_ID = re.compile(r"(?!.*(--|\.\.))[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9])?/[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9])?")
# Weights of other frameworks, never loaded here, so never downloaded.
_HUB_IGNORE = ["*.h5", "*.msgpack", "*.ckpt.index", "*.onnx", "*.onnx_data", "onnx/*", "*.tflite", "*.ot", "*.gguf"]


def hub_folder(repo_id: str) -> Path:
    """The local snapshot of hub model ``repo_id``: the Hugging Face cache's copy when it has one (no
    network call), else downloaded into that cache; a one-line ``ConfigError`` when it is not cached
    and ``HF_HUB_OFFLINE`` is set, or the download fails."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True, ignore_patterns=_HUB_IGNORE))
        if (folder / "config.json").is_file():
            return folder
    except LocalEntryNotFoundError:  # IncompleteSnapshotError too: an interrupted download
        pass
    where = (
        f"model={repo_id!r} is not a local folder, and as a hub id it is not in the Hugging Face cache "
        f"({constants.HF_HUB_CACHE})"
    )
    if constants.HF_HUB_OFFLINE:
        raise ConfigError(
            f"{where} while HF_HUB_OFFLINE is set; run `hf download {repo_id}` where the network is "
            f"available (into that cache), or unset HF_HUB_OFFLINE"
        )
    try:
        folder = Path(snapshot_download(repo_id, ignore_patterns=_HUB_IGNORE))
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        raise ConfigError(
            f"{where}, and the hub refused it ({type(exc).__name__}); check the id's spelling, or "
            f"log in with `hf auth login` for a private or gated model"
        ) from None
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(
            f"{where}, and downloading it failed ({reason}); check the network, or run `hf download {repo_id}`"
        ) from None
    if not (folder / "config.json").is_file():
        raise ConfigError(f"model={repo_id!r}: the hub repository has no config.json; it is not a transformers model")
    return folder


def base_model_id(model: str | os.PathLike) -> str:
    """What an adapter records as ``base_model_name_or_path``: an embedded model's public hub id, else
    ``model`` as the user gave it (a hub id stays one, so the adapter finds its base in any cache)."""
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
    linear layers held as ``quantization`` asks (``deltatune.runtime.quantization``; "none": as saved)."""
    return load_model(path, "CAUSAL_LM", dtype, allow_pickle, quantization)


def load_model(
    path: str | os.PathLike,
    task_type: str = "CAUSAL_LM",
    dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
    quantization: str = "none",
    **config_options: Any,
) -> torch.nn.Module:
    """``load_causal_lm`` for a ``task_type`` of ``TASK_CLASSES``; ``config_options`` set config fields
    (a reward model: ``num_labels=1, pad_token_id=...``)."""
    device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    check_quantization(quantization, device)
    config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    options = loading_options(quantization, config, dtype)
    if options or saved_quantization(config) != "none":  # bitsandbytes layers are placed at load time
        options["device_map"] = {"": torch.cuda.current_device()} if device == "cuda" else device
    return load_pretrained(TASK_CLASSES[task_type], path, dtype, allow_pickle, **options, **config_options)


def load_saved_class(path: str | os.PathLike, allow_pickle: bool = False) -> torch.nn.Module:
    """The model in ``path`` as the class it was saved as (``config.architectures``), else ``AutoModel``."""
    config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    architecture = (config.architectures or [None])[0]
    cls = getattr(transformers, architecture, None) if architecture else None
    cls = cls or transformers.AutoModel
    return load_pretrained(cls, path, torch.float32, allow_pickle)


def load_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype, allow_pickle: bool, **options) -> torch.nn.Module:
    """``cls.from_pretrained`` from local files, with no remote code, from safetensors weights unless
    pickles are allowed; a torn or corrupt weights file is a one-line ``ConfigError``."""
    if not allow_pickle and not any(Path(path).glob("*.safetensors")):
        raise ConfigError(
            f"{path} has no .safetensors weights; pickled weights (.bin) can run code when loaded, "
            f"so convert them to safetensors (from Python: allow_pickle=True, if you trust their "
            f"source)"
        )
    safetensors_only = {} if allow_pickle else {"use_safetensors": True}
    try:
        return cls.from_pretrained(
            path, dtype=dtype, local_files_only=True, trust_remote_code=False, **safetensors_only, **options
        )
    except SafetensorError as exc:
        raise ConfigError(
            f"{path}: the model weights are not a readable safetensors file ({exc}); copy or save the model again"
        ) from None
