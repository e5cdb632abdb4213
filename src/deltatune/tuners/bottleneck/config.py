"""Bottleneck adapters' configuration (AdapterHub's names: reduction_factor, houlsby / pfeiffer, non_linearity)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from deltatune.config import (
    DeltaConfig,
    check_positive_int,
    check_positive_number,
    check_probability,
    choice,
    layer_indices,
    modules_to_save_names,
)
from deltatune.errors import ConfigError

BOTTLENECK_PLACEMENTS = ("houlsby", "pfeiffer")


# Activation names, looked up in transformers' ACT2FN as AdapterHub does (parameter-free ones only).
NON_LINEARITIES = ("relu", "gelu", "gelu_new", "silu", "swish", "tanh", "sigmoid", "leaky_relu", "mish")


BOTTLENECK_INITS = ("kaiming", "normal")


@dataclass
class BottleneckConfig(DeltaConfig):
    """Bottleneck adapters (Houlsby et al., 2019, arXiv:1902.00751): ``y + s * up(act(down(y)))``.

    y is the output of a sub-block (attention or MLP) of width d; down: d -> m, up: m -> d, both
    with biases, m << d, so each adapted site trains 2·d·m + d + m parameters. ``up`` starts at
    zero, so the adapted model computes exactly what the base model does until training moves it.
    Field names follow AdapterHub; peft has no bottleneck adapters, so the files are deltatune's own
    format (docs/formats.md). An adapter adds a non-linearity and cannot be merged into the weights.

    Args:
        reduction_factor: m = d // reduction_factor (AdapterHub's default 16).
        bottleneck_size: an explicit m for every site; overrides ``reduction_factor``.
        placement: "houlsby" (after the attention block and after the MLP of every layer) or
            "pfeiffer" (after the MLP only; Pfeiffer et al., 2021, arXiv:2005.00247).
        non_linearity: the activation between down and up, a transformers ``ACT2FN`` name
            ("relu", "gelu", "silu"/"swish", "tanh", ...).
        dropout: dropout probability on the adapter's output, before the residual sum.
        scaling: s, a constant factor on the adapter's output.
        init_weights: the down-projection's start: "kaiming" (Kaiming-uniform, as ``nn.Linear``) or
            "normal" (N(0, 0.01²) truncated at ±0.02, the paper's near-identity init); biases and
            the up-projection start at zero either way.
        layers_to_transform: adapt only these layer indices.
        modules_to_save: extra modules trained in full and saved with the adapter (e.g. a new head).
    """

    peft_type: ClassVar[str] = "BOTTLENECK"

    reduction_factor: float = 16
    bottleneck_size: int | None = None
    placement: str = "houlsby"
    non_linearity: str = "relu"
    dropout: float = 0.0
    scaling: float = 1.0
    init_weights: str = "kaiming"
    layers_to_transform: list[int] | int | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_number("reduction_factor", self.reduction_factor)
        if self.bottleneck_size is not None:
            check_positive_int("bottleneck_size", self.bottleneck_size)
        self.placement = choice("placement", self.placement, BOTTLENECK_PLACEMENTS)
        self.non_linearity = choice("non_linearity", self.non_linearity, NON_LINEARITIES)
        self.init_weights = choice("init_weights", self.init_weights, BOTTLENECK_INITS)
        check_probability("dropout", self.dropout)
        check_positive_number("scaling", self.scaling)
        self.layers_to_transform = layer_indices(self.layers_to_transform)
        self.modules_to_save = modules_to_save_names(self.modules_to_save)

    def bottleneck_width(self, features: int) -> int:
        """m for a site of width d: ``bottleneck_size``, else ``d // reduction_factor``."""
        width = self.bottleneck_size or int(features // self.reduction_factor)
        if width < 1:
            raise ConfigError(
                f"reduction_factor={self.reduction_factor!r} leaves no bottleneck units for width {features}; "
                f"use a reduction_factor <= {features} or set bottleneck_size"
            )
        return width
