"""LoRA on convolutions: A is a convolution with the base kernel down to r channels, B a 1x1 convolution back up."""

from __future__ import annotations

import torch
from torch import nn

from .lora import LoraLayer


class LoraConv2d(LoraLayer):
    """LoRA on ``nn.Conv2d``: A is a conv with the base kernel to r channels, B a 1x1 conv back."""

    def __init__(self, base_layer: nn.Conv2d) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def _named_containers(self):
        return [("lora_A", self.lora_A), ("lora_B", self.lora_B)]

    def _create(self, name, rank, device, dtype):
        base = self.base_layer
        self.lora_A[name] = nn.Conv2d(
            base.in_channels, rank, base.kernel_size, base.stride, base.padding, base.dilation,
            bias=False, padding_mode=base.padding_mode, device=device, dtype=dtype,
        )  # fmt: skip
        self.lora_B[name] = nn.Conv2d(rank, base.out_channels, 1, bias=False, device=device, dtype=dtype)

    def delta_weight(self, name: str) -> torch.Tensor:
        weight_a, weight_b = self.lora_A[name].weight, self.lora_B[name].weight  # [r, in, kh, kw], [out, r, 1, 1]
        delta = torch.einsum("or,rikl->oikl", weight_b[:, :, 0, 0], weight_a) * self.scaling[name]
        return delta.to(self.base_layer.weight.dtype)

    def lora_output(self, x: torch.Tensor, name: str) -> torch.Tensor:
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        x = self.lora_dropout[name](x.to(lora_a.weight.dtype))
        return lora_b(lora_a(x)) * self.scaling[name]
