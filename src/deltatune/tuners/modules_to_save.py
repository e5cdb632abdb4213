"""modules_to_save: whole modules (typically a new classification head) trained in full per adapter.

The original module stays untouched; each adapter gets its own trainable copy, and the active
adapter's copy runs in its place::

    wrapper ── original_module            (frozen, used when adapters are disabled)
            └─ modules_to_save[<adapter>]  (trainable copy, saved with the adapter)
"""

from __future__ import annotations

import copy

from torch import nn

from deltatune.errors import ConfigError, TargetError
from deltatune.tuners.base import Tuner, replace_module
from deltatune.tuners.targeting import (
    CLASSIFIER_HEADS,
    CLASSIFIER_TASKS,
    shares_weight,
    walk_modules,
)


class ModulesToSaveWrapper(nn.Module):
    """Runs the active adapter's copy of a module, or the original when none is active."""

    is_delta_layer = True

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disabled = False

    @property
    def base_layer(self) -> nn.Module:
        return self.original_module

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save.keys())

    def add(self, name: str) -> None:
        trained = copy.deepcopy(self.original_module)
        trained.requires_grad_(True)
        self.modules_to_save[name] = trained

    def delete(self, name: str) -> None:
        if name in self.modules_to_save:  # ModuleDict.pop takes no default
            del self.modules_to_save[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def adapter_parameters(self, name: str):
        if name in self.modules_to_save:
            for pname, param in self.modules_to_save[name].named_parameters():
                yield f"modules_to_save.{name}.{pname}", param

    def current(self) -> nn.Module:
        """The module that runs now: the first active adapter's copy, else the original."""
        if self.disabled or not self.active_adapters:
            return self.original_module
        return self.modules_to_save[self.active_adapters[0]]

    def forward(self, *args, **kwargs):
        return self.current()(*args, **kwargs)


class ModulesToSaveTuner(Tuner):
    """Wraps the modules named in ``config.modules_to_save`` (any method's config may name some)."""

    layer_class = ModulesToSaveWrapper

    def inject(self, model: nn.Module, config, adapter_name: str) -> None:
        wanted = config.modules_to_save or []
        names = [name for name, _ in walk_modules(model) if any(_selects(entry, name) for entry in wanted)]
        # both head names are added for classification tasks; a model has one of them
        optional = CLASSIFIER_HEADS if config.task_type in CLASSIFIER_TASKS else ()
        for entry in wanted:
            if entry not in optional and not any(_selects(entry, name) for name in names):
                raise TargetError(f"modules_to_save entry {entry!r} matches no module of this model; check the name")
        tied = (
            [name for name in names if shares_weight(model, name)]
            if getattr(config, "ensure_weight_tying", False)
            else []
        )
        if tied:
            raise ConfigError(
                f"ensure_weight_tying=True with the tied {tied[0]} in modules_to_save is not supported (peft trains "
                f"one copy for both tied modules); drop ensure_weight_tying to train {tied[0]}'s copy on its own"
            )
        for name in names:
            module = model.get_submodule(name)
            if not isinstance(module, ModulesToSaveWrapper):
                module = replace_module(model, name, ModulesToSaveWrapper(module))
            module.add(adapter_name)

    def keep_trained(self, model: nn.Module) -> None:
        """Replace each wrapper by the module that runs now (what ``merge_and_unload`` keeps)."""
        for name, wrapper in list(self.layers(model)):
            replace_module(model, name, wrapper.current())


def _selects(entry: str, name: str) -> bool:
    """peft's rule: a modules_to_save entry names a module by its last components."""
    return name == entry or name.endswith("." + entry)
