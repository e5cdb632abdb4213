"""QLoRA (Dettmers et al., 2023, arXiv:2305.14314): LoRA over a bitsandbytes 4-bit or 8-bit frozen weight.

The base keeps its quantised storage; the adapter is a plain fp32 LoRA (``LoraLinear``)::

    x ──► dense(W_q) (dequantised per call, never kept) ──┐
    │                                                      (+) ──► y = W x + s · B A dropout(x)
    └──► dropout ──► A [r, in] fp32 ──► B [out, r] fp32 ───┘

What differs from ``LoraLinear``:

- in/out features come from the logical shape (a 4-bit weight's ``.shape`` is packed storage);
- in training mode the layer takes the fused function, whose base GEMMs read the weight through
  ``kernels.base_weight.dense`` (bitsandbytes' own training matmul, bit for bit); the function saves
  the packed parameter, so nothing d x k in the compute dtype outlives a call. In eval mode the base
  layer runs its own forward (bitsandbytes' inference kernels) and the LoRA term is added as peft adds
  it: in the factors' dtype, cast to the base output's dtype. So do base layers computing in another
  dtype than the activations (``bnb_4bit_compute_dtype`` bf16 under fp32 activations) and autocast;
- bitsandbytes repacks a 4-bit weight for its CPU inference kernel on the first eval-mode, no-grad
  forward (rounding its scales to bf16) and its inverse does not restore the scales; the layer keeps
  the canonical scales itself (``deltatune.compat.bitsandbytes``), so evaluation runs bitsandbytes'
  kernel (peft's eval numbers) while training, merging and DoRA's norms read the weight as quantised;
- the rank-r math runs in fp32 (``adapter_dtype``), as peft runs it in the factors' dtype;
- merging dequantises, merges in full precision and quantises the result again, which rounds
  (a warning says so); unmerging does the same in reverse, so it does not restore W exactly.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from deltatune.compat.bitsandbytes import (
    avoid_failing_repacks,
    canonical,
    remember_canonical,
    restore_canonical,
)
from deltatune.kernels.base_weight import dense, is_quantized
from deltatune.tuners.lora.layer import LoraLinear


class LoraQuantLinear(LoraLinear):
    """LoRA on ``bitsandbytes.nn.Linear4bit`` (nf4/fp4, double quantisation, any compute dtype) or ``Linear8bitLt``.

    ``adapter_dtype`` is fp32 here (set ``LoraQuantLinear.adapter_dtype`` to change it: the class-wide
    ``LoraLinear.adapter_dtype`` does not reach these layers).
    """

    adapter_dtype: torch.dtype | None = torch.float32

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        avoid_failing_repacks(base_layer)

    @property
    def base_weight(self) -> nn.Parameter:
        """The quantised weight, an 8-bit one with its row scales attached (``_attach_scales``)."""
        self._attach_scales()
        return self.base_layer.weight

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self._attach_scales()  # the fused function hands the weight alone to ``dense``
        if type(self.base_layer.weight).__name__ == "Params4bit":  # before bitsandbytes' eval forward can repack it
            remember_canonical(self.base_layer.weight)
        return super().forward(x, *args, **kwargs)

    def train(self, mode: bool = True) -> LoraQuantLinear:
        """Back in training mode a 4-bit weight that bitsandbytes repacked for evaluation takes its canonical
        layout again, so that its own training matmul (taken where the fused path does not apply) reads it."""
        super().train(mode)
        if mode and type(self.base_layer.weight).__name__ == "Params4bit":
            restore_canonical(self.base_layer.weight)
        return self

    def _attach_scales(self) -> None:
        """bitsandbytes moves an 8-bit weight's row scales (SCB) to its layer's state on the first forward;
        ``dense`` reads them from the weight, so they are put back there (the state keeps them too)."""
        weight, state = self.base_layer.weight, getattr(self.base_layer, "state", None)
        if type(weight).__name__ == "Int8Params" and weight.SCB is None and state is not None:
            weight.SCB = state.SCB

    def fusable(self, x: torch.Tensor, names: list[str]) -> bool:
        """In training mode only: there bitsandbytes' forward is exactly x · dense(W)ᵀ (+ b). In eval mode it
        runs other kernels (bf16 4-bit kernels, int8 activations on CPU), and peft's numbers come from those."""
        return self.base_layer.training and super().fusable(x, names)

    # -- merging: dequantise, merge in full precision, quantise again --------------------
    def merge(self, names: list[str]) -> None:
        if not self.unmerged(names):
            return
        _warn_rounding(self.base_layer, "merging into")
        with self._dequantised():
            super().merge(names)

    def unmerge(self) -> None:
        if not self.merged_adapters:
            return
        _warn_rounding(self.base_layer, "unmerging from")
        with self._dequantised():
            super().unmerge()

    def merged_weight(self, name: str, dora_scale: torch.Tensor | None = None) -> torch.Tensor:
        """W + s·BA (DoRA: scaled per row) in fp32, from the dequantised weight (``safe_merge`` checks it)."""
        if not is_quantized(self.base_layer.weight):  # inside ``_dequantised``: merging now
            return super().merged_weight(name, dora_scale)
        with self._dequantised(requantise=False):
            return super().merged_weight(name, dora_scale)

    @contextmanager
    def _dequantised(self, requantise: bool = True) -> Iterator[None]:
        """The base layer holds a dense fp32 copy of its weight inside the block; after it, that copy quantised
        again (``requantise``) or the quantised weight it had before."""
        quantised = self.base_weight
        self.base_layer.weight = nn.Parameter(dense(quantised, torch.float32), requires_grad=False)
        try:
            yield
        finally:
            values = self.base_layer.weight.data
            self.base_layer.weight = requantize(self.base_layer, quantised, values) if requantise else quantised


def requantize(layer: nn.Module, like: nn.Parameter, values: torch.Tensor) -> nn.Parameter:
    """``values`` [out, in] quantised the way ``like`` (the layer's current weight) is, on its device."""
    import bitsandbytes as bnb

    if type(like).__name__ == "Params4bit":
        _, scales = canonical(like)  # its dtype as quantised (a weight repacked for the CPU kernel says bf16)
        weight = bnb.nn.Params4bit(
            values.to("cpu", scales.dtype),
            requires_grad=False,
            blocksize=like.blocksize,
            compress_statistics=like.compress_statistics,
            quant_type=like.quant_type,
            quant_storage=like.quant_storage,
            module=layer,
        )
        return weight.to(like.device)
    weight = bnb.nn.Int8Params(values.to("cpu"), requires_grad=False, has_fp16_weights=False).to(like.device)
    layer.state.reset_grads()  # bitsandbytes takes the new codes and scales from the weight on its next forward
    return weight


def _warn_rounding(layer: nn.Module, what: str) -> None:
    bits = "4-bit" if type(layer.weight).__name__ == "Params4bit" else "8-bit"
    warnings.warn(
        f"{what} a {bits} base layer re-quantises its weight: the result differs from the unmerged model by "
        f"the rounding (merge into a full-precision copy, `deltatune merge --dtype fp32|bf16`, to avoid it)",
        stacklevel=4,
    )
