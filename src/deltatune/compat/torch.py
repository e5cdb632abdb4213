"""What deltatune assumes about torch's private module state.

The fused paths run a layer's weight through their own function instead of calling the layer, which is
only exact when calling it would do nothing more than its class's ``forward``. Whether a hook would run
is read from ``nn.Module``'s private hook dicts (per module, and the global ones in
``torch.nn.modules.module``); ``tests/test_compat.py`` checks each still exists and still fills when a
hook is registered.

Decoding on CPU runs frozen linear layers through oneDNN's inner product over weights reordered once into
its blocked layout (``kernels.packed_linear``). The two operators are private to torch (the ones its
inductor uses for frozen weights): ``torch.ops.mkldnn._reorder_linear_weight(weight, batch_size)`` returns the
packed weight as an opaque tensor, and ``torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")``
computes ``x Wᵀ + b`` over the last dim of ``x``; ``tests/test_compat.py`` checks both against ``F.linear``.

A module's hook is registered through a ``torch.utils.hooks.RemovableHandle``, whose class counts every handle it
gives out (``next_id``): ``hook_registrations`` reads that count, so that set-up kept across forwards on the
strength of "no hooks here" is redone when any hook may have come; the test checks it still counts.

What was derived from tensors (packed weights, stacked adapters, cached keys and values of a prompt prefix) is
checked against them by ``write_stamps``: each tensor's storage and its private version counter ``_version``,
which every in-place write (``copy_``, an optimizer's step, ``load_state_dict``) increments; the test checks it
still does.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
from torch import nn

_MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)


def has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` does more than its class's ``forward``: hooks (its own or global), or a patched
    forward."""
    return any_hooks((module,))


def any_hooks(modules: Iterable[nn.Module]) -> bool:
    """Whether calling any of ``modules`` does more than its class's ``forward`` (``has_hooks``; the global hooks
    read once)."""
    if any(getattr(nn.modules.module, name) for name in _GLOBAL_HOOKS):
        return True
    return any("forward" in vars(module) or any(getattr(module, name) for name in _MODULE_HOOKS) for module in modules)


def hook_registrations() -> int:
    """How many hooks (of any module or tensor) were registered in this process so far: a count that changes when
    a hook may have come (``RemovableHandle.next_id``)."""
    return torch.utils.hooks.RemovableHandle.next_id


def write_stamps(tensors: Iterable[torch.Tensor]) -> list[tuple[int, int]]:
    """Each tensor's (storage address, in-place write count): equal lists mean the same tensors, unwritten."""
    return [(tensor.data_ptr(), tensor._version) for tensor in tensors]


def onednn_packing_available() -> bool:
    """Whether this torch has oneDNN and its linear-weight packing operators (x86 CPU builds do)."""
    ops = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
    )


@functools.cache
def onednn_packs(dtype: torch.dtype) -> bool:
    """Whether this machine packs and multiplies ``dtype`` weights through oneDNN: the operators exist, and the CPU
    has what oneDNN needs for the dtype (bf16 packing refuses a CPU without AVX-512 BW/VL/DQ or AVX-NE-CONVERT).
    Found once per dtype by packing and multiplying a tiny weight."""
    if not onednn_packing_available():
        return False
    try:
        onednn_linear(torch.ones(2, 8, dtype=dtype), onednn_pack(torch.ones(8, 8, dtype=dtype)), None)
    except RuntimeError:
        return False
    return True


def onednn_pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` [out, in] reordered into oneDNN's blocked layout for its inner product (an opaque tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


def onednn_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x Wᵀ + b`` over the last dim of ``x``, ``W`` packed by ``onednn_pack`` (no autograd)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, None if bias is None else bias.detach(), "none", [], "")
