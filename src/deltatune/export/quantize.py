"""Tensor encodings of a GGUF file: f32, f16, bf16 and the block quantisations q8_0, q4_0, q4_1.

llama.cpp's convention, kept here: 1-D tensors (norms, biases) and the rope factors stay f32
whatever the file type; a quantised type needs rows whose length is a multiple of its block
(32 values), and a 2-D tensor whose rows do not fit falls back to f16. Quantisation itself is
the ``gguf`` package's reference implementation (the one llama.cpp's own converter uses)::

    q8_0: 32 values -> one f16 scale d and 32 int8 q,        x ~ d * q
    q4_0: 32 values -> one f16 scale d and 32 4-bit q,       x ~ d * (q - 8)
    q4_1: 32 values -> f16 scale d, f16 minimum m, 4-bit q,  x ~ d * q + m
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np

from deltatune.errors import ConfigError

Q = gguf.GGMLQuantizationType
OUT_TYPES: dict[str, tuple[Q, gguf.LlamaFileType]] = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
    "q4_1": (Q.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1),
}


@dataclass(frozen=True)
class Encoded:
    """A tensor's bytes as they go into the file, with its GGML type."""

    data: np.ndarray
    kind: Q


def check_out_type(out_type: str) -> None:
    if out_type not in OUT_TYPES:
        raise ConfigError(f"--type={out_type!r} is unknown; use one of {', '.join(OUT_TYPES)}")


def file_type(out_type: str) -> gguf.LlamaFileType:
    check_out_type(out_type)
    return OUT_TYPES[out_type][1]


def encode(array: np.ndarray, out_type: str, keep_f32: bool = False) -> Encoded:
    """``array`` (float32) in the file's type, or f32/f16 where llama.cpp's convention says so."""
    check_out_type(out_type)
    kind = OUT_TYPES[out_type][0]
    if keep_f32 or array.ndim < 2 or kind == Q.F32:
        return Encoded(np.ascontiguousarray(array, dtype=np.float32), Q.F32)
    if kind not in (Q.F16, Q.BF16) and array.shape[-1] % gguf.GGML_QUANT_SIZES[kind][0]:
        kind = Q.F16
    if kind == Q.F16:
        return Encoded(np.ascontiguousarray(array, dtype=np.float16), Q.F16)
    return Encoded(gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), kind), kind)


def decode(data: np.ndarray, kind: Q) -> np.ndarray:
    """The float32 values a GGUF reader's tensor data stands for (the inverse of ``encode``)."""
    return gguf.quants.dequantize(data, kind).astype(np.float32)
