"""What every method's tuner shares: finding its layers, switching, deleting and removing adapters.

A tuner knows how its method injects itself into a model; it knows nothing about training or files, except
through three training hooks (no-ops by default) that a method with its own training terms implements: a loss
term, and work before the run and after each optimizer step (AdaLoRA's regulariser and rank allocator).
Its layers follow one small contract (``is_delta_layer``, ``base_layer``, ``adapter_names``,
``active_adapters``, ``disabled``, ``delete(name)``, ``adapter_parameters(name)``), so everything
below works for any method.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import nn

from deltatune.config import DeltaConfig
from deltatune.errors import MergeError
from deltatune.io import file_key_map
from deltatune.tuners.rows import RowGroups


def master_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """The dtype of trainable adapter weights over a base of ``base_dtype``: the base's own in fp32/fp64,
    else fp32 (half-precision or quantised bases keep fp32 master weights, as in peft)."""
    return base_dtype if base_dtype in (torch.float32, torch.float64) else torch.float32


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` where ``model.get_submodule(name)`` is; return ``new``."""
    parent_name, _, child_name = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child_name, new)
    return new


@torch.no_grad()
def write_weight(weight: torch.Tensor, value: torch.Tensor) -> None:
    """``weight`` ← ``value`` in place, counted by its version counter (a write through ``.data`` is not), so that
    what was derived from the weight and checks its counter (packed weights, stacked adapters) is made again."""
    weight.copy_(value)


def check_merges_finite(layers: list[tuple[str, nn.Module]], adapter_names: list[str]) -> None:
    """``safe_merge``: raise ``MergeError`` if merging any of ``adapter_names`` into any of ``layers`` (name, layer
    with ``unmerged`` and ``merged_weight``) would put NaN/Inf into its weights; checked before anything merges."""
    for layer_name, layer in layers:
        for name in layer.unmerged(adapter_names):
            if not torch.isfinite(layer.merged_weight(name)).all():
                raise MergeError(
                    f"merging adapter {name!r} would put NaN/Inf into the weights of {layer_name}; "
                    f"nothing was changed (check the adapter's weights)"
                )


class DeltaLayer(nn.Module):
    """What the layers of the families that wrap one base module share: the layer contract's state and
    peft's view of the base (``weight``, ``bias``), and the bookkeeping of which adapters are merged.

    A subclass holds its adapters as it likes and says which it holds (``adapter_names``); it deletes an
    adapter's own state after ``forget`` and merges in its own way, appending to ``merged_adapters``.
    """

    is_delta_layer = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.row_groups: RowGroups | None = None  # set: each row of the batch gets its own adapter (``rows.py``)

    @property
    def adapter_names(self) -> list[str]:
        raise NotImplementedError

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's ``weight``, for code that reads it through the wrapper (a model's forward asking
        ``self.conv.weight.device``), as peft's layers show it; an AttributeError where the base has none."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's ``bias``, as peft's layers show it."""
        return self.base_layer.bias

    def forget(self, name: str) -> None:
        """The start of ``delete(name)``: refuse a merged adapter (its update is in the base weights), and take
        ``name`` out of the active adapters."""
        if name in self.merged_adapters:
            raise MergeError(f"adapter {name!r} is merged into the base weights; unmerge it before deleting it")
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def unmerged(self, names: list[str]) -> list[str]:
        """The adapters of ``names`` this layer holds and has not merged yet."""
        held = self.adapter_names
        return [name for name in names if name in held and name not in self.merged_adapters]

    def unmerged_active(self) -> list[str]:
        """The adapters the forward pass applies: active, held here, not merged, layer not disabled."""
        return [] if self.disabled else self.unmerged(self.active_adapters)


class Tuner:
    """Base class: subclasses set ``config_class`` and ``layer_class`` and implement ``inject``."""

    config_class: type[DeltaConfig] = DeltaConfig
    layer_class: type[nn.Module] = nn.Module

    def inject(self, model: nn.Module, config: DeltaConfig, adapter_name: str) -> None:
        """Add adapter ``adapter_name`` to ``model`` in place, wrapping the modules ``config`` targets."""
        raise NotImplementedError

    def layers(self, model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        """(full name, layer) of every layer of this method in ``model``."""
        for name, module in model.named_modules():
            if isinstance(module, self.layer_class):
                yield name, module

    def adapter_parameters(self, model: nn.Module, adapter_name: str) -> dict[str, nn.Parameter]:
        """In-memory parameter names (relative to ``model``) -> parameters of one adapter."""
        return {
            f"{layer_name}.{pname}": param
            for layer_name, layer in self.layers(model)
            for pname, param in layer.adapter_parameters(adapter_name)
        }

    def trained_base_parameters(
        self, model: nn.Module, config: DeltaConfig, adapter_name: str
    ) -> dict[str, nn.Parameter]:
        """Base-model parameters the adapter trains and saves too, by peft's ``bias`` field where the method has
        one: "all": every bias of the model; "<method>_only" ("lora_only", "oft_only"): the biases of the layers
        holding the adapter; "none" (or no such field): nothing."""
        bias = getattr(config, "bias", "none")
        if bias == "all":
            return {
                name: param
                for name, param in model.named_parameters()
                if name.endswith("bias") and ".original_module." not in name and ".modules_to_save." not in name
            }
        if bias.endswith("_only"):
            return {
                f"{name}.base_layer.bias": layer.base_layer.bias
                for name, layer in self.layers(model)
                if adapter_name in layer.adapter_names and getattr(layer.base_layer, "bias", None) is not None
            }
        return {}

    def optional_file_parameters(self, model: nn.Module, adapter_name: str) -> dict[str, nn.Parameter]:
        """Base-model parameters a peft file may carry, loaded when present: the full weight of an adapted
        embedding (peft saves it to carry a resized vocabulary)."""
        return {
            f"{name}.base_layer.weight": layer.base_layer.weight
            for name, layer in self.layers(model)
            if isinstance(getattr(layer, "base_layer", None), nn.Embedding) and adapter_name in layer.adapter_names
        }

    def file_targets(
        self, model: nn.Module, adapter_name: str, state: dict[str, nn.Parameter]
    ) -> dict[str, nn.Parameter]:
        """File key -> the parameter that file tensor loads into, for an adapter's ``state`` (name -> parameter).

        A method whose file holds something other than its parameters (the prompt methods) first
        turns the adapter into the form the file describes.
        """
        return {key: state[name] for key, name in file_key_map(state, adapter_name).items()}

    def file_tensors(
        self, model: nn.Module, adapter_name: str, state: dict[str, nn.Parameter]
    ) -> dict[str, torch.Tensor]:
        """File key -> tensor that ``save_pretrained`` writes; by default the parameters themselves."""
        return self.file_targets(model, adapter_name, state)

    def fit_file_tensors(
        self,
        model: nn.Module,
        adapter_name: str,
        config: DeltaConfig,
        tensors: dict[str, torch.Tensor],
        saved: DeltaConfig,
    ) -> dict[str, torch.Tensor]:
        """A saved adapter's tensors (written with config ``saved``) in the form of live adapter ``adapter_name``
        (config ``config``), for loading a checkpoint into it; unchanged by default."""
        return tensors

    def set_active(self, model: nn.Module, adapter_names: list[str]) -> None:
        for _, layer in self.layers(model):
            layer.active_adapters = [name for name in adapter_names if name in layer.adapter_names]

    def set_disabled(self, model: nn.Module, disabled: bool) -> None:
        for _, layer in self.layers(model):
            layer.disabled = disabled

    def row_mixing_refusal(self, model: nn.Module, config: DeltaConfig, adapter_name: str) -> str | None:
        """Why adapter ``adapter_name`` cannot run on some rows of a batch while other rows run others (``rows.py``),
        or None when it can; a method that mixes per row says so by overriding this."""
        return f"its method is {config.peft_type}, and only LoRA and DoRA adapters mix in one batch"

    def delete(self, model: nn.Module, adapter_name: str) -> None:
        """Remove one adapter; a layer left with no adapter is replaced by its base module (inner layers first)."""
        for name, layer in reversed(list(self.layers(model))):
            layer.delete(adapter_name)
            if not layer.adapter_names:
                replace_module(model, name, layer.base_layer)

    def merge(self, model: nn.Module, adapter_names: list[str], safe_merge: bool = False) -> None:
        raise MergeError(
            f"{self.config_class.__name__.removesuffix('Config')} adapters cannot be merged into the base weights; "
            f"keep the adapter loaded for inference instead"
        )

    def unmerge(self, model: nn.Module) -> None:
        """Undo ``merge`` in every layer that merges (methods that cannot merge have nothing to undo)."""
        for _, layer in self.layers(model):
            if hasattr(layer, "unmerge"):
                layer.unmerge()

    def is_merged(self, model: nn.Module) -> bool:
        return any(getattr(layer, "merged_adapters", None) for _, layer in self.layers(model))

    def refresh(self, model: nn.Module) -> None:
        """Re-derive what depends on which modules are wrapped; the model calls it after every add and delete."""

    # -- training hooks: training calls them through DeltaModel with the adapters that train (name -> config) --
    def start_training(self, model: nn.Module, adapters: Mapping[str, DeltaConfig], total_steps: int) -> None:
        """A training run of ``total_steps`` optimizer steps is about to start; nothing by default."""

    def regularization_loss(self, model: nn.Module, adapters: Mapping[str, DeltaConfig]) -> torch.Tensor | None:
        """A term training adds to its loss (once per optimizer step); None by default."""
        return None

    def after_optimizer_step(self, model: nn.Module, adapters: Mapping[str, DeltaConfig], step: int) -> None:
        """Optimizer step ``step`` (0 = the first) was taken and its gradients are still there; nothing by default."""

    def unload(self, model: nn.Module) -> None:
        """Remove every layer of this method, putting the base modules back as they are now.

        Inner layers go first: a layer inside another's base module (MultiheadAttention's out_proj)
        is named through it.
        """
        for name, layer in reversed(list(self.layers(model))):
            replace_module(model, name, layer.base_layer)
