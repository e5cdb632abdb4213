"""Comparisons the fused-kernel tests share: relative closeness to a float64 reference, bytes saved for backward,
the largest logits a loss forms."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# the kernels' formula tests run on every device present (a GPU machine adds "cuda"; none is skipped here)
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def assert_close_rel(got: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> None:
    error = (got.double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert error <= tol * scale, f"{what}: max error {error:.3g} vs max |ref| {scale:.3g}"


def assert_matches_reference(y, ref_y, leaves: dict, copies: dict, tol: float, node: str) -> None:
    """A fused function's output ``y`` and the gradients of its ``leaves`` (name -> tensor or None) against
    a float64 reference ``ref_y`` computed from ``copies`` (name -> float64 copy), under one random dy."""
    assert y.grad_fn.name() == node
    assert_close_rel(y, ref_y, tol, "output")
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(y.device, y.dtype)
    y.backward(dy)
    ref_y.backward(dy.double())
    for name, leaf in leaves.items():
        if leaf is not None:
            assert leaf.grad is not None and leaf.grad.dtype == leaf.dtype, name
            assert_close_rel(leaf.grad, copies[name].grad, tol, f"gradient of {name}")


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


class LargestVocabTensor(TorchDispatchMode):
    """Records the most rows any new tensor whose last dimension is the vocabulary (``vocab``) had (views of
    the model's weights, such as the head's Wᵀ, are not logits and are left out)."""

    def __init__(self, model: torch.nn.Module, vocab: int) -> None:
        super().__init__()
        self.weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.vocab, self.rows = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[-1] == self.vocab:
                if t.untyped_storage().data_ptr() not in self.weights:
                    self.rows = max(self.rows, t.numel() // self.vocab)
        return out
