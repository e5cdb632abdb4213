"""The one seam between LoRA math and how a base layer stores its weight.

Everything that needs the frozen base weight as numbers (the fused kernels' GEMMs, DoRA's weight
norm, merging, SVD-based initialisations) asks ``dense`` for it, so a stored format other than a
plain tensor (a quantised one) is turned into numbers here and nowhere else, one call at a time:
nothing d x k in the compute dtype has to be kept between forward and backward.

Quantised formats (bitsandbytes, recognised by class name so that nothing here imports it)::

    Params4bit  [(d·k+1)/2, 1] uint8 codes ──► W[i, j] = table[code] · absmax[block]   (nf4 / fp4, blocks of 64;
                                               with double quantisation absmax is itself 8-bit + an offset)
    Int8Params  [d, k] int8 C, SCB [d]      ──► W[i, j] = C[i, j] · SCB[i] / 127

Both are dequantised exactly as bitsandbytes' own training matmuls do on CPU (into the compute
dtype in one step), so a fused layer's base GEMM reproduces the quantised layer's forward bit for bit.
A 4-bit weight is read in its canonical layout even after bitsandbytes repacked it for its CPU inference
kernel (``deltatune.compat.bitsandbytes``).
"""

from __future__ import annotations

import logging

import torch

from deltatune.compat.bitsandbytes import canonical

# Importing bitsandbytes (transformers and peft do, whenever it is installed) warns that an optional CPU kernel from
# the Hugging Face hub is missing; bitsandbytes falls back to its own, and the line would break one-line CLI errors.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

QUANTIZED_PARAMETERS = ("Params4bit", "Int8Params")
# The bitsandbytes layers whose training forward is exactly ``x @ dense(W, compute dtype)ᵀ + b``.
QUANTIZED_LINEARS = ("Linear4bit", "LinearNF4", "LinearFP4", "Linear8bitLt")


def is_quantized(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is a bitsandbytes 4-bit or 8-bit parameter (its storage is not its values)."""
    return type(weight).__name__ in QUANTIZED_PARAMETERS


def logical_shape(weight: torch.Tensor) -> torch.Size:
    """The shape of the matrix ``weight`` stands for: a 4-bit weight's own ``.shape`` is its packed storage."""
    state = getattr(weight, "quant_state", None)
    return torch.Size(state.shape) if state is not None and type(weight).__name__ == "Params4bit" else weight.shape


def dense(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``weight`` as a plain dense tensor, in ``dtype`` when given (no copy when it already is one).

    A quantised weight is dequantised on every call (a new tensor; the default dtype is the one it was
    quantised from, fp32 for 8-bit).
    """
    kind = type(weight).__name__
    if kind == "Params4bit":
        return _dequantize_4bit(weight, dtype)
    if kind == "Int8Params":
        return _dequantize_int8(weight, dtype)
    return weight if dtype is None or weight.dtype == dtype else weight.to(dtype)


def _dequantize_4bit(weight: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    import bitsandbytes.functional as bnb_functional

    codes, scales = canonical(weight)  # as quantised, even after bitsandbytes repacked it for its CPU kernel
    absmax = scales.absmax
    if scales.nested:
        absmax = bnb_functional.dequantize_blockwise(scales.absmax, scales.state2) + scales.offset
    state = weight.quant_state
    return torch.ops.bitsandbytes.dequantize_4bit.default(
        codes, absmax.float(), state.blocksize, state.quant_type, state.shape, dtype or scales.dtype
    )


def _dequantize_int8(weight: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if weight.SCB is None:
        raise RuntimeError("an 8-bit weight without its row scales (SCB): sync it from its layer's state first")
    return weight.data.to(dtype or torch.float32).mul_(weight.SCB.unsqueeze(1).mul(1.0 / 127.0))
