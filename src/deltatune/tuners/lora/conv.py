"""LoRA on ``nn.Conv1d``/``nn.Conv2d``/``nn.Conv3d``: A is a convolution with the base kernel down to r
channels, B a 1x1 convolution back up::

    x ──► W0 (conv, groups g) ───────────────────────────────────────┐
    │                                                               (+) ──► y
    └──► dropout ──► A: conv k×…, in → r ──► B: 1×…, r → out, groups g ──► · s

The update as a kernel is ΔW[o, i, …] = s · Σ_r B[o, r] A[r, i, …] (groups = 1). With groups > 1
(as in peft) A still sees every input channel while B is grouped, so r must be a multiple of
``groups``; such an update has no grouped kernel to merge into, so these layers cannot merge (peft
refuses too).

DoRA keeps one magnitude per output channel (peft's file shape [1, out, 1, …]) and divides by the norm
of W0 + ``delta_weight`` per channel. On a grouped convolution that "kernel" is peft's: the product of
B's entries read in rows of r with A, reshaped to the base kernel's shape (not the update the layer
applies, which no grouped kernel holds); deltatune takes the same norm, so peft's files mean the same.

Unlike peft, A also takes the base's ``dilation`` and ``padding_mode`` (peft's A keeps the defaults):
the forward then is exactly the merged convolution. Both agree when these are the defaults.
"""

from __future__ import annotations

import torch
from torch import nn

from deltatune.errors import MergeError
from deltatune.tuners.lora.layer import LoraBias, LoraLayer

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class LoraConvNd(LoraBias, LoraLayer):
    """LoRA on a 1-, 2- or 3-d convolution (weight [out, in / groups, k…]); peft's ``Conv1d/2d/3d``."""

    def __init__(self, base_layer: nn.Conv1d | nn.Conv2d | nn.Conv3d) -> None:
        super().__init__(base_layer)
        self.conv_class = CONV_TYPES[base_layer.weight.dim() - 3]
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def _named_containers(self):
        return [("lora_A", self.lora_A), ("lora_B", self.lora_B)]

    def _create(self, name, rank, device, dtype):
        base = self.base_layer
        self.lora_A[name] = self.conv_class(
            base.in_channels,
            rank,
            base.kernel_size,
            base.stride,
            base.padding,
            base.dilation,
            bias=False,
            padding_mode=base.padding_mode,
            device=device,
            dtype=dtype,
        )
        self.lora_B[name] = self.conv_class(
            rank, base.out_channels, 1, groups=base.groups, bias=False, device=device, dtype=dtype
        )

    def check_mergeable(self) -> None:
        if self.base_layer.groups > 1:
            raise MergeError(
                f"a LoRA update on a grouped convolution (groups={self.base_layer.groups}) cannot be merged: it "
                f"mixes all input channels, each group's kernel sees only its own (peft refuses it too); keep the "
                f"adapter loaded instead"
            )

    def delta_weight(self, name: str) -> torch.Tensor:
        """s · B A as a kernel [out, in / g, k…]: B [out, r / g, 1…] read as [out / g, r] times A [r, in · k…]
        (for g = 1 the update itself; for g > 1 peft's reading, which only DoRA's norm uses)."""
        weight_a, weight_b = self.lora_A[name].weight, self.lora_B[name].weight
        delta = weight_b.reshape(-1, weight_a.shape[0]) @ weight_a.flatten(1)
        return (delta.reshape(self.base_layer.weight.shape) * self.scaling[name]).to(self.merge_dtype)

    def lora_output(self, x: torch.Tensor, name: str) -> torch.Tensor:
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        x = self.lora_dropout[name](x.to(lora_a.weight.dtype))
        return lora_b(lora_a(x)) * self.scaling[name]

    # -- DoRA: one unit per output channel --------------------------------------------------
    def rows(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.flatten(1)

    def magnitude_shape(self, units: int) -> tuple[int, ...]:
        return (1, units) + (1,) * (self.base_layer.weight.dim() - 2)

    def _channels(self, per_unit: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Channels sit before the spatial dims (batched or not): [out, 1, …] broadcasts over both."""
        return per_unit.reshape((-1,) + (1,) * (self.base_layer.weight.dim() - 2)).to(like.dtype)
