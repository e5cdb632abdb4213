"""Layers whose adapters are a few tensors per wrapped module, kept in ``nn.ParameterDict``s keyed by adapter
name (IA3's ``ia3_l``, VeRA's ``vera_lambda_b`` / ``vera_lambda_d``), and the tuner that merges them.

The layer contract (``base.DeltaLayer``: activation, deletion, merge bookkeeping) is shared with the other families;
a family says which dicts it keeps (``vector_names``), what its forward adds, and what merging writes
into the base layer (``merged_tensors``: the new values of the base's ``weight`` and maybe ``bias``)::

    merge:    base.weight ← merged_tensors(name)["weight"]   (and "bias" where the family changes it)
    unmerge:  base.weight ← merged_tensors(name, undo=True)["weight"], newest adapter first
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from deltatune.errors import ConfigError, MergeError
from deltatune.kernels.base_weight import is_quantized
from deltatune.tuners.base import DeltaLayer, Tuner


def linear_features(base: nn.Linear | Conv1D) -> tuple[int, int]:
    """(in, out) of an ``nn.Linear`` (weight [out, in]) or a GPT-2 ``Conv1D`` (weight [in, out])."""
    rows, columns = base.weight.shape
    return (rows, columns) if isinstance(base, Conv1D) else (columns, rows)


def check_unquantized(method: str, name: str, base: nn.Module) -> None:
    """Refuse a 4-/8-bit base layer, which these families do not wrap (LoRA does: QLoRA)."""
    if is_quantized(base.weight):
        raise ConfigError(
            f"{method} on the quantised layer {name} ({type(base).__name__}) is not supported by deltatune; "
            f"load the model unquantised or use LoRA (QLoRA) on it"
        )


def checked_base(method: str, name: str, module: nn.Module, layer_class: type, types: tuple, adapts: str) -> nn.Module:
    """The base layer of target ``name`` (``module`` itself, or the base of the ``layer_class`` already wrapping
    it), refused by name unless it is one of ``types`` (``adapts`` says which, for the message) and unquantised."""
    base = module.base_layer if isinstance(module, layer_class) else module
    if not isinstance(base, types):
        raise ConfigError(
            f"{method} cannot wrap {name} ({type(base).__name__}); as in peft it adapts {adapts}: "
            f"leave {name} out of target_modules"
        )
    check_unquantized(method, name, base)
    return base


class VectorLayer(DeltaLayer):
    """A base layer plus named adapters held in the ParameterDicts ``vector_names``."""

    vector_names: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        for attribute in self.vector_names:
            setattr(self, attribute, nn.ParameterDict())

    @property
    def adapter_names(self) -> list[str]:
        return list(getattr(self, self.vector_names[0]))

    def adapter_parameters(self, name: str) -> Iterator[tuple[str, nn.Parameter]]:
        """(name relative to this layer, parameter) of adapter ``name``: ``<dict>.<adapter>``."""
        for attribute in self.vector_names:
            vectors = getattr(self, attribute)
            if name in vectors:
                yield f"{attribute}.{name}", vectors[name]

    def delete(self, name: str) -> None:
        self.forget(name)
        for attribute in self.vector_names:
            vectors = getattr(self, attribute)
            if name in vectors:  # ParameterDict.pop takes no default
                del vectors[name]

    def merged_tensors(self, name: str, undo: bool = False) -> dict[str, torch.Tensor]:
        """Base parameter name ("weight", "bias") -> its value with adapter ``name`` merged in (taken out
        again with ``undo``), as new tensors in the parameter's dtype."""
        raise NotImplementedError

    def merge(self, names: list[str]) -> None:
        for name in self.unmerged(names):
            self._write(self.merged_tensors(name))
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            self._write(self.merged_tensors(self.merged_adapters[-1], undo=True))
            self.merged_adapters.pop()

    def _write(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for attribute, value in tensors.items():
                getattr(self.base_layer, attribute).copy_(value)


class VectorTuner(Tuner):
    """Merging for ``VectorLayer`` families; ``safe_merge`` checks every layer before any is written."""

    layer_class = VectorLayer

    def merge(self, model: nn.Module, adapter_names: list[str], safe_merge: bool = False) -> None:
        layers = list(self.layers(model))
        if safe_merge:
            for layer_name, layer in layers:
                for name in layer.unmerged(adapter_names):
                    if not all(torch.isfinite(t).all() for t in layer.merged_tensors(name).values()):
                        raise MergeError(
                            f"merging adapter {name!r} would put NaN/Inf into the weights of {layer_name}; "
                            f"nothing was changed (check the adapter's weights)"
                        )
        for _, layer in layers:
            layer.merge(adapter_names)
