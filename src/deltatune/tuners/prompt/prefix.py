"""Prefix tuning (Li & Liang, 2021, arXiv:2101.00190): trainable keys and values before every layer's own.

::

    attention_l(x) = softmax(q [K_p,l; K_l]^T / sqrt(head_dim)) [V_p,l; V_l]     K_p,l, V_p,l: [kv_heads, n, head_dim]

All layers' prefixes are one tensor P [n, num_layers * 2 * kv_dim] (peft's layout: each row holds
layer 0's key, layer 0's value, layer 1's key, ..., each kv_heads x head_dim), reshaped per call
into the key/value pairs of a transformers ``Cache`` whose first n positions are the prefix; the
attention mask grows by n ones. kv_dim = kv_heads * head_dim, so a grouped-query model gets its
smaller prefix. With ``prefix_projection`` P = MLP(E), E [n, token_dim] (tanh): the paper's
reparameterisation; only P is saved, and without gradients P is computed once and reused.

Started from real tokens (``prompt_tuning_init`` "TEXT" / "SAMPLE_VOCAB"; Li & Liang's init from
the activations of real words), P is the frozen model's own keys and values for those n tokens at
positions 0..n-1 (``token_activations``): the untrained adapter gives exactly the base model's
output for [tokens; x]. With ``prefix_projection`` P = P0 + MLP(E), P0 those activations (a fixed
buffer) and the MLP's last layer at zero; the file holds P, which is all peft ever loads.

Gradient checkpointing: transformers drops the cache of a checkpointed layer, because replaying
the layer in the backward pass would write to it a second time. A call that returns no cache (a
training step) gets the prefix as a read-only ``PrefixCache`` instead, which is safe to replay, and
the checkpointed layers of a model with a prefix adapter are told to keep their cache. Some models
(GPT-2) also drop the cache before their layers when checkpointing: for such a call their
model-level switch is off, while the layers go on checkpointing themselves.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.modeling_layers import GradientCheckpointingLayer

from deltatune.compat.transformers import CACHE
from deltatune.errors import ConfigError
from deltatune.tuners.prompt.config import PrefixTuningConfig
from deltatune.tuners.prompt.learning import (
    ATTRIBUTE,
    PromptEncoder,
    PromptLayer,
    PromptLearningTuner,
    attention_shape,
    init_token_ids,
    mlp,
    starts_from_tokens,
    zero_last_layer,
)

_KEEPS_CACHE = "_can_checkpoint_with_cache"  # GradientCheckpointingLayer's switch to keep a cache


class PrefixCacheLayer(DynamicLayer):
    """One layer's prefix: ``update`` returns [prefix; new] keys and values and stores nothing."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.lazy_initialization(keys, values)
        self.keys, self.values = keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


class PrefixCache(Cache):
    """A read-only cache of the prefix, for calls that return no cache (same result when replayed)."""

    def __init__(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        super().__init__(layers=[PrefixCacheLayer(keys, values) for keys, values in pairs])


class PrefixLayer(PromptLayer):
    """Hands the prefix to the model as the first n positions of its key/value cache."""

    def __init__(self) -> None:
        super().__init__()
        self._paused: list[nn.Module] = []  # model-level checkpointing switches turned off for one call

    def attach(self, model: nn.Module) -> None:
        super().attach(model)
        for module in model.modules():
            if isinstance(module, GradientCheckpointingLayer):
                setattr(module, _KEEPS_CACHE, True)

    def detach(self, model: nn.Module) -> None:
        super().detach(model)
        for module in model.modules():
            if _KEEPS_CACHE in vars(module):
                delattr(module, _KEEPS_CACHE)

    def add_prompt(self, model: nn.Module, prompt: torch.Tensor, kwargs: dict[str, Any]) -> None:
        tokens = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        config = self.configs[self.active_adapters[0]]  # one model, one layout: every adapter's is the same
        pairs = prefix_pairs(prompt.to(model.dtype), config, tokens.shape[0])
        cache = kwargs.get(CACHE)
        if cache is not None:  # an empty cache handed in (generate's): the prefix becomes its start
            for index, (keys, values) in enumerate(pairs):
                cache.update(keys, values, index)
        elif _returns_cache(model, kwargs):
            kwargs[CACHE] = DynamicCache(pairs)
        else:
            kwargs[CACHE] = PrefixCache(pairs)
            self._pause_model_checkpointing(model)

    def _pause_model_checkpointing(self, model: nn.Module) -> None:
        """Turn off, for this call, the checkpointing switches outside the layers (GPT-2 drops the cache there)."""
        self._resume()
        self._paused = [
            module
            for module in model.modules()
            if getattr(module, "gradient_checkpointing", False) is True
            and not isinstance(module, GradientCheckpointingLayer)
        ]
        for module in self._paused:
            module.gradient_checkpointing = False

    def _after_forward(self, model: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any):
        self._resume()
        return None

    def _resume(self) -> None:
        for module in self._paused:
            module.gradient_checkpointing = True
        self._paused = []


class PrefixTuner(PromptLearningTuner):
    """Prefix tuning: P = E [n, L * 2 * kv_dim], or P = MLP(E) with ``prefix_projection`` (in training)."""

    config_class = PrefixTuningConfig
    layer_class = PrefixLayer

    def describe_model(self, config: PrefixTuningConfig, model: nn.Module) -> None:
        """peft's fields with its grouped-query rule: token_dim = kv_heads * head_dim, num_attention_heads =
        kv_heads."""
        shape = attention_shape(model)
        config.token_dim = config.token_dim or shape.kv_heads * shape.head_dim
        config.num_attention_heads = config.num_attention_heads or shape.kv_heads
        super().describe_model(config, model)
        config.encoder_hidden_size = config.encoder_hidden_size or config.token_dim
        expected = (shape.layers, shape.kv_heads * shape.head_dim, shape.kv_heads)
        if (config.num_layers, config.token_dim, config.num_attention_heads) != expected:
            raise ConfigError(
                f"the adapter has num_layers={config.num_layers}, token_dim={config.token_dim}, "
                f"num_attention_heads={config.num_attention_heads} but the model needs {expected[0]}, {expected[1]}, "
                f"{expected[2]} (layers, kv_heads * head_dim, kv_heads); wrong base model, or leave these unset"
            )

    def build_encoder(self, model: nn.Module, config: PrefixTuningConfig) -> PromptEncoder:
        count, width = config.num_virtual_tokens, config.num_layers * 2 * config.token_dim
        start = token_activations(model, config) if starts_from_tokens(config) else None
        if config.prefix_projection and not config.inference_mode:
            embedding = nn.Embedding(count, config.token_dim)
            head = mlp([config.token_dim, config.encoder_hidden_size, width], nn.Tanh)
            if config.init_weights == "zero" or start is not None:
                zero_last_layer(head)
            return PromptEncoder(embedding, head, offset=start)
        if start is not None:
            return PromptEncoder(nn.Embedding.from_pretrained(start, freeze=False))
        embedding = nn.Embedding(count, width)
        if config.init_weights == "zero":
            nn.init.zeros_(embedding.weight)
        return PromptEncoder(embedding)


def prefix_pairs(
    prompt: torch.Tensor, config: PrefixTuningConfig, batch: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer, each [batch, kv_heads, n, head_dim], from P [n, L * 2 * kv_dim]."""
    heads = config.num_attention_heads
    grid = prompt.view(prompt.shape[0], config.num_layers, 2, heads, config.token_dim // heads)
    grid = grid.permute(1, 2, 3, 0, 4)  # [L, 2, kv_heads, n, head_dim]
    return [(layer[0].expand(batch, -1, -1, -1), layer[1].expand(batch, -1, -1, -1)) for layer in grid]


def token_activations(model: nn.Module, config: PrefixTuningConfig) -> torch.Tensor:
    """P0 [n, L * 2 * kv_dim] (fp32): the frozen model's keys and values for ``init_token_ids`` at
    positions 0..n-1, every layer's, in the prefix layout (the inverse of ``prefix_pairs``)."""
    ids = init_token_ids(model, config)[None]
    layer = getattr(model, ATTRIBUTE, None)  # other prompt adapters must not take part
    was_training, was_disabled = model.training, layer is not None and layer.disabled
    if layer is not None:
        layer.disabled = True
    model.eval()
    try:
        with torch.no_grad():
            cache = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True).get(CACHE)
    finally:
        model.train(was_training)
        if layer is not None:
            layer.disabled = was_disabled
    if not isinstance(cache, Cache) or len(cache.layers) != config.num_layers:
        raise ConfigError(
            f"{type(model).__name__} returns no key/value cache of {config.num_layers} layers, which "
            f"prompt_tuning_init={config.prompt_tuning_init!r} reads the prefix from; use prompt_tuning_init='RANDOM'"
        )
    pairs = torch.stack([torch.stack([entry.keys[0], entry.values[0]]) for entry in cache.layers])  # [L, 2, h, n, d]
    return pairs.permute(3, 0, 1, 2, 4).reshape(ids.shape[1], -1).float()


def _returns_cache(model: nn.Module, kwargs: dict[str, Any]) -> bool:
    """Whether this call gives back a cache to continue from: ``use_cache`` (default: the model's),
    which transformers switches off for a training step with gradient checkpointing."""
    use_cache = kwargs.get("use_cache")
    if use_cache is None:
        use_cache = getattr(model.config, "use_cache", False)
    checkpointing = (
        model.training
        and torch.is_grad_enabled()
        and any(getattr(module, "gradient_checkpointing", False) for module in model.modules())
    )
    return bool(use_cache) and not checkpointing
