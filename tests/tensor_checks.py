"""Comparisons the fused-kernel tests share: relative closeness to a float64 reference, bytes saved for backward."""

from __future__ import annotations

import torch

# the kernels' formula tests run on every device present (a GPU machine adds "cuda"; none is skipped here)
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def assert_close_rel(got: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> None:
    error = (got.double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert error <= tol * scale, f"{what}: max error {error:.3g} vs max |ref| {scale:.3g}"


def saved_bytes(fn, weights) -> dict[str, int]:
    """Bytes of the distinct storages autograd saves while ``fn()`` runs, by dtype.

    Storages of ``weights`` (so also their views, such as a saved ``W.t()``) are left out.
    """
    seen: dict[int, torch.Tensor] = {}
    excluded = {t.untyped_storage().data_ptr() for t in weights}

    def pack(t):
        if t.untyped_storage().data_ptr() not in excluded:
            seen.setdefault(t.untyped_storage().data_ptr(), t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    totals: dict[str, int] = {}
    for t in seen.values():
        totals[str(t.dtype)] = totals.get(str(t.dtype), 0) + t.untyped_storage().nbytes()
    return totals
