"""The LoHa and LoKr tuners: wrap the targeted ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` modules, merge,
unmerge and remove the updates. One tuner class serves both; each family only names its config and layer."""

from __future__ import annotations

from torch import nn

from deltatune.errors import ConfigError
from deltatune.kernels.base_weight import is_quantized
from deltatune.tuners.base import Tuner, check_merges_finite, replace_module
from deltatune.tuners.lycoris.config import LoHaConfig, LoKrConfig, LycorisConfig
from deltatune.tuners.lycoris.layer import LYCORIS_BASES, LycorisLayer
from deltatune.tuners.lycoris.loha import LoHaLayer
from deltatune.tuners.lycoris.lokr import LoKrLayer
from deltatune.tuners.targeting import find_targets, pattern_value


class LycorisTuner(Tuner):
    """Injects, switches, merges and removes one LyCORIS family's adapters (``layer_class`` says which)."""

    config_class: type[LycorisConfig] = LycorisConfig
    layer_class: type[LycorisLayer] = LycorisLayer

    def inject(self, model: nn.Module, config: LycorisConfig, adapter_name: str) -> None:
        plan = []
        for name in find_targets(model, config):  # validate everything before the model is touched
            module = model.get_submodule(name)
            self._check_target(name, module.base_layer if isinstance(module, self.layer_class) else module)
            rank = pattern_value(name, config.rank_pattern, config.r)
            plan.append((name, module, rank, pattern_value(name, config.alpha_pattern, config.alpha)))
        for name, module, rank, alpha in plan:
            if not isinstance(module, self.layer_class):
                module = replace_module(model, name, self.layer_class(module))
            module.add(adapter_name, rank, alpha, config)

    def _check_target(self, name: str, base: nn.Module) -> None:
        method = self.config_class.__name__.removesuffix("Config")
        kind = type(base).__name__
        if not isinstance(base, LYCORIS_BASES):
            raise ConfigError(
                f"{method} cannot wrap {kind} {name}: it adapts nn.Linear, nn.Conv1d and nn.Conv2d (as peft does); "
                f"leave {name} out of target_modules"
            )
        if is_quantized(base.weight):
            raise ConfigError(f"{method} on a quantised {kind} ({name}) is not supported; load the model unquantised")
        if isinstance(base, (nn.Conv1d, nn.Conv2d)) and base.padding_mode != "zeros" and isinstance(base.padding, str):
            raise ConfigError(
                f"{method} on {kind} {name} with padding={base.padding!r} and padding_mode={base.padding_mode!r} is "
                f"not supported; use padding_mode='zeros' or numeric padding"
            )

    def merge(self, model: nn.Module, adapter_names: list[str], safe_merge: bool = False) -> None:
        layers = list(self.layers(model))
        if safe_merge:  # check every layer before touching any, so a refusal changes nothing
            check_merges_finite(layers, adapter_names)
        for _, layer in layers:
            layer.merge(adapter_names)


class LoHaTuner(LycorisTuner):
    config_class = LoHaConfig
    layer_class = LoHaLayer


class LoKrTuner(LycorisTuner):
    config_class = LoKrConfig
    layer_class = LoKrLayer
