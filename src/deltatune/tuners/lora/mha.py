"""LoRA on ``nn.MultiheadAttention``: one update on the packed q/k/v projection, one on the output projection.

``nn.MultiheadAttention`` calls no ``nn.Linear`` (it reads ``in_proj_weight`` [3·E, E] and
``out_proj.weight`` [E, E] directly), so the forward runs the base module on adapted weights::

    in_proj_weight + s · B A        (this layer's lora_A [r, E], lora_B [3·E, r])
    out_proj.weight + s · B' A'     (a LoraLinear around out_proj: base_layer.out_proj.lora_A/B)

This is peft's layout, so the file keys are peft's. As in peft, ``lora_dropout`` does not apply
(the update acts on weights, not on an input), only packed q/k/v of one size is supported, and
DoRA and ``lora_bias`` are refused. peft 0.21 adds the out_proj update twice in its forward and
merge (huggingface/peft#3774); deltatune adds it once.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from deltatune.tuners.lora.config import LoraConfig
from deltatune.tuners.lora.layer import LoraLayer, LoraLinear


class LoraMultiheadAttention(LoraLayer):
    """LoRA on ``nn.MultiheadAttention``'s ``in_proj_weight``; its ``out_proj`` becomes a ``LoraLinear``.

    The ``LoraLinear`` is a layer of its own for the tuner (it merges, switches and deletes itself);
    this layer only adds each adapter to it and reads its weight in the forward pass.
    """

    def __init__(self, base_layer: nn.MultiheadAttention) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        if not isinstance(base_layer.out_proj, LoraLinear):
            base_layer.out_proj = LoraLinear(base_layer.out_proj)

    @property
    def out_proj(self) -> LoraLinear:
        return self.base_layer.out_proj

    def _named_containers(self):
        return [("lora_A", self.lora_A), ("lora_B", self.lora_B)]

    @property
    def base_weight(self) -> nn.Parameter:
        """in_proj_weight [3·E, E]: out_proj carries its own updates, as a layer of the tuner."""
        return self.base_layer.in_proj_weight

    def add(self, name: str, rank: int, alpha: float, config: LoraConfig) -> None:
        """Adapter ``name`` on in_proj (here) and on out_proj (its ``LoraLinear``); no dropout, as in peft."""
        super().add(name, rank, alpha, config)
        self.lora_dropout[name] = nn.Identity()  # never called: the update acts on the weight
        self.out_proj.add(name, rank, alpha, config)

    def _create(self, name, rank, device, dtype):
        embed_dim = self.base_layer.embed_dim
        self.lora_A[name] = nn.Linear(embed_dim, rank, bias=False, device=device, dtype=dtype)
        self.lora_B[name] = nn.Linear(rank, 3 * embed_dim, bias=False, device=device, dtype=dtype)

    def delta_weight(self, name: str) -> torch.Tensor:
        delta = (self.lora_B[name].weight @ self.lora_A[name].weight) * self.scaling[name]
        return delta.to(self.merge_dtype)

    def forward(self, query: torch.Tensor, *args, **kwargs):
        """The base module's own forward (all its options, fast path included) on the adapted weights; it reads
        ``out_proj.weight`` through the ``LoraLinear``, which shows its base layer's."""
        base, out_proj = self.base_layer, self.out_proj
        weights = {
            "in_proj_weight": _adapted(base.in_proj_weight, self),
            "out_proj.base_layer.weight": _adapted(out_proj.base_layer.weight, out_proj),
        }
        return functional_call(base, weights, (query, *args), kwargs, strict=False)


def _adapted(weight: torch.Tensor, layer: LoraLayer) -> torch.Tensor:
    """``weight`` plus the updates ``layer`` adds now (its active, unmerged adapters)."""
    for name in layer.unmerged_active():
        weight = weight + layer.delta_weight(name)
    return weight
