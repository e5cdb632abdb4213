"""(IA)³: a learned vector l rescales what a frozen layer reads or writes::

    feed-forward module:   x ──► x ⊙ l ──► W (frozen) ──► y            l: [in]
    any other module:      x ──► W (frozen) ──► y ──► y ⊙ l            l: [out]

One layer class serves ``nn.Linear`` (weight [out, in]), GPT-2 ``Conv1D`` (weight [in, out]) and
``nn.Conv2d``/``nn.Conv3d`` (weight [out, in / groups, k…], l over channels), the layer types peft 0.21.2
gives IA3. l is stored in peft's shapes ([1, in] or [out, 1] for linear layers, [1, C, 1, …] for
convolutions), so the file key ``<module>.ia3_l`` holds the same tensor in both libraries. Several active
adapters multiply. Merging multiplies W's input columns or output rows by l (and, for output scaling,
the bias); unmerging divides by l + 1e-8, as peft does, so an entry of l at 0 cannot be undone.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from deltatune.tuners.base import master_dtype
from deltatune.tuners.ia3.config import IA3Config
from deltatune.tuners.vector_layer import VectorLayer, linear_features

IA3_TYPES = (nn.Linear, Conv1D, nn.Conv2d, nn.Conv3d)
UNMERGE_EPSILON = 1e-8  # peft's guard against dividing by zero when a merged l is taken out


class IA3Layer(VectorLayer):
    """IA3 on one ``nn.Linear``, ``Conv1D``, ``nn.Conv2d`` or ``nn.Conv3d``; ``is_feedforward`` says whether
    l scales its input (for every adapter of the layer, as in peft)."""

    vector_names = ("ia3_l",)

    def __init__(self, base_layer: nn.Module, is_feedforward: bool) -> None:
        super().__init__(base_layer)
        self.is_feedforward = is_feedforward
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        self.is_conv = isinstance(base_layer, (nn.Conv2d, nn.Conv3d))
        if self.is_conv:
            self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels
        else:
            self.in_features, self.out_features = linear_features(base_layer)

    def vector_shape(self) -> tuple[int, ...]:
        """peft's shape of l: [1, in] / [out, 1] on a linear layer, [1, C, 1, …] on a convolution."""
        if self.is_conv:
            features = self.in_features if self.is_feedforward else self.out_features
            return (1, features) + (1,) * (self.base_layer.weight.dim() - 2)
        return (1, self.in_features) if self.is_feedforward else (self.out_features, 1)

    def add(self, name: str, config: IA3Config) -> None:
        """Create adapter ``name``: l = 1 (``init_ia3_weights``), else N(0, 1) as peft draws it."""
        weight = self.base_layer.weight
        start = torch.ones(self.vector_shape()) if config.init_ia3_weights else torch.randn(self.vector_shape())
        self.ia3_l[name] = nn.Parameter(start.to(device=weight.device, dtype=master_dtype(weight.dtype)))

    def scale(self, names: list[str]) -> torch.Tensor:
        """The product of the adapters' l, shaped to broadcast over the activations (features last for a
        linear layer, channels second for a convolution)."""
        product = self.ia3_l[names[0]]
        for name in names[1:]:
            product = product * self.ia3_l[name]
        return product if self.is_conv else product.flatten()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        names = self.unmerged_active()
        if not names:
            return self.base_layer(x, *args, **kwargs)
        scale = self.scale(names)
        if self.is_feedforward:
            return self.base_layer((x.to(scale.dtype) * scale).to(x.dtype), *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        return (result.to(scale.dtype) * scale).to(result.dtype)

    def on_weight(self, vector: torch.Tensor) -> torch.Tensor:
        """l laid out to multiply the base weight elementwise: along the input columns (feed-forward) or the
        output rows; a grouped convolution's input scale repeated for each group's kernels."""
        values = vector.flatten()
        weight = self.base_layer.weight
        kernel = (1,) * (weight.dim() - 2)
        if not self.is_feedforward:
            return values[None, :] if self.fan_in_fan_out else values.reshape(-1, 1, *kernel)
        if self.fan_in_fan_out:
            return values[:, None]
        groups = getattr(self.base_layer, "groups", 1)
        outputs, per_group = weight.shape[0], weight.shape[1]
        per_output = values.reshape(groups, 1, per_group).expand(groups, outputs // groups, per_group)
        return per_output.reshape(outputs, per_group, *kernel)

    def merged_tensors(self, name: str, undo: bool = False) -> dict[str, torch.Tensor]:
        """W ⊙ l (and b ⊙ l when l scales the output); with ``undo`` W / (l + 1e-8) and b / (l + 1e-8)."""
        vector = self.ia3_l[name].detach()

        def apply(tensor: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
            return (tensor / (factor + UNMERGE_EPSILON) if undo else tensor * factor).to(tensor.dtype)

        base = self.base_layer
        tensors = {"weight": apply(base.weight.detach(), self.on_weight(vector))}
        if not self.is_feedforward and base.bias is not None:
            tensors["bias"] = apply(base.bias.detach(), vector.reshape(base.bias.shape))
        return tensors

    def extra_repr(self) -> str:
        scaled = f"input ({self.in_features})" if self.is_feedforward else f"output ({self.out_features})"
        return f"scales its {scaled}; adapters: {', '.join(self.adapter_names)}"
