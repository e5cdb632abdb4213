"""The OFT tuner: wraps the targeted Linear / Conv2d / Embedding modules in OFT layers, merges and removes them.

Block sizes follow peft: ``oft_block_size`` (or the layer width / ``r``) when it divides the width a layer
rotates, else the nearest divisor (the smaller one on a tie), with a warning, so peft's files fit.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from deltatune.errors import MergeError, TargetError
from deltatune.kernels.base_weight import is_quantized
from deltatune.tuners.base import Tuner, replace_module
from deltatune.tuners.oft.config import OFTConfig
from deltatune.tuners.oft.layer import OFTConv2d, OFTEmbedding, OFTLayer, OFTLinear
from deltatune.tuners.targeting import find_targets

_LAYERS: dict[type[nn.Module], type[OFTLayer]] = {
    nn.Linear: OFTLinear,
    nn.Conv2d: OFTConv2d,
    nn.Embedding: OFTEmbedding,
}


def nearest_divisor(width: int, wanted: int) -> int:
    """The divisor of ``width`` nearest to ``wanted`` (the smaller on a tie; ``width`` itself when
    ``wanted`` >= ``width``): peft's rule for a block count or size that does not divide the width."""
    if wanted >= width:
        return width
    lower = next(d for d in range(wanted, 0, -1) if width % d == 0)
    higher = next(d for d in range(wanted, width + 1) if width % d == 0)
    return lower if wanted - lower <= higher - wanted else higher


def block_size_for(name: str, width: int, config: OFTConfig) -> int:
    """b for module ``name`` rotating ``width`` features: ``oft_block_size``, or ``width / r``."""
    field, wanted = ("r", config.r) if config.r else ("oft_block_size", config.oft_block_size)
    used = wanted if width % wanted == 0 else nearest_divisor(width, wanted)
    if used != wanted:
        warnings.warn(
            f"{field}={wanted} does not divide {name}'s {width} rotated features; {name} uses {field}={used} "
            f"(the nearest divisor, as peft does)",
            stacklevel=3,
        )
    return width // used if config.r else used


class OFTTuner(Tuner):
    """Injects, switches, merges and removes OFT adapters."""

    config_class = OFTConfig
    layer_class = OFTLayer

    def inject(self, model: nn.Module, config: OFTConfig, adapter_name: str) -> None:
        if config.fan_in_fan_out:
            warnings.warn(
                "fan_in_fan_out=True, but OFT wraps only [out, in] layers (nn.Linear, nn.Conv2d) and embeddings; "
                "setting fan_in_fan_out=False, as peft does",
                stacklevel=3,
            )
            config.fan_in_fan_out = False
        plan = []
        for name in find_targets(model, config):  # validate everything before the model is touched
            module = model.get_submodule(name)
            base = module.base_layer if isinstance(module, OFTLayer) else module
            layer_class = _layer_class(name, base)
            features = base.weight[0].numel() if layer_class is not OFTEmbedding else base.embedding_dim
            plan.append((name, module, layer_class, block_size_for(name, features, config)))
        for name, module, layer_class, block_size in plan:
            if not isinstance(module, OFTLayer):
                module = replace_module(model, name, layer_class(module))
            module.add(adapter_name, block_size, config)

    def merge(self, model: nn.Module, adapter_names: list[str], safe_merge: bool = False) -> None:
        layers = list(self.layers(model))
        if safe_merge:  # check every layer before touching any, so a refusal changes nothing
            for layer_name, layer in layers:
                if layer.unmerged(adapter_names) and not torch.isfinite(layer.merged_weight(adapter_names)).all():
                    raise MergeError(
                        f"merging {adapter_names} would put NaN/Inf into the weights of {layer_name}; nothing was "
                        f"changed (check the adapter's weights)"
                    )
        for _, layer in layers:
            layer.merge(adapter_names)


def _layer_class(name: str, base: nn.Module) -> type[OFTLayer]:
    """The OFT layer for ``base``; a TargetError, naming why, for what peft 0.21.2's OFT does not wrap."""
    if isinstance(base, nn.Linear) and is_quantized(base.weight):
        raise TargetError(f"OFT on a quantised layer ({name}) is not supported; load the model unquantised")
    layer_class = next((layer for kind, layer in _LAYERS.items() if isinstance(base, kind)), None)
    if layer_class is None:
        raise TargetError(
            f"target {name!r} is a {type(base).__name__}; OFT adapts nn.Linear, nn.Conv2d and nn.Embedding (as peft "
            f"0.21.2 does); leave it out of target_modules"
        )
    if isinstance(base, nn.Conv2d):
        if base.groups != 1:
            raise TargetError(
                f"OFT on a grouped Conv2d ({name}, groups={base.groups}) is not supported: its rotation mixes every "
                f"input channel, which no grouped kernel holds (peft cannot merge it either); leave it out"
            )
        if base.kernel_size[0] != base.kernel_size[1]:
            raise TargetError(
                f"OFT on Conv2d {name} needs a square kernel (peft's layer assumes one), not {base.kernel_size}"
            )
        if base.dilation != (1, 1):
            raise TargetError(f"OFT on Conv2d {name} with dilation {base.dilation} is not supported (as in peft)")
    return layer_class
