"""A transformers model's weights as llama.cpp's tensors: GGUF names, GGUF layout, float32.

The output head is left out when it is the input embedding itself (tied weights): llama.cpp then
uses ``token_embd.weight`` for both, as transformers does. Llama-3 rope scaling travels as one
extra tensor, ``rope_freqs.weight``.
"""

from __future__ import annotations

import torch
from torch import nn

from deltatune.export.architectures import Architecture, TensorNamer
from deltatune.export.hparams import llama3_rope_factors

ROPE_FREQS = "rope_freqs.weight"


def model_tensors(model: nn.Module, architecture: Architecture) -> dict[str, torch.Tensor]:
    """``{gguf name: float32 tensor}`` of every weight of ``model`` (a ``ConfigError`` names the first
    tensor llama.cpp has no place for)."""
    namer = TensorNamer(architecture, model.config)
    embedding = model.get_input_embeddings().weight
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("lm_head.") and tensor.data_ptr() == embedding.data_ptr():
            continue
        gguf_name = namer.gguf_name(name)
        tensors[gguf_name] = namer.to_gguf_layout(name, tensor.detach().to(torch.float32)).contiguous()
    factors = llama3_rope_factors(model.config) if architecture.permute_qk else None
    if factors is not None:
        tensors[ROPE_FREQS] = factors
    return tensors
