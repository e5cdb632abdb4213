"""peft 0.21.2's small test models (``tests/test_custom_models.py``), rebuilt with its layer names, shapes and
data flow, for the rows of every method checked against peft (``test_peft_custom_rows.py`` and the other
families' row tests). ``maker(model_id)`` builds one seeded; ``example(model_id)`` is its input.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from tiny_models import _seeded


class MLP(nn.Module):
    """lin0: 10 → 20, relu, lin1: 20 → 2, log-softmax; ``linear`` builds the two layers."""

    def __init__(self, linear: Callable[[int, int], nn.Module] = nn.Linear) -> None:
        super().__init__()
        self.lin0, self.lin1 = linear(10, 20), linear(20, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.lin1(torch.relu(self.lin0(x))), -1)


class ParameterLinear(nn.Module):
    """x @ W + b with W [in, out] a bare parameter (no nn.Linear to wrap)."""

    def __init__(self, fan_in: int, fan_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(fan_in, fan_out))
        self.bias = nn.Parameter(torch.ones(fan_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class EmbConv1D(nn.Module):
    """emb: 100 tokens → 5, GPT-2 Conv1D 5 → 1, flattened over the 10 positions, lin0: 10 → 2."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.conv1d, self.lin0 = nn.Embedding(100, 5), Conv1D(1, 5), nn.Linear(10, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.lin0(torch.relu(self.conv1d(self.emb(x))).flatten(1)), -1)


class ConvHead(nn.Module):
    """``conv`` (stored under ``name``) on the input reshaped to ``shape``, relu, flattened, then lin0 to 2."""

    def __init__(self, name: str, conv: nn.Module, shape: tuple[int, ...], features: int) -> None:
        super().__init__()
        self.conv_name, self.shape = name, shape
        setattr(self, name, conv)
        self.lin0 = nn.Linear(features, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = getattr(self, self.conv_name)
        return torch.log_softmax(self.lin0(torch.relu(conv(x.reshape(self.shape))).flatten(1)), -1)


class Conv3dHead(ConvHead):
    """The [9, 10] input repeated 3 times along a new last dim, as 2 volumes [5, 3, 3, 3]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(torch.stack([x] * 3, dim=-1))


class Conv2dGroups(nn.Module):
    """lin0: 90 → 288 on the flattened input, as [2, 16, 3, 3], conv2d 16 → 16 (3x3, groups 8), lin1: 16 → 2."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.conv2d, self.lin1 = nn.Linear(90, 288), nn.Conv2d(16, 16, 3, groups=8), nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.lin0(x.flatten()).reshape(2, 16, 3, 3)
        return torch.log_softmax(self.lin1(torch.relu(self.conv2d(hidden)).flatten(1)), -1)


class Conv2dGroups2(nn.Module):
    """conv2d 16 → 32 (3x3, padding 1, groups 2) on its own fixed [9, 16, 20, 20] input, put on
    ``conv2d.weight``'s device (so it reads the weight through the LoRA wrapper), lin0: 12800 → 2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv2d, self.lin0 = nn.Conv2d(16, 32, 3, padding=1, groups=2), nn.Linear(12800, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = 9 * 16 * 20 * 20
        own = (torch.arange(size, device=self.conv2d.weight.device) / size).view(9, 16, 20, 20)
        return torch.log_softmax(self.lin0(torch.relu(self.conv2d(own)).flatten(1)), -1)


class Mha(nn.Module):
    """Self-attention over the [9, 10] input as one unbatched sequence (embed 10, 2 heads), lin0: 10 → 2."""

    def __init__(self) -> None:
        super().__init__()
        self.mha, self.lin0 = nn.MultiheadAttention(10, 2), nn.Linear(10, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.lin0(self.mha(x, x, x)[0]), -1)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "MLP": MLP,
    "MlpUsingParameters": lambda: MLP(ParameterLinear),
    "EmbConv1D": EmbConv1D,
    "Conv1d": lambda: ConvHead("conv1d", nn.Conv1d(1, 1, 2), (-1, 1, 10), 9),
    "Conv2d": lambda: ConvHead("conv2d", nn.Conv2d(5, 10, 3), (-1, 5, 3, 3), 10),
    "Conv3d": lambda: Conv3dHead("conv3d", nn.Conv3d(5, 10, 3), (-1, 5, 3, 3, 3), 10),
    "Conv2dGroups": Conv2dGroups,
    "Conv2dGroups2": Conv2dGroups2,
    "MHA": Mha,
}


def maker(model_id: str) -> Callable[[], nn.Module]:
    return lambda: _seeded(MODELS[model_id])


def example(model_id: str) -> torch.Tensor:
    """peft's input ``arange(90)`` as [9, 10]: token ids for the embedding model, else divided by 10."""
    tokens = torch.arange(90).view(9, 10)
    return tokens if model_id == "EmbConv1D" else tokens / 10


# -- LyCORIS rows: the models LoHa's and LoKr's rows add -----------------------------------------


class RepeatedChannelsHead(ConvHead):
    """The [9, 10] input as 9 one-channel rows of 10, that channel repeated to ``shape``'s channels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.reshape(-1, 1, 10).expand(-1, self.shape[1], -1))


MODELS.update(
    {
        "Conv1dBigger": lambda: RepeatedChannelsHead("conv1d", nn.Conv1d(64, 16, 2), (-1, 64, 10), 144),
        "Conv1dGroups": lambda: RepeatedChannelsHead("conv1d", nn.Conv1d(8, 8, 3, groups=2), (-1, 8, 10), 64),
        "Conv2d1x1": lambda: ConvHead("conv2d", nn.Conv2d(1, 10, 1), (-1, 1, 3, 3), 90),
    }
)
