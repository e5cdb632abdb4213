"""A LoRA linear layer as one autograd function: the frozen base GEMM plus rank-r terms, nothing d x k.

For x [N, k], a frozen W [d, k] (``nn.Linear``; GPT-2's ``Conv1D`` stores Wᵀ), bias b, and adapters
i = 1..n with A_i [r, k], B_i [d, r], scale s_i and a dropout mask M_i (keep-probability q_i = 1 - p_i)::

    h_i = (x ⊙ M_i / q_i) A_iᵀ                       [N, r]   saved (rank r)
    y   = x Wᵀ + b + Σ_i s_i h_i B_iᵀ                 [N, d]   LoRA terms added into the base GEMM's output
    g_i = dy B_i                                     [N, r]
    dx  = dy W + Σ_i (s_i / q_i) (g_i A_i) ⊙ M_i
    dA_i = (s_i / q_i) g_iᵀ (x ⊙ M_i),   dB_i = s_i dyᵀ h_i,   db = Σ_rows dy

Every product but dy W has r on one side, so no d x k tensor is ever formed (peft's autograd
graph forms none either, but it keeps an extra [N, d] output per adapter and sums two [N, k]
input gradients). Saved for backward: x itself (the same tensor object q/k/v or gate/up
receive, so it is stored once however many projections read it) and the h_i; W, A, B are
parameters. Nothing is cast and then saved: the adapter factors are cast to the activation
dtype (fp32 master weights, bf16 math), or, with ``adapter_dtype=torch.float32``, x is cast
to fp32 in forward and again in backward instead of keeping an fp32 copy.

Dropout regenerates its mask: forward draws one integer seed from torch's global CPU
generator (so ``torch.manual_seed`` reproduces it and activation checkpointing replays it)
and fills M_i from a private generator seeded with it; backward fills the same M_i again.
Nothing of size [N, k] is saved for dropout; it costs a second mask draw in backward. All
1/q factors are applied to rank-r tensors. p is applied as ``quantized_dropout(p)`` (a multiple
of 2⁻¹⁶, within 8e-6 of p), which lets a mask be drawn 16 bits at a time. A ``torch.Generator`` cannot be traced by
``torch.compile``, so the LoRA layer uses the plain autograd path for dropout while compiling.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from deltatune.kernels.base_weight import dense


class LoraFactors(NamedTuple):
    """One adapter of a linear layer: A [r, in], B [out, r], y += scaling · B A dropout(x)."""

    a: torch.Tensor
    b: torch.Tensor
    scaling: float
    dropout: float = 0.0  # the probability applied now: 0 when the dropout module is in eval mode
    magnitude: torch.Tensor | None = None  # DoRA's m [out] (``dora_linear``); None for plain LoRA
    norm: torch.Tensor | None = None  # DoRA's ||W + s·BA|| per row [out], a constant


class ProjectionSpec(NamedTuple):
    """The non-tensor arguments of one projection's call (constants to ``torch.compile``)."""

    fan_in_fan_out: bool
    compute_dtype: torch.dtype  # dtype of the base GEMM (the activation or autocast dtype)
    adapter_dtype: torch.dtype  # dtype of the rank-r math
    scalings: tuple[float, ...]
    dropouts: tuple[float, ...]
    seeds: tuple[int, ...]


def fused_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    adapters: Sequence[LoraFactors],
    fan_in_fan_out: bool = False,
    adapter_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``x Wᵀ + b + Σ s·B A dropout(x)`` over the last dim of ``x`` with the fused backward above.

    ``weight`` is [out, in] (``nn.Linear``) or [in, out] with ``fan_in_fan_out`` (``Conv1D``).
    Under autocast the base GEMM runs in the autocast dtype, as ``F.linear`` would. The adapter
    math runs in that same dtype unless ``adapter_dtype`` (e.g. ``torch.float32``) is given.
    """
    spec = projection_spec(x, adapters, fan_in_fan_out, adapter_dtype)
    a_factors, b_factors = [f.a for f in adapters], [f.b for f in adapters]
    if torch.is_grad_enabled() and _any_requires_grad(x, bias, *a_factors, *b_factors):
        return _LoraLinearFunction.apply(x, weight, bias, spec, *a_factors, *b_factors)
    with _autocast_off(x.device.type):  # nothing to differentiate: skip autograd's bookkeeping
        return linear_forward(x, weight, bias, spec, a_factors, b_factors)[0]


def projection_spec(
    x: torch.Tensor,
    adapters: Sequence[LoraFactors],
    fan_in_fan_out: bool = False,
    adapter_dtype: torch.dtype | None = None,
) -> ProjectionSpec:
    """The constants of one projection's call on input ``x``; draws a dropout seed per adapter with p > 0."""
    compute = autocast_dtype(x.device.type) or x.dtype
    return ProjectionSpec(
        fan_in_fan_out=fan_in_fan_out,
        compute_dtype=compute,
        adapter_dtype=adapter_dtype or compute,
        scalings=tuple(float(f.scaling) for f in adapters),
        dropouts=tuple(quantized_dropout(f.dropout) if f.dropout > 0 else 0.0 for f in adapters),
        seeds=tuple(draw_seed() if f.dropout > 0 else 0 for f in adapters),
    )


def draw_seed() -> int:
    """A dropout seed from torch's global CPU generator (no device sync, replayed by checkpointing)."""
    return int(torch.randint(0, 2**62, (1,)).item())


MASK_LEVELS = 2**16  # dropout probabilities are multiples of 1 / MASK_LEVELS


def quantized_dropout(p: float) -> float:
    """p rounded to a multiple of 2⁻¹⁶ (within 8e-6 of p): the probability ``dropout_mask`` applies exactly."""
    return min(round(p * MASK_LEVELS), MASK_LEVELS - 1) / MASK_LEVELS


def dropout_mask(shape: torch.Size, p: float, seed: int, device: torch.device) -> torch.Tensor:
    """The boolean keep-mask that ``seed`` determines; forward and backward both call this.

    Each element keeps with probability exactly 1 - ``quantized_dropout(p)``: its 16 random bits
    are a quarter of one 64-bit draw, so the generator is called four times less often than by
    ``rand() >= p`` (on CPU, drawing a mask that way costs half of the base GEMM it precedes).
    """
    if device.type == "meta":  # shapes only (tracing, memory estimates): there are no values to draw
        return torch.empty(shape, dtype=torch.bool, device=device)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    count = math.prod(shape)
    bits = torch.empty((count + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None, generator=generator)
    lanes = bits.view(torch.int16)[:count].view(shape)  # uniform over [-2¹⁵, 2¹⁵)
    return lanes >= round(quantized_dropout(p) * MASK_LEVELS) - MASK_LEVELS // 2


class _LoraLinearFunction(torch.autograd.Function):
    """Forward and backward of the module docstring; saves x, W, the factors and the h_i only."""

    @staticmethod
    def forward(ctx, x, weight, bias, spec: ProjectionSpec, *factors):
        count = len(spec.scalings)
        a_factors, b_factors = factors[:count], factors[count:]
        with _autocast_off(x.device.type):
            out, hidden = linear_forward(x, weight, bias, spec, a_factors, b_factors)
        ctx.spec = spec
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x, weight, *a_factors, *b_factors, *hidden)
        return out

    @staticmethod
    def backward(ctx, dy):
        spec: ProjectionSpec = ctx.spec
        count = len(spec.scalings)
        x, weight, *rest = ctx.saved_tensors
        a_factors, b_factors, hidden = rest[:count], rest[count : 2 * count], rest[2 * count :]
        needs = ctx.needs_input_grad
        with _autocast_off(dy.device.type):
            dx, dbias, grads_a, grads_b = linear_backward(
                dy,
                x,
                weight,
                spec,
                a_factors,
                b_factors,
                hidden,
                need_x=needs[0],
                bias_dtype=ctx.bias_dtype if needs[2] else None,
                need_a=needs[4 : 4 + count],
                need_b=needs[4 + count :],
            )
        if dx is not None:
            dx = _cast(dx.view(x.shape), x.dtype)
        return (dx, None, dbias, None, *grads_a, *grads_b)


def linear_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    spec: ProjectionSpec,
    a_factors: Sequence[torch.Tensor],
    b_factors: Sequence[torch.Tensor],
    hidden: Sequence[torch.Tensor],
    need_x: bool,
    bias_dtype: torch.dtype | None,
    need_a: Sequence[bool],
    need_b: Sequence[bool],
    dx_into: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, list[torch.Tensor | None], list[torch.Tensor | None]]:
    """(dx [N, in], db, [dA_i], [dB_i]) of the module docstring for one projection, autocast off.

    ``bias_dtype`` None skips db. ``dx_into`` (an [N, in] tensor in the compute dtype) receives
    dx in place, for two projections that read the same x (gate and up of a gated MLP).
    """
    dx = dbias = None
    dy = _cast(dy.reshape(-1, dy.shape[-1]), spec.compute_dtype)
    if need_x:
        w = dense(weight, spec.compute_dtype)
        w = w.t() if spec.fan_in_fan_out else w
        dx = torch.mm(dy, w) if dx_into is None else dx_into.addmm_(dy, w)
    if bias_dtype is not None:
        dbias = _cast(dy.sum(0), bias_dtype)
    grads_a, grads_b = adapter_backward(dy, x, spec, a_factors, b_factors, hidden, dx, need_a, need_b)
    return dx, dbias, grads_a, grads_b


def adapter_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    spec: ProjectionSpec,
    a_factors: Sequence[torch.Tensor],
    b_factors: Sequence[torch.Tensor],
    hidden: Sequence[torch.Tensor],
    dx: torch.Tensor | None,
    need_a: Sequence[bool],
    need_b: Sequence[bool],
) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
    """([dA_i], [dB_i]) for dy [N, out]; each adapter's share of dx is added into ``dx`` [N, in] in place (None:
    skip)."""
    count = len(spec.scalings)
    grads_a: list[torch.Tensor | None] = [None] * count
    grads_b: list[torch.Tensor | None] = [None] * count
    need_x = dx is not None
    rows = _rows(x, spec.adapter_dtype) if need_x or any(need_a) else None
    dy = _cast(dy, spec.adapter_dtype)
    for i, (a, b, h) in enumerate(zip(a_factors, b_factors, hidden)):
        scaling = spec.scalings[i]
        if need_b[i]:
            grads_b[i] = _cast(torch.mm(dy.t(), h).mul_(scaling), b.dtype)
        if not (need_x or need_a[i]):
            continue
        g = torch.mm(dy, _cast(b, spec.adapter_dtype))
        mask = _mask(rows, spec, i)
        if mask is not None:
            scaling /= 1 - spec.dropouts[i]
        if need_a[i]:
            grads_a[i] = _cast(torch.mm(g.t(), rows if mask is None else rows * mask).mul_(scaling), a.dtype)
        if need_x and mask is None:
            _add_product(dx, g, _cast(a, spec.adapter_dtype), scaling)
        elif need_x:
            dx.add_(torch.mm(g, _cast(a, spec.adapter_dtype)).mul_(mask), alpha=scaling)
    return grads_a, grads_b


def linear_forward(
    x, weight, bias, spec: ProjectionSpec, a_factors, b_factors
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(y, [h_i]): the base GEMM, then each adapter's rank-r product added into its output in place."""
    rows = _rows(x, spec.compute_dtype)
    out = base_product(rows, weight, bias, spec)
    hidden = add_adapter_products(out, rows, spec, a_factors, b_factors)
    return out.view(*x.shape[:-1], out.shape[-1]), hidden


def base_product(
    rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, spec: ProjectionSpec
) -> torch.Tensor:
    """x Wᵀ + b [N, out] in the compute dtype, for x as [N, in] ``rows``; the weight comes through ``dense``."""
    w = dense(weight, spec.compute_dtype)
    w_t = w if spec.fan_in_fan_out else w.t()
    return torch.mm(rows, w_t) if bias is None else torch.addmm(_cast(bias, spec.compute_dtype), rows, w_t)


def add_adapter_products(
    out: torch.Tensor, rows: torch.Tensor, spec: ProjectionSpec, a_factors, b_factors
) -> list[torch.Tensor]:
    """out [N, out] += Σ s_i h_i B_iᵀ in place, h_i = (x ⊙ M_i / q_i) A_iᵀ; returns [h_i] (saved for backward)."""
    rows = _cast(rows, spec.adapter_dtype)
    hidden = []
    for i, (a, b) in enumerate(zip(a_factors, b_factors)):
        mask = _mask(rows, spec, i)
        h = torch.mm(rows if mask is None else rows * mask, _cast(a, spec.adapter_dtype).t())
        if mask is not None:
            h.mul_(1 / (1 - spec.dropouts[i]))
        _add_product(out, h, _cast(b, spec.adapter_dtype).t(), spec.scalings[i])
        hidden.append(h)
    return hidden


def _any_requires_grad(*tensors: torch.Tensor | None) -> bool:
    return any(t is not None and t.requires_grad for t in tensors)


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, skipping the call (a few µs per layer) when ``t`` already has it."""
    return t if t.dtype == dtype else t.to(dtype)


def _rows(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x as a 2-D [N, in] matrix in ``dtype`` (a view when x is contiguous and already in ``dtype``)."""
    return _cast(x.reshape(-1, x.shape[-1]), dtype)


def _mask(rows: torch.Tensor, spec: ProjectionSpec, i: int) -> torch.Tensor | None:
    """Adapter i's boolean dropout mask for ``rows`` (regenerated from its seed), or None without dropout."""
    p = spec.dropouts[i]
    return None if p == 0 else dropout_mask(rows.shape, p, spec.seeds[i], rows.device)


def _add_product(out: torch.Tensor, left: torch.Tensor, right: torch.Tensor, alpha: float) -> None:
    """out += alpha · left @ right, in place; in one GEMM when the dtypes agree."""
    if left.dtype == out.dtype:
        out.addmm_(left, right, alpha=alpha)
    else:
        out.add_(torch.mm(left, right), alpha=alpha)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast runs matrix products in on ``device_type`` now; None when it is off or
    the device has no autocast (``meta``, where asking would raise)."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Explicit dtypes inside the function: autocast would recast the fp32 adapter math."""
    if autocast_dtype(device_type) is not None:
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
