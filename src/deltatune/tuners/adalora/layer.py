"""AdaLoRA's layers: an SVD-shaped low-rank update whose singular values the rank allocator can switch off.

::

        x ──► W0 (frozen) ──────────────────────────────────────────────┐
        │                                                              (+) ──► y
        └──► dropout ──► A [r, in] ──► · E [r] ──► B [out, r] ──► · alpha / (ranknum + 1e-5)

delta W = B @ (A * E) * alpha / (ranknum + 1e-5), with E zero at start (the model starts as the base model)
and ranknum = ``init_r`` for the adapter's whole life, also when a saved ``rank_pattern`` builds the layer with
fewer triplets. On ``nn.Conv2d`` A is [r, in · kh · kw] and delta W is reshaped to the kernel's shape.
The bookkeeping (several named adapters, merge / unmerge, the forward sum) is LoRA's (``lora/layer.py``);
the parameters live in ParameterDicts named as peft names them (``lora_A.<adapter>``, no ``.weight``).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from deltatune.tuners.adalora.config import AdaLoraConfig
from deltatune.tuners.base import master_dtype
from deltatune.tuners.lora.layer import LoraLayer

RANKNUM_EPS = 1e-5  # peft's guard in alpha / (ranknum + eps)


class AdaLoraLayer(LoraLayer):
    """A base layer plus named SVD-shaped updates; subclasses give the shape of A and how the update applies.

    Besides the parameters, each adapter has ``ranknum`` (its scale's rank, never saved, as in peft) and,
    while it trains, ``sensitivity`` (the allocator's smoothed scores, ``allocator.py``) and ``kept`` (the
    triplets the last allocation kept: saving writes only those).
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()
        self.ranknum: dict[str, float] = {}
        self.sensitivity: dict[str, dict] = {}
        self.kept: dict[str, torch.Tensor] = {}

    def _named_containers(self):
        return [("lora_A", self.lora_A), ("lora_B", self.lora_B), ("lora_E", self.lora_E)]

    @property
    def update_columns(self) -> int:
        """The width of A: the input features (times the kernel's size for a convolution)."""
        return self.in_features

    def add(self, name: str, rank: int, config: AdaLoraConfig) -> None:  # type: ignore[override]
        """Create adapter ``name`` with ``rank`` triplets (``config.init_r`` unless a rank_pattern pruned it).

        As in peft: A, E, B drawn from N(0, 1) in that order, then, with ``init_lora_weights``, E = 0 and
        A, B ~ N(0, 0.02²).
        """
        self.r[name] = rank
        self.lora_alpha[name] = config.lora_alpha
        self.scaling[name] = config.lora_alpha
        self.ranknum[name] = float(config.init_r)
        self.lora_dropout[name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        weight = self.base_weight
        factors = {"A": torch.randn(rank, self.update_columns), "E": torch.randn(rank, 1)}
        factors["B"] = torch.randn(self.out_features, rank)
        if config.init_lora_weights:
            nn.init.zeros_(factors["E"])
            nn.init.normal_(factors["A"], mean=0.0, std=0.02)
            nn.init.normal_(factors["B"], mean=0.0, std=0.02)
        dtype = master_dtype(weight.dtype)
        for key, value in factors.items():
            getattr(self, f"lora_{key}")[name] = nn.Parameter(value.to(device=weight.device, dtype=dtype))

    def delete(self, name: str) -> None:
        super().delete(name)
        for table in (self.ranknum, self.sensitivity, self.kept):
            table.pop(name, None)

    def update(self, name: str) -> torch.Tensor:
        """B @ (A * E) · alpha / (ranknum + 1e-5): [out, ``update_columns``]."""
        lora_a, lora_b, lora_e = self.lora_A[name], self.lora_B[name], self.lora_E[name]
        return lora_b @ (lora_a * lora_e) * self.scaling[name] / (self.ranknum[name] + RANKNUM_EPS)

    def extra_repr(self) -> str:
        return ", ".join(f"{name}: r={self.r[name]}, ranknum={self.ranknum[name]:g}" for name in self.r)


class SVDLinear(AdaLoraLayer):
    """AdaLoRA on ``nn.Linear`` (weight [out, in]) or GPT-2 ``Conv1D`` (weight [in, out], fan_in_fan_out)."""

    def __init__(self, base_layer: nn.Linear | Conv1D) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        shape = base_layer.weight.shape
        self.in_features, self.out_features = shape if self.fan_in_fan_out else shape[::-1]

    def delta_weight(self, name: str) -> torch.Tensor:
        delta = self.update(name)
        return (delta.T if self.fan_in_fan_out else delta).to(self.merge_dtype)

    def lora_output(self, x: torch.Tensor, name: str) -> torch.Tensor:
        lora_a, lora_b, lora_e = self.lora_A[name], self.lora_B[name], self.lora_E[name]
        x = self.lora_dropout[name](x.to(lora_a.dtype))
        return (x @ (lora_a * lora_e).T @ lora_b.T) * self.scaling[name] / (self.ranknum[name] + RANKNUM_EPS)


class SVDConv2d(AdaLoraLayer):
    """AdaLoRA on ``nn.Conv2d`` (groups 1): the update is a kernel of the base's shape, applied with its stride,
    padding and dilation."""

    def __init__(self, base_layer: nn.Conv2d) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels

    @property
    def update_columns(self) -> int:
        kernel = self.base_layer.kernel_size
        return self.in_features * kernel[0] * kernel[1]

    def delta_weight(self, name: str) -> torch.Tensor:
        return self.update(name).reshape(self.base_layer.weight.shape).to(self.merge_dtype)

    def lora_output(self, x: torch.Tensor, name: str) -> torch.Tensor:
        base = self.base_layer
        x = self.lora_dropout[name](x.to(self.lora_A[name].dtype))
        kernel = self.update(name).reshape(base.weight.shape)
        return nn.functional.conv2d(
            x, kernel, stride=base.stride, padding=base.padding, dilation=base.dilation, groups=base.groups
        )
