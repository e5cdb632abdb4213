"""LoRA on ``nn.Embedding``: the update is a row lookup in Aᵀ [vocab, r] followed by a product with Bᵀ [r, dim].

With DoRA, one magnitude per embedding dimension: y = (m / ||E + s·(BA)ᵀ||) ⊙ (E[x] + s·B A[x]).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.tuners.lora.layer import LoraLayer


class LoraEmbedding(LoraLayer):
    """LoRA on ``nn.Embedding``: row lookup in Aᵀ [vocab, r], then × Bᵀ [r, dim].

    As in the paper's code, A starts at zero and B is normal, so the update is still zero at start.
    """

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def _named_containers(self):
        return [("lora_embedding_A", self.lora_embedding_A), ("lora_embedding_B", self.lora_embedding_B)]

    def _create(self, name, rank, device, dtype):
        vocab, dim = self.base_layer.weight.shape
        self.lora_embedding_A[name] = nn.Parameter(torch.empty(rank, vocab, device=device, dtype=dtype))
        self.lora_embedding_B[name] = nn.Parameter(torch.empty(dim, rank, device=device, dtype=dtype))

    def _initialise(self, name, init):
        if init is False:
            nn.init.normal_(self.lora_embedding_A[name])
        else:
            nn.init.zeros_(self.lora_embedding_A[name])
        nn.init.normal_(self.lora_embedding_B[name])

    def delta_weight(self, name: str) -> torch.Tensor:
        delta = (self.lora_embedding_B[name] @ self.lora_embedding_A[name]).T * self.scaling[name]
        return delta.to(self.merge_dtype)

    def rows(self, weight: torch.Tensor) -> torch.Tensor:
        """[dim, vocab]: DoRA keeps one magnitude per embedding dimension, as peft does."""
        return weight.t()

    def lora_output(self, x: torch.Tensor, name: str) -> torch.Tensor:
        base = self.base_layer
        after_a = F.embedding(
            x,
            self.lora_embedding_A[name].T,
            padding_idx=base.padding_idx,
            max_norm=base.max_norm,
            norm_type=base.norm_type,
            scale_grad_by_freq=base.scale_grad_by_freq,
            sparse=base.sparse,
        )
        return (after_a @ self.lora_embedding_B[name].T) * self.scaling[name]
