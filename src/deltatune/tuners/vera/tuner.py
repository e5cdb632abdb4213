"""The VeRA tuner: draws the shared projections, wraps the targeted modules in ``VeraLayer``s (``layer.py``),
merges and removes them, and puts the projections in the adapter file.

As in peft, the projections are drawn once, by the first VeRA adapter of a model, for the largest shape it
adapts; every later adapter uses the same pair, so it must have the same ``projection_prng_key``,
``save_projection`` and ``r``, and adapt no layer wider than the pair (peft refuses the same cases).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from deltatune.errors import ConfigError
from deltatune.tuners.base import replace_module
from deltatune.tuners.targeting import find_targets, stores_fan_in_fan_out
from deltatune.tuners.vector_layer import VectorTuner, checked_base, linear_features
from deltatune.tuners.vera.config import VeraConfig
from deltatune.tuners.vera.layer import VERA_TYPES, VeraLayer, VeraProjections

# peft's file keys of the shared pair: held by its VeraModel, one level above the wrapped model.
PROJECTION_KEYS = {"vera_A": "base_model.vera_A", "vera_B": "base_model.vera_B"}

# Where peft's VeRA defaults differ from LoRA's per-architecture target_modules (``targeting.DEFAULT_TARGET_MODULES``).
VERA_TARGET_MODULES = {"phi": ["q_proj", "v_proj"]}


class VeraTuner(VectorTuner):
    """Injects, switches, merges and removes VeRA adapters."""

    config_class = VeraConfig
    layer_class = VeraLayer

    def inject(self, model: nn.Module, config: VeraConfig, adapter_name: str) -> None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        spec = config
        if config.target_modules is None and model_type in VERA_TARGET_MODULES:
            spec = dataclasses.replace(config, target_modules=VERA_TARGET_MODULES[model_type])
        targets = find_targets(model, spec)
        config.fan_in_fan_out = stores_fan_in_fan_out(model, targets)
        features = {}  # name -> (in, out); validated before the model is touched
        for name in targets:
            module = model.get_submodule(name)
            base = checked_base("VeRA", name, module, VeraLayer, VERA_TYPES, "nn.Linear and Conv1D")
            features[name] = linear_features(base)
        projections = self.projections(model)
        if projections is None:
            widest_in = max(fan_in for fan_in, _ in features.values())
            widest_out = max(fan_out for _, fan_out in features.values())
            weight = model.get_submodule(targets[0]).weight
            projections = VeraProjections(config, widest_in, widest_out, weight)
        else:
            check_shared(projections, config, features)
        for name in targets:
            module = model.get_submodule(name)
            if not isinstance(module, VeraLayer):
                module = replace_module(model, name, VeraLayer(module, projections))
            module.add(adapter_name, config)

    def projections(self, model: nn.Module) -> VeraProjections | None:
        """The pair the model's VeRA layers share; None while it has none."""
        return next((layer.vera_projections for _, layer in self.layers(model)), None)

    def file_targets(
        self, model: nn.Module, adapter_name: str, state: dict[str, nn.Parameter]
    ) -> dict[str, torch.Tensor]:
        """The λ vectors under peft's keys, and with ``save_projection`` the shared pair under
        ``base_model.vera_A`` / ``base_model.vera_B``."""
        targets = super().file_targets(model, adapter_name, state)
        projections = self.projections(model)
        if projections is not None and projections.save_projection:
            targets.update({key: getattr(projections, name) for name, key in PROJECTION_KEYS.items()})
        return targets


def check_shared(projections: VeraProjections, config: VeraConfig, features: dict[str, tuple[int, int]]) -> None:
    """Refuse a further adapter that cannot use the pair the model's first VeRA adapter drew (as peft does)."""
    for field, held in (
        ("projection_prng_key", projections.projection_prng_key),
        ("save_projection", projections.save_projection),
        ("r", projections.r),
    ):
        if getattr(config, field) != held:
            raise ConfigError(
                f"{field}={getattr(config, field)!r} differs from the {held!r} of the VeRA projections this model "
                f"already holds; all VeRA adapters of a model share them (as in peft): set {field}={held!r}"
            )
    for name, (fan_in, fan_out) in features.items():
        for size, needed, what in (
            (projections.vera_A.shape[1], fan_in, "vera_A's input width"),
            (projections.vera_B.shape[0], fan_out, "vera_B's output width"),
        ):
            if size < needed:
                raise ConfigError(
                    f"{name} needs {what} >= {needed} but the shared projections have {size} (drawn for the first "
                    f"VeRA adapter's layers); add the adapter with the widest layers first, as in peft"
                )
