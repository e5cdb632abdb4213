"""The hyper-parameters llama.cpp reads from a GGUF file, taken from a transformers config.

llama.cpp rebuilds the network from these keys alone (``<arch>.context_length``, head counts,
norm epsilon, rope base and scaling ...), so a missing or wrong one changes the model silently:
transformers 5 keeps the rope base in ``config.rope_parameters["rope_theta"]`` (older configs in
``config.rope_theta``), and a GGUF without ``rope.freq_base`` runs with llama.cpp's default 10000.
"""

from __future__ import annotations

import math

import gguf
import torch

from deltatune.errors import ConfigError

GLU_ACTIVATIONS = ("silu",)  # llama, mistral and qwen run SwiGLU in llama.cpp
GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # llama.cpp's GPT-2 uses the tanh GELU


def llama_hparams(writer: gguf.GGUFWriter, config) -> None:
    """Keys of llama.cpp's llama / qwen2 / qwen3 architectures (RMSNorm, SwiGLU, rotary positions)."""
    _require(config, "hidden_act", GLU_ACTIVATIONS)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    _rope(writer, config)


def gpt2_hparams(writer: gguf.GGUFWriter, config) -> None:
    """Keys of llama.cpp's GPT-2 architecture (LayerNorm, GELU MLP, learned positions)."""
    _require(config, "activation_function", GPT2_ACTIVATIONS)
    if getattr(config, "scale_attn_by_inverse_layer_idx", False) or not getattr(config, "scale_attn_weights", True):
        raise ConfigError(
            "this GPT-2 scales attention differently from llama.cpp's GPT-2 "
            "(scale_attn_by_inverse_layer_idx / scale_attn_weights); it cannot be exported"
        )
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.n_positions)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)


def rope_parameters(config) -> dict:
    """The rope settings of a config: transformers 5's ``rope_parameters``, else the older flat keys."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if "rope_theta" not in params and not any(isinstance(value, dict) for value in params.values()):
        params["rope_theta"] = getattr(config, "rope_theta", 10000.0)
        params.update(getattr(config, "rope_scaling", None) or {})
    if "rope_theta" not in params:
        raise ConfigError(
            "this model has per-layer rope settings (rope_parameters by layer type), which "
            "llama.cpp's llama/qwen architectures cannot express"
        )
    return params


def llama3_rope_factors(config) -> torch.Tensor | None:
    """llama.cpp's ``rope_freqs`` tensor for Llama-3 rope scaling: per frequency, the factor its
    wavelength is divided by (1 for short wavelengths, ``factor`` for long ones, smooth between)."""
    params = rope_parameters(config)
    if params.get("rope_type", params.get("type")) != "llama3":
        return None
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    freqs = 1.0 / (params["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    old_context = params["original_max_position_embeddings"]
    wavelengths = 2 * math.pi / freqs
    smooth = (old_context / wavelengths - low) / (high - low)
    between = 1.0 / ((1 - smooth) / factor + smooth)
    long = torch.where(wavelengths > old_context / low, factor, between)
    factors = torch.where(wavelengths < old_context / high, 1.0, long)
    return factors.to(torch.float32)


def _rope(writer: gguf.GGUFWriter, config) -> None:
    params = rope_parameters(config)
    writer.add_rope_freq_base(float(params["rope_theta"]))
    if params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) != 1.0:
        raise ConfigError("partial_rotary_factor != 1 is not supported by llama.cpp's llama/qwen architectures")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(params["factor"]))
        original = params.get("original_max_position_embeddings") or config.max_position_embeddings
        writer.add_rope_scaling_orig_ctx_len(int(original))
    elif kind not in ("default", "llama3"):  # llama3 travels as the rope_freqs tensor
        raise ConfigError(
            f"rope_type={kind!r} has no llama.cpp equivalent here; supported: default, linear, yarn, llama3"
        )


def _require(config, key: str, allowed: tuple[str, ...]) -> None:
    value = getattr(config, key, None)
    if value not in allowed:
        raise ConfigError(
            f"{key}={value!r} differs from what llama.cpp runs for {config.model_type} "
            f"({', '.join(allowed)}); this model cannot be exported to GGUF"
        )
