"""The LoRA tuner: wraps the targeted modules in LoRA layers (``lora.py``), merges, unmerges and removes them.

After every change of which modules carry LoRA it re-syncs the fused gated-MLP forwards
(``lora_mlp.py``), so an MLP fuses exactly while one of its projections is a LoRA layer.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..config import LoraConfig
from ..errors import ConfigError, MergeError
from ..targeting import find_targets, pattern_value
from .base import Tuner, replace_module
from .lora import LoraLayer, LoraLinear
from .lora_conv import LoraConv2d
from .lora_embedding import LoraEmbedding
from .lora_mlp import sync_fused_mlps


def _layer_class(module: nn.Module) -> type[LoraLayer]:
    if isinstance(module, (nn.Linear, Conv1D)):
        return LoraLinear
    if isinstance(module, nn.Embedding):
        return LoraEmbedding
    if isinstance(module, nn.Conv2d):
        return LoraConv2d
    raise ConfigError(f"LoRA cannot wrap {type(module).__name__}")


class LoraTuner(Tuner):
    """Injects, switches, merges and removes LoRA adapters."""

    config_class = LoraConfig
    layer_class = LoraLayer

    def inject(self, model: nn.Module, config: LoraConfig, adapter_name: str) -> None:
        targets = find_targets(model, config)
        _sync_fan_in_fan_out(model, config, targets)
        plan = []
        for name in targets:  # validate everything before the model is touched
            module = model.get_submodule(name)
            rank = pattern_value(name, config.rank_pattern, config.r)
            _check_target(name, _base(module), rank)
            plan.append((name, module, rank, pattern_value(name, config.alpha_pattern, config.lora_alpha)))
        for name, module, rank, alpha in plan:
            if not isinstance(module, LoraLayer):
                module = replace_module(model, name, _layer_class(module)(module))
            module.add(adapter_name, rank, alpha, config)

    def refresh(self, model: nn.Module) -> None:
        """Gated MLPs with a LoRA projection (and no other wrapper on one) run fused; the others as they are."""
        sync_fused_mlps(model)

    def unload(self, model: nn.Module) -> None:
        super().unload(model)
        sync_fused_mlps(model)

    def trained_base_parameters(self, model: nn.Module, config: LoraConfig, adapter_name: str) -> dict[str, nn.Parameter]:
        """``bias="all"``: every bias of the model; ``"lora_only"``: biases of the adapted layers."""
        if config.bias == "all":
            return {
                name: param
                for name, param in model.named_parameters()
                if name.endswith("bias") and ".original_module." not in name and ".modules_to_save." not in name
            }
        if config.bias == "lora_only":
            return {
                f"{name}.base_layer.bias": layer.base_layer.bias
                for name, layer in self.layers(model)
                if adapter_name in layer.adapter_names and getattr(layer.base_layer, "bias", None) is not None
            }
        return {}

    def optional_file_parameters(self, model: nn.Module, adapter_name: str) -> dict[str, nn.Parameter]:
        """peft saves the full base weight of an adapted embedding (to carry resized vocabularies)."""
        return {
            f"{name}.base_layer.weight": layer.base_layer.weight
            for name, layer in self.layers(model)
            if isinstance(layer, LoraEmbedding) and adapter_name in layer.adapter_names
        }

    def merge(self, model: nn.Module, adapter_names: list[str], safe_merge: bool = False) -> None:
        layers = list(self.layers(model))
        if safe_merge:  # check every layer before touching any, so a refusal changes nothing
            for layer_name, layer in layers:
                for name in layer.unmerged(adapter_names):
                    if not torch.isfinite(layer.base_layer.weight.data + layer.delta_weight(name)).all():
                        raise MergeError(
                            f"merging adapter {name!r} would put NaN/Inf into the weights of {layer_name}; "
                            f"nothing was changed (check the adapter's weights)"
                        )
        for _, layer in layers:
            layer.merge(adapter_names)

    def unmerge(self, model: nn.Module) -> None:
        for _, layer in self.layers(model):
            layer.unmerge()

    def is_merged(self, model: nn.Module) -> bool:
        return any(layer.merged_adapters for _, layer in self.layers(model))


def _check_target(name: str, base: nn.Module, rank: int) -> None:
    if isinstance(base, nn.Conv2d) and base.groups != 1:
        raise ConfigError(f"LoRA on grouped Conv2d {name} (groups={base.groups}) is not supported; exclude it")
    smallest = min(base.weight.flatten(1).shape)  # a Conv2d update is [out, in * kh * kw]
    if rank > smallest:
        raise ConfigError(
            f"r={rank} is larger than {name}'s smallest dimension {smallest}; use r <= {smallest} "
            f"(or a rank_pattern entry for this module)"
        )


def _sync_fan_in_fan_out(model: nn.Module, config: LoraConfig, targets: list[str]) -> None:
    """Conv1D stores [in, out]; record ``fan_in_fan_out=True`` as peft does, so saved files agree."""
    kinds = {isinstance(_base(model.get_submodule(name)), Conv1D) for name in targets}
    if True in kinds:
        config.fan_in_fan_out = True
    elif config.fan_in_fan_out:
        config.fan_in_fan_out = False


def _base(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, LoraLayer) else module
