"""VeRA: Vector-based Random Matrix Adaptation (Kopiczko et al., 2024, arXiv:2310.11454).

Every adapted layer of a model slices ONE frozen random pair A [r, max in], B [max out, r] and trains two
vectors of its own::

        x ──► W0 (frozen) ──────────────────────────────────────────────────────┐
        │                                                                      (+) ──► y
        └──► dropout ──► A[:, :in] ──► ⊙ λd [r] ──► B[:out, :] ──► ⊙ λb [out] ──┘

    y = W0 x + λb ⊙ (B (λd ⊙ (A x)))        ΔW = diag(λb) B diag(λd) A

λb starts at zero, so training starts at exactly the base model. A and B are drawn from
``projection_prng_key`` with a seeded Kaiming-uniform generator, in peft's order (A, then B), so the same
key gives the same numbers in both libraries. They live in one ``VeraProjections`` module that every
layer holds (non-persistent buffers: the base model's state dict stays as it was); the adapter file
carries them under ``base_model.vera_A`` / ``vera_B`` when ``save_projection``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from deltatune.tuners.base import master_dtype
from deltatune.tuners.vector_layer import VectorLayer, linear_features
from deltatune.tuners.vera.config import VeraConfig

VERA_TYPES = (nn.Linear, Conv1D)


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """U(-b, b) with b = sqrt(6 / fan_in), fan_in = shape[1] (Kaiming-uniform with gain sqrt(2)), drawn from
    ``generator`` on the CPU in fp32."""
    bound = math.sqrt(6.0 / shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeraProjections(nn.Module):
    """The frozen random pair A [r, in] and B [out, r] all VeRA layers of a model share."""

    def __init__(self, config: VeraConfig, in_features: int, out_features: int, weight: torch.Tensor) -> None:
        super().__init__()
        generator = torch.Generator(device="cpu").manual_seed(config.projection_prng_key)
        first = kaiming_uniform((config.r, in_features), generator)  # the order matters: A, then B
        second = kaiming_uniform((out_features, config.r), generator)
        like = {"device": weight.device, "dtype": master_dtype(weight.dtype)}
        self.register_buffer("vera_A", first.to(**like), persistent=False)
        self.register_buffer("vera_B", second.to(**like), persistent=False)
        self.projection_prng_key = config.projection_prng_key
        self.save_projection = config.save_projection

    @property
    def r(self) -> int:
        return self.vera_A.shape[0]

    def extra_repr(self) -> str:
        return f"A: {tuple(self.vera_A.shape)}, B: {tuple(self.vera_B.shape)}, key={self.projection_prng_key}"


class VeraLayer(VectorLayer):
    """VeRA on an ``nn.Linear`` (weight [out, in]) or GPT-2 ``Conv1D`` (weight [in, out])."""

    vector_names = ("vera_lambda_b", "vera_lambda_d")

    def __init__(self, base_layer: nn.Linear | Conv1D, projections: VeraProjections) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        self.in_features, self.out_features = linear_features(base_layer)
        self.vera_projections = projections
        self.vera_dropout = nn.ModuleDict()

    def add(self, name: str, config: VeraConfig) -> None:
        """Create adapter ``name``: λb = 0, λd = d_initial (``init_weights``), else λb = 1, λd ~ N(0, 1)."""
        weight = self.base_layer.weight
        like = {"device": weight.device, "dtype": master_dtype(weight.dtype)}
        lambda_d = torch.randn(config.r)  # drawn either way, as in peft, so the random stream matches
        if config.init_weights:
            lambda_b, lambda_d = torch.zeros(self.out_features), torch.full((config.r,), float(config.d_initial))
        else:
            lambda_b = torch.ones(self.out_features)
        self.vera_lambda_b[name] = nn.Parameter(lambda_b.to(**like))
        self.vera_lambda_d[name] = nn.Parameter(lambda_d.to(**like))
        self.vera_dropout[name] = nn.Dropout(config.vera_dropout) if config.vera_dropout > 0 else nn.Identity()

    def delete(self, name: str) -> None:
        super().delete(name)
        if name in self.vera_dropout:
            del self.vera_dropout[name]

    def sliced(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's corner of the shared pair: A[:, :in] and B[:out, :]."""
        projections = self.vera_projections
        return projections.vera_A[:, : self.in_features], projections.vera_B[: self.out_features, :]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        names = self.unmerged_active()
        if not names:
            return result
        first, second = self.sliced()
        for name in names:
            lambda_b, lambda_d = self.vera_lambda_b[name], self.vera_lambda_d[name]
            hidden = self.vera_dropout[name](x.to(lambda_d.dtype))
            update = lambda_b * F.linear(lambda_d * F.linear(hidden, first.to(hidden.dtype)), second.to(hidden.dtype))
            result = result + update.to(result.dtype)
        return result

    def delta_weight(self, name: str) -> torch.Tensor:
        """diag(λb) B diag(λd) A laid out like the base weight ([in, out] for ``Conv1D``), in fp32 or better."""
        first, second = self.sliced()
        lambda_b, lambda_d = self.vera_lambda_b[name].detach(), self.vera_lambda_d[name].detach()
        delta = (lambda_b[:, None] * second) @ (lambda_d[:, None] * first)
        return delta.T if self.fan_in_fan_out else delta

    def merged_tensors(self, name: str, undo: bool = False) -> dict[str, torch.Tensor]:
        """W ± ΔW (the bias is not touched)."""
        weight = self.base_layer.weight.detach()
        delta = self.delta_weight(name)
        return {"weight": (weight - delta if undo else weight + delta).to(weight.dtype)}

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}; adapters: {', '.join(self.adapter_names)}"
