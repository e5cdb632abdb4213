"""The IA3 tuner: wraps the targeted modules in ``IA3Layer``s (``layer.py``), merges and removes them."""

from __future__ import annotations

import re

from torch import nn

from deltatune.errors import ConfigError
from deltatune.tuners.base import replace_module
from deltatune.tuners.ia3.config import IA3Config, resolved
from deltatune.tuners.ia3.layer import IA3_TYPES, IA3Layer
from deltatune.tuners.targeting import find_targets, stores_fan_in_fan_out
from deltatune.tuners.vector_layer import VectorTuner, checked_base


def is_feedforward(name: str, feedforward_modules: list[str] | str) -> bool:
    """peft's rule: a regex string must fullmatch the full module name; a list entry must end it."""
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, name) is not None
    return any(name.endswith(entry) for entry in feedforward_modules)


class IA3Tuner(VectorTuner):
    """Injects, switches, merges and removes IA3 adapters."""

    config_class = IA3Config
    layer_class = IA3Layer

    def inject(self, model: nn.Module, config: IA3Config, adapter_name: str) -> None:
        config = resolved(config, getattr(getattr(model, "config", None), "model_type", None))
        targets = find_targets(model, config)
        config.fan_in_fan_out = stores_fan_in_fan_out(model, targets)
        plan = []
        for name in targets:  # validate everything before the model is touched
            module = model.get_submodule(name)
            checked_base("IA3", name, module, IA3Layer, IA3_TYPES, "nn.Linear, Conv1D, nn.Conv2d and nn.Conv3d")
            feedforward = is_feedforward(name, config.feedforward_modules)
            if isinstance(module, IA3Layer) and module.is_feedforward != feedforward:
                held = "input" if module.is_feedforward else "output"
                raise ConfigError(
                    f"{name} already scales its {held} for adapter(s) {', '.join(module.adapter_names)}; every IA3 "
                    f"adapter on a module must agree on feedforward_modules (peft keeps the first one's)"
                )
            plan.append((name, module, feedforward))
        for name, module, feedforward in plan:
            if not isinstance(module, IA3Layer):
                module = replace_module(model, name, IA3Layer(module, feedforward))
            module.add(adapter_name, config)
