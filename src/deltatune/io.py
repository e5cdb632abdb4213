"""peft-compatible adapter files: ``adapter_config.json`` + ``adapter_model.safetensors``.

One pure function, ``to_file_key``, maps an in-memory parameter name to its key in the file; the
inverse is never written by hand but derived from the model's own names (``file_key_map``), so
save and load cannot drift apart::

    model.layers.0.self_attn.q_proj.lora_A.default.weight  (in memory, adapter "default")
    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight  (in the file)

Writes are atomic per file (``atomic.atomic_file``): each is written to a temporary name in the
target folder, fsynced and renamed over the old one, so a crash leaves the previous good file or the
new one, never a torn one. The weights are renamed first, then the config that describes them: a
re-save of the same adapter is atomic as a whole; a crash between the two renames while a folder is
re-saved with a *different* config leaves the new weights beside the old config (use a new folder,
or ``atomic.atomic_directory``, to replace an adapter with an unlike one).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from deltatune.errors import AdapterLoadError
from deltatune.runtime.atomic import atomic_file

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
FILE_PREFIX = "base_model.model."

# Containers whose children are keyed by adapter name; the name is dropped in the file.
ADAPTER_CONTAINERS = frozenset(
    {
        "lora_A",
        "lora_B",
        "lora_embedding_A",
        "lora_embedding_B",
        "lora_magnitude_vector",
        "lora_E",
        "adapter_down",
        "adapter_up",
        "trainable_tokens_delta",
        "ia3_l",
        "vera_lambda_b",
        "vera_lambda_d",
        "oft_R",
        "oft_embedding_R",
        # LyCORIS (LoHa, LoKr): one ParameterDict per factor
        "hada_w1_a",
        "hada_w1_b",
        "hada_w2_a",
        "hada_w2_b",
        "hada_t1",
        "hada_t2",
        "lokr_w1",
        "lokr_w1_a",
        "lokr_w1_b",
        "lokr_w2",
        "lokr_w2_a",
        "lokr_w2_b",
        "lokr_t2",
    }
)
# Containers dropped together with the adapter name (the copy replaces the module itself).
WRAPPER_CONTAINERS = frozenset({"modules_to_save"})


def to_file_key(name: str, adapter_name: str, prefix: str = FILE_PREFIX) -> str:
    """peft's file key for in-memory parameter ``name`` of adapter ``adapter_name``.

    ``prefix`` is where peft's wrapper keeps the model: ``base_model.model.`` for LoRA-like methods,
    ``base_model.`` for the prompt methods (whose peft wrapper holds the model directly).
    """
    parts = name.split(".")
    kept: list[str] = []
    index = 0
    while index < len(parts):
        part = parts[index]
        followed_by_adapter = index + 1 < len(parts) and parts[index + 1] == adapter_name
        if part in WRAPPER_CONTAINERS and followed_by_adapter:
            index += 2
            continue
        kept.append(part)
        index += 2 if part in ADAPTER_CONTAINERS and followed_by_adapter else 1
    return prefix + ".".join(kept)


def file_key_map(names: Iterable[str], adapter_name: str, prefix: str = FILE_PREFIX) -> dict[str, str]:
    """File key -> in-memory name, for the parameters ``names`` of one adapter."""
    return {to_file_key(name, adapter_name, prefix): name for name in names}


def adapter_dir(directory: str | os.PathLike, adapter_name: str) -> Path:
    """peft's layout: adapter "default" in ``directory``, any other in ``directory/<name>``."""
    return Path(directory) if adapter_name == "default" else Path(directory) / adapter_name


def write_adapter(directory: str | os.PathLike, config_json: str, tensors: Mapping[str, torch.Tensor]) -> None:
    """Write one adapter's two files atomically (weights first, then the config that describes them)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    contiguous = {key: tensor.detach().to("cpu").contiguous() for key, tensor in tensors.items()}
    # The inner block is renamed first: the weights, then the config that describes them.
    with (
        atomic_file(directory / "adapter_config.json") as config_tmp,
        atomic_file(directory / WEIGHTS_NAME) as weights_tmp,
    ):
        save_file(contiguous, str(weights_tmp), metadata={"format": "pt"})
        config_tmp.write_text(config_json, encoding="utf-8")


def read_adapter_weights(directory: str | os.PathLike, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of ``directory``'s adapter file, on the CPU.

    Only safetensors is read by default: a pickle (``adapter_model.bin``) can run arbitrary code
    when loaded, so it is refused unless ``allow_pickle=True``, and even then read with
    ``torch.load(weights_only=True)``.
    """
    directory = Path(directory)
    path = directory / WEIGHTS_NAME
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as handle:
                return {key: handle.get_tensor(key) for key in handle.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise AdapterLoadError(f"{path} is not a readable safetensors file ({exc}); re-save the adapter") from None
    pickle_path = directory / PICKLE_WEIGHTS_NAME
    if pickle_path.is_file():
        if not allow_pickle:
            raise AdapterLoadError(
                f"{pickle_path} is a pickle file, which can run code when loaded; convert it to safetensors, "
                f"or pass allow_pickle=True if you trust its source"
            )
        return _load_plain_tensors(pickle_path)
    raise AdapterLoadError(f"no {WEIGHTS_NAME} in {directory}; is this an adapter directory?")


def check_tensors_fit(tensors: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse a file whose keys or shapes differ from the model's, naming the first mismatch."""
    for key, tensor in tensors.items():
        if key not in targets:
            raise AdapterLoadError(f"{source}: key {key} has no matching parameter in the model; wrong base model?")
        if tuple(tensor.shape) != tuple(targets[key].shape):
            raise AdapterLoadError(
                f"{source}: {key} has shape {tuple(tensor.shape)} but the model expects "
                f"{tuple(targets[key].shape)}; wrong base model or config?"
            )
        if not tensor.is_floating_point():
            raise AdapterLoadError(f"{source}: {key} has dtype {tensor.dtype}, expected a floating-point tensor")
        if not torch.isfinite(tensor).all():
            raise AdapterLoadError(
                f"{source}: {key} holds NaN or Inf values; the adapter is corrupt (did training "
                f"diverge?), re-train or pick an earlier checkpoint"
            )


def _load_plain_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A pickled ``{name: tensor}`` dict, unpickled with ``weights_only=True``: anything besides tensors
    and containers (a class, a function, a ``__reduce__`` call) is refused, never run."""
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError):
        raise AdapterLoadError(
            f"{path} is not plain tensors that torch.load(weights_only=True) accepts (it may run code, or is not "
            f"a torch file); do not load it unless you trust it, and then convert it to safetensors"
        ) from None
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise AdapterLoadError(f"{path} is not a dict of tensors (got {type(tensors).__name__}); re-save the adapter")
    return tensors
