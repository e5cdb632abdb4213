"""The LoRA tuner: wraps the targeted modules in LoRA layers (``lora.py``), merges, unmerges and removes them.

After every change of which modules carry LoRA it re-syncs the fused gated-MLP forwards
(``lora_mlp.py``), so an MLP fuses exactly while one of its projections is a LoRA layer.
"""

from __future__ import annotations

import math
import warnings

from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear
from transformers.pytorch_utils import Conv1D

from deltatune.errors import ConfigError
from deltatune.kernels.base_weight import is_quantized, logical_shape
from deltatune.tuners.base import Tuner, check_merges_finite, replace_module
from deltatune.tuners.lora.config import LoraConfig
from deltatune.tuners.lora.conv import CONV_TYPES, LoraConvNd
from deltatune.tuners.lora.embedding import LoraEmbedding
from deltatune.tuners.lora.init import check_initialisable
from deltatune.tuners.lora.layer import LoraLayer, LoraLinear
from deltatune.tuners.lora.mha import LoraMultiheadAttention
from deltatune.tuners.lora.mlp import sync_fused_mlps
from deltatune.tuners.lora.param import (
    inject_parameters,
    module_targets,
    parameter_targets,
)
from deltatune.tuners.lora.quantized import LoraQuantLinear
from deltatune.tuners.targeting import pattern_value, shares_weight, stores_fan_in_fan_out


def _layer_class(module: nn.Module) -> type[LoraLayer]:
    if isinstance(module, nn.Linear) and is_quantized(module.weight):  # bitsandbytes Linear4bit / Linear8bitLt
        return LoraQuantLinear
    if isinstance(module, (nn.Linear, Conv1D)):
        return LoraLinear
    if isinstance(module, nn.Embedding):
        return LoraEmbedding
    if isinstance(module, CONV_TYPES):
        return LoraConvNd
    if isinstance(module, nn.MultiheadAttention):
        return LoraMultiheadAttention
    raise ConfigError(f"LoRA cannot wrap {type(module).__name__}")


ROW_MIXING_LAYERS = (LoraLinear, LoraEmbedding, LoraConvNd)  # their input's first dimension is the batch


class LoraTuner(Tuner):
    """Injects, switches, merges and removes LoRA adapters."""

    config_class = LoraConfig
    layer_class = LoraLayer

    def row_mixing_refusal(self, model: nn.Module, config: LoraConfig, adapter_name: str) -> str | None:
        """LoRA and DoRA terms mix per row on linear, Conv1D, embedding and convolution layers; whole-module copies
        (``modules_to_save``), trainable token rows and attention or parameter targets apply to the whole batch."""
        if config.modules_to_save:
            return f"it trains whole modules ({', '.join(config.modules_to_save)}), which cannot differ per row"
        if config.trainable_token_indices:
            return "it trains embedding rows (trainable_token_indices), which cannot differ per row"
        for name, layer in self.layers(model):
            if adapter_name in layer.adapter_names and not isinstance(layer, ROW_MIXING_LAYERS):
                return f"it adapts {name} ({type(layer.base_layer).__name__}), a layer type not mixed per row"
        return None

    def inject(self, model: nn.Module, config: LoraConfig, adapter_name: str) -> None:
        targets = module_targets(model, config)
        sync_fan_in_fan_out(model, config, targets)
        plan = []
        for name in targets:  # validate everything before the model is touched
            module = model.get_submodule(name)
            rank = pattern_value(name, config.rank_pattern, config.r)
            _check_target(name, _base(module), rank, config)
            plan.append((name, module, rank, pattern_value(name, config.alpha_pattern, config.lora_alpha)))
        tied = [
            name
            for name in targets
            if isinstance(_base(model.get_submodule(name)), nn.Embedding)
            and config.ensure_weight_tying
            and shares_weight(model, name)
        ]
        if tied:
            raise ConfigError(
                f"ensure_weight_tying=True with LoRA on the tied embedding {tied[0]} is not supported (peft would tie "
                f"a LoRA on the output head to it); drop ensure_weight_tying, or leave {tied[0]} out of target_modules"
            )
        parameters = parameter_targets(model, config, targets)
        for name, module, rank, alpha in plan:
            if not isinstance(module, LoraLayer):
                module = replace_module(model, name, _layer_class(module)(module))
            module.add(adapter_name, rank, alpha, config)
        inject_parameters(model, parameters, adapter_name, config)

    def refresh(self, model: nn.Module) -> None:
        """Gated MLPs with a LoRA projection (and no other wrapper on one) run fused; the others as they are."""
        sync_fused_mlps(model)

    def unload(self, model: nn.Module) -> None:
        super().unload(model)
        sync_fused_mlps(model)

    def merge(self, model: nn.Module, adapter_names: list[str], safe_merge: bool = False) -> None:
        layers = list(self.layers(model))
        for _, layer in layers:  # a layer that cannot merge refuses before any other has merged
            if layer.unmerged(adapter_names):
                layer.check_mergeable()
        if safe_merge:  # check every layer before touching any, so a refusal changes nothing
            check_merges_finite(layers, adapter_names)
        for _, layer in layers:
            layer.merge(adapter_names)


def _check_target(name: str, base: nn.Module, rank: int, config: LoraConfig) -> None:
    """Refuse, as peft does, what this layer type cannot carry; warn about a rank above the layer's."""
    kind = type(base).__name__
    if isinstance(base, nn.MultiheadAttention):
        _check_attention(name, base, config)
    elif isinstance(base, NonDynamicallyQuantizableLinear):  # only ever a MultiheadAttention's out_proj
        raise ConfigError(
            f"{name} is a MultiheadAttention's out_proj, whose forward the attention never calls; target the "
            f"MultiheadAttention itself (its LoRA covers out_proj) and leave {name} out"
        )
    elif config.lora_bias and (isinstance(base, nn.Embedding) or base.bias is None):
        why = "peft has no B bias for embeddings" if isinstance(base, nn.Embedding) else "it has no bias to merge into"
        raise ConfigError(f"lora_bias=True does not work on {kind} {name} ({why}); exclude it or set lora_bias=False")
    if isinstance(base, CONV_TYPES) and rank % base.groups:
        raise ConfigError(
            f"{kind} {name} has groups={base.groups}: LoRA needs a rank divisible by it (as in peft), "
            f"not r={rank}; change r or add a rank_pattern entry"
        )
    weight = base.in_proj_weight if isinstance(base, nn.MultiheadAttention) else base.weight
    if is_quantized(weight) and config.init_lora_weights not in (True, False, "gaussian", "orthogonal"):
        raise ConfigError(
            f"init_lora_weights={config.init_lora_weights!r} rewrites the base weight, which is quantised in {kind} "
            f"{name}; use True, False, 'gaussian' or 'orthogonal' over a quantised base"
        )
    check_initialisable(config.init_lora_weights, base, rank)
    shape = logical_shape(weight)  # a 4-bit weight's .shape is its packed storage
    smallest = min(shape[0], math.prod(shape[1:]))  # a convolution's update is [out, in * k…]
    if rank > smallest:  # allowed, as in peft (its files must load), but the extra rank buys nothing
        warnings.warn(
            f"r={rank} is larger than {name}'s smallest dimension {smallest}: the update's rank is at most "
            f"{smallest}, so r <= {smallest} trains the same model with fewer parameters",
            stacklevel=3,
        )


def _check_attention(name: str, base: nn.MultiheadAttention, config: LoraConfig) -> None:
    """peft's limits for MultiheadAttention: packed q/k/v of one size, a Linear out_proj, plain inits, no DoRA,
    no lora_bias."""
    if not base._qkv_same_embed_dim:
        raise ConfigError(f"LoRA on MultiheadAttention {name} needs kdim = vdim = embed_dim (as in peft); exclude it")
    if not isinstance(_base(base.out_proj), nn.Linear):
        raise ConfigError(f"LoRA on MultiheadAttention {name} needs an nn.Linear out_proj; exclude it")
    if config.init_lora_weights not in (True, False, "gaussian"):
        raise ConfigError(
            f"init_lora_weights={config.init_lora_weights!r} does not work on MultiheadAttention {name} (as in peft); "
            f"use True, False or 'gaussian'"
        )
    for option in ("use_dora", "lora_bias"):
        if getattr(config, option):
            raise ConfigError(
                f"{option}=True does not work on MultiheadAttention {name} (as in peft); "
                f"exclude it or set {option}=False"
            )


def sync_fan_in_fan_out(model: nn.Module, config: LoraConfig, targets: list[str]) -> None:
    """Conv1D stores [in, out]; record ``fan_in_fan_out=True`` as peft does, so saved files agree."""
    config.fan_in_fan_out = stores_fan_in_fan_out(model, targets)


def _base(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, LoraLayer) else module
