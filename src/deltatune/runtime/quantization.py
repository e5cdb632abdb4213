"""Quantised base models (QLoRA): load a base in 4-bit or 8-bit with bitsandbytes, prepare it for training.

``quantization`` names one of four ways to hold the frozen base's linear layers (the output head, the
embeddings and the norms always stay in full precision, as transformers does it)::

    none  fp32 (or the run's dtype)    4 bytes a weight
    nf4   4-bit NormalFloat codes      0.5 byte a weight + one fp32 scale per 64 (QLoRA's default)
    fp4   4-bit float codes            the same
    int8  8-bit codes, one scale a row ~1 byte a weight

bitsandbytes is optional (``pip install deltatune[qlora]``); nothing here imports it before a mode asks.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from torch import nn

from deltatune.compat.bitsandbytes import avoid_failing_repacks
from deltatune.errors import ConfigError
from deltatune.kernels.base_weight import is_quantized

QUANTIZATIONS = ("none", "nf4", "fp4", "int8")
SUPPORTED_DEVICES = ("cpu", "cuda", "xpu")  # where bitsandbytes 0.50 runs 4-bit and 8-bit layers
_BLOCK = 64  # bitsandbytes' 4-bit block: one fp32 absmax per 64 weights


def check_quantization(mode: str, device_type: str = "cpu") -> None:
    """Refuse, in one line each, an unknown ``mode``, a missing bitsandbytes, or a device it cannot run on."""
    if mode not in QUANTIZATIONS:
        raise ConfigError(f"quantization={mode!r} is unknown; use one of {', '.join(QUANTIZATIONS)}")
    if mode == "none":
        return
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"quantization={mode} needs bitsandbytes: pip install deltatune[qlora]")
    if device_type not in SUPPORTED_DEVICES:
        raise ConfigError(
            f"quantization={mode} does not run on {device_type} (bitsandbytes supports "
            f"{', '.join(SUPPORTED_DEVICES)}); use quantization=none there"
        )


def saved_quantization(model_config: Any) -> str:
    """How a model folder's own config says its weights are stored: one of ``QUANTIZATIONS``, or another
    method's name (gptq, awq, ...) as transformers records it."""
    saved = getattr(model_config, "quantization_config", None)
    if saved is None:
        return "none"
    saved = saved if isinstance(saved, dict) else saved.to_dict()
    if saved.get("load_in_4bit"):
        return saved.get("bnb_4bit_quant_type", "fp4")
    if saved.get("load_in_8bit"):
        return "int8"
    return str(saved.get("quant_method", "unknown"))


def loading_options(mode: str, model_config: Any, compute_dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments that load a base as ``mode`` asks.

    A folder that is already quantised loads as it is saved when ``mode`` matches it (or is "none");
    asking for another quantisation of it is a ``ConfigError``.
    """
    saved = saved_quantization(model_config)
    if saved != "none":
        if mode not in ("none", saved):
            raise ConfigError(
                f"the model is already quantised as {saved}; it cannot be quantised again as {mode} "
                f"(use quantization={saved}, or the full-precision model)"
            )
        return {}
    if mode == "none":
        return {}
    from transformers import BitsAndBytesConfig

    if mode == "int8":
        return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True)}
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=mode, bnb_4bit_compute_dtype=compute_dtype)
    return {"quantization_config": config}


def is_quantized_model(model: nn.Module) -> bool:
    """Whether any layer of ``model`` holds a bitsandbytes 4-bit or 8-bit weight."""
    return any(is_quantized(getattr(module, "weight", None)) for module in model.modules())


def prepare_for_kbit_training(model: nn.Module, gradient_checkpointing: bool = False) -> nn.Module:
    """Make a quantised transformers model ready to train adapters on (in place; returns ``model``).

    - every base parameter frozen; the ones kept in half precision (norms, embeddings, head) cast to
      fp32, so the adapter's gradients do not pass through fp16/bf16 norms;
    - the input embeddings' output requires grad, so activation checkpointing has a graph to replay;
    - ``gradient_checkpointing``: activations recomputed in backward (non-reentrant).

    Evaluation keeps bitsandbytes' CPU inference kernel for 4-bit weights (the LoRA layers over them read
    the weights as quantised whatever it repacks), except on layers whose shape that kernel cannot take
    (``deltatune.compat.bitsandbytes.avoid_failing_repacks``).
    """
    for param in model.parameters():
        param.requires_grad_(False)
        if param.dtype in (torch.float16, torch.bfloat16) and not is_quantized(param):
            param.data = param.data.float()
    avoid_failing_repacks(model)
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    if gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def base_memory(model: nn.Module, mode: str) -> int:
    """Bytes the weights of ``model`` (fp32, any device including meta) would take held as ``mode``.

    The linear layers transformers quantises become codes + scales (nf4/fp4: half a byte a weight and one
    fp32 scale per 64; int8: a byte a weight and one fp32 scale a row); everything else stays fp32.
    """
    quantised = {id(m.weight) for m in _quantisable_linears(model)} if mode != "none" else set()
    total = 0
    for param in {id(p): p for p in model.parameters()}.values():
        if id(param) not in quantised:
            total += param.numel() * 4
        elif mode == "int8":
            total += param.numel() + param.shape[0] * 4
        else:
            total += (param.numel() + 1) // 2 + -(-param.numel() // _BLOCK) * 4
    return total


def _quantisable_linears(model: nn.Module) -> list[nn.Linear]:
    """The ``nn.Linear`` layers transformers' bitsandbytes loading quantises: all but the output head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [m for m in model.modules() if isinstance(m, nn.Linear) and m is not head]
