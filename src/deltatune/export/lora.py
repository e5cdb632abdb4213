"""A LoRA adapter as a llama.cpp LoRA adapter: ``<gguf weight>.lora_a`` / ``.lora_b`` per module.

llama.cpp adds ``scale * B @ A`` to a weight with ``scale = adapter.lora.alpha / r`` (r read off the
tensors), one alpha for the whole file. deltatune's scale per module is ``alpha_m / r_m`` (or
``alpha_m / sqrt(r_m)`` with rsLoRA, alpha_m and r_m from ``alpha_pattern`` / ``rank_pattern``), so
each B is multiplied by ``true scale / llama.cpp's scale`` and llama.cpp's default ``--lora``
reproduces the trained model; the written alpha is the config's ``lora_alpha``::

    lora_b = B * s_m / (alpha / r_m)        (= B exactly for plain LoRA without patterns)

Layouts (torch shapes, GGUF stores them reversed): a linear layer's ``lora_a`` is A [r, in] and
``lora_b`` is B [out, r], its rows permuted as the weight's rows are; an embedding's ``lora_a`` is
A^T [vocab, r] (llama.cpp gathers its rows by token id) and ``lora_b`` is B [dim, r].
"""

from __future__ import annotations

import torch

from deltatune.errors import ConfigError
from deltatune.export.architectures import Architecture, TensorNamer
from deltatune.io import FILE_PREFIX
from deltatune.tuners.lora.config import LoraConfig
from deltatune.tuners.targeting import pattern_value

_FACTOR_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_embedding_A": "A", ".lora_embedding_B": "B"}


def check_exportable(config, source: str) -> LoraConfig:
    """Refuse, in one line, an adapter that a llama.cpp LoRA file cannot carry."""
    if not isinstance(config, LoraConfig) or config.peft_type != LoraConfig.peft_type:  # AdaLoraConfig subclasses it
        raise ConfigError(
            f"{source} is a {config.peft_type} adapter; only LoRA adapters become GGUF adapters "
            f"(export the merged model instead: drop --lora)"
        )
    refusals = {
        "use_dora": "DoRA's magnitude vector",
        "modules_to_save": "fully trained modules (modules_to_save)",
        "trainable_token_indices": "trained token rows (trainable_token_indices)",
        "lora_bias": "LoRA biases (lora_bias)",
        "target_parameters": "LoRA on raw parameters (target_parameters)",
    }
    for field, what in refusals.items():
        if getattr(config, field, None):
            raise ConfigError(
                f"{source}: a llama.cpp LoRA adapter cannot carry {what}; export the merged model instead (drop --lora)"
            )
    if config.bias != "none":
        raise ConfigError(
            f"{source}: bias={config.bias!r} trains base biases, which a llama.cpp LoRA adapter "
            f"cannot carry; export the merged model instead (drop --lora)"
        )
    return config


def lora_tensors(
    weights: dict[str, torch.Tensor], config: LoraConfig, architecture: Architecture, base_config
) -> dict[str, torch.Tensor]:
    """``{gguf name: float32 tensor}`` of an adapter's factors, scale folded into each B."""
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        suffix = next((s for s in _FACTOR_SUFFIXES if key.endswith(s)), None)
        if suffix is None or not key.startswith(FILE_PREFIX):
            raise ConfigError(
                f"adapter tensor {key!r} is not a LoRA factor; a llama.cpp LoRA adapter cannot "
                f"carry it (export the merged model instead)"
            )
        if tensor.ndim != 2:
            raise ConfigError(
                f"adapter tensor {key!r} has {tensor.ndim} dimensions (a convolution?); llama.cpp "
                f"LoRA adapters hold matrices only"
            )
        module = key[len(FILE_PREFIX) : -len(suffix)]
        factors.setdefault(module, {})[_FACTOR_SUFFIXES[suffix]] = tensor.detach().to(torch.float32)
    namer = TensorNamer(architecture, base_config)
    tensors = {}
    for module, pair in factors.items():
        if set(pair) != {"A", "B"}:
            raise ConfigError(
                f"adapter module {module!r} has only lora_{''.join(pair)}; the adapter file is incomplete"
            )
        if module.endswith("lm_head") and getattr(base_config, "tie_word_embeddings", False):
            raise ConfigError(
                "the adapter changes lm_head, which this model ties to its input embedding; "
                "llama.cpp has no separate output weight to adapt (export the merged model instead)"
            )
        weight = f"{module}.weight"
        name = namer.gguf_name(weight)
        a, b = pair["A"], pair["B"] * _fold(config, module, rank=pair["A"].shape[0])
        if name.startswith("token_embd."):
            tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"] = a.T.contiguous(), b
        else:
            tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"] = a, namer.permute_rows(weight, b).contiguous()
    return tensors


def _fold(config: LoraConfig, module: str, rank: int) -> float:
    """The factor that turns llama.cpp's scale (lora_alpha / r) into this module's trained scale."""
    alpha = pattern_value(module, config.alpha_pattern, config.lora_alpha)
    llama_cpp_scale = config.lora_alpha / rank if config.lora_alpha else 1.0
    return config.scaling(rank, alpha) / llama_cpp_scale
