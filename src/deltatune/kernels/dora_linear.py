"""DoRA on a linear layer as one autograd function: LoRA's fused GEMM plus a magnitude per output row.

DoRA (Liu et al., 2024, arXiv:2402.09353) splits the adapted weight into a direction and a
magnitude m [d]: W' = m ⊙ (W + s·BA) / n with n = ||W + s·BA|| per row, n a constant for the
gradient (the paper's §4.3, as peft). Adapters i = 1..k apply in order, as peft applies them: a
DoRA adapter rescales everything before it, y ← g_i ⊙ (y − b + s_i B_i A_i x) + b with
g_i = m_i / n_i, a plain LoRA adapter adds its term (g_i = 1). Unrolled, with G_i = Π_{j≥i} g_j
(the gain on adapter i's term) and c = G_1 (the gain on the base)::

    z    = x Wᵀ                                               [N, d]   saved
    y    = c ⊙ z + b + Σ_i s_i h_i (G_i ⊙ B_i)ᵀ,   h_i = (x ⊙ M_i / q_i) A_iᵀ   (h_i saved, rank r)
    dx   = (dy ⊙ c) W + Σ_i (s_i / q_i) (dy (G_i ⊙ B_i)) A_i ⊙ M_i
    dB_i = G_i ⊙ P_i,   P_i = s_i dyᵀ h_i                     [d, r]
    dm_k = (c/g_k ⊙ Σ_rows dy ⊙ z + Σ_{i≤k} G_i/g_k ⊙ Σ_r B_i ⊙ P_i) / n_k   (the quotients as products over j ≠ k)

With one adapter this is y = g ⊙ (x Wᵀ + s·B A x) + b. Nothing d x k is formed, in the step or
for n: ||W_o + s (BA)_o||² = ||W_o||² + 2s B_o·(W Aᵀ)_o + s² B_o (A Aᵀ) B_oᵀ needs W Aᵀ [d, r]
and A Aᵀ [r, r] only (``weight_norm``). peft forms B A [d, k] on every call.

Dropout acts on the low-rank path only, as in LoRA. With dropout on, peft instead applies the base
part of the DoRA correction, (m/n − 1) ⊙ W x, to the dropped-out input (running x Wᵀ twice);
without dropout (p = 0, or in eval mode) both compute the same function.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from deltatune.kernels.base_weight import dense
from deltatune.kernels.lora_linear import (
    LoraFactors,
    ProjectionSpec,
    _any_requires_grad,
    _autocast_off,
    _cast,
    _rows,
    adapter_backward,
    add_adapter_products,
    base_product,
    projection_spec,
)


def weight_norm(
    weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, fan_in_fan_out: bool
) -> torch.Tensor:
    """||W + s·B A|| per output row [d], in fp32, from rank-r products (W is [d, k], or [k, d] with
    ``fan_in_fan_out``)."""
    with torch.no_grad():
        w = dense(weight)
        w = w.t() if fan_in_fan_out else w
        a32, b32 = a.float(), b.float()
        squared = torch.linalg.vector_norm(w, dim=1, dtype=torch.float32).square()
        cross = (b32 * torch.mm(w, _cast(a, w.dtype).t()).float()).sum(1)
        lora = (torch.mm(b32, torch.mm(a32, a32.t())) * b32).sum(1)
        return (squared + 2 * scaling * cross + scaling**2 * lora).clamp_min(0).sqrt()


def fused_dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    adapters: Sequence[LoraFactors],
    fan_in_fan_out: bool = False,
    adapter_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The module docstring's y; adapters with ``magnitude``/``norm`` set are DoRA adapters, the others LoRA."""
    spec = projection_spec(x, adapters, fan_in_fan_out, adapter_dtype)
    dora = tuple(f.magnitude is not None for f in adapters)
    a_factors, b_factors = [f.a for f in adapters], [f.b for f in adapters]
    magnitudes = [f.magnitude for f in adapters if f.magnitude is not None]
    norms = [f.norm for f in adapters if f.magnitude is not None]
    if torch.is_grad_enabled() and _any_requires_grad(x, bias, *a_factors, *b_factors, *magnitudes):
        return _DoraLinearFunction.apply(x, weight, bias, spec, dora, *a_factors, *b_factors, *magnitudes, *norms)
    with _autocast_off(x.device.type):
        return dora_forward(x, weight, bias, spec, dora, a_factors, b_factors, magnitudes, norms)[0]


def _gains(dora: tuple[bool, ...], magnitudes, norms) -> list[torch.Tensor | None]:
    """g_i = m_i / n_i [d] in fp32 for each DoRA adapter, None for a plain LoRA one."""
    pairs, gains = iter(zip(magnitudes, norms)), []
    for is_dora in dora:
        if is_dora:
            magnitude, norm = next(pairs)
            gains.append(magnitude.reshape(-1).float() / norm)
        else:
            gains.append(None)
    return gains


def _product(gains: Sequence[torch.Tensor | None], skip: int = -1) -> torch.Tensor | None:
    """Π g_j over ``gains`` (None entries are 1), leaving out index ``skip``; None when nothing is multiplied."""
    factors = [g for j, g in enumerate(gains) if g is not None and j != skip]
    return None if not factors else torch.stack(factors).prod(0) if len(factors) > 1 else factors[0]


def _suffix_gains(gains) -> list[torch.Tensor | None]:
    """G_i = Π_{j≥i} g_j, the gain on adapter i's term (None: 1)."""
    return [_product(gains[i:]) for i in range(len(gains))]


def _scaled_b(b_factors, suffix_gains) -> list[torch.Tensor]:
    """G_i ⊙ B_i (rows scaled), or B_i where G_i = 1."""
    return [b if g is None else b.float() * g[:, None] for b, g in zip(b_factors, suffix_gains)]


def dora_forward(x, weight, bias, spec: ProjectionSpec, dora, a_factors, b_factors, magnitudes, norms):
    """(y, [h_i], z): the module docstring's forward, autocast off; z = x Wᵀ as [N, out]."""
    rows = _rows(x, spec.compute_dtype)
    z = base_product(rows, weight, None, spec)
    suffix = _suffix_gains(_gains(dora, magnitudes, norms))
    out = z * suffix[0].to(z.dtype)  # c = G_1; the caller passes at least one DoRA adapter
    if bias is not None:
        out.add_(_cast(bias, out.dtype))
    hidden = add_adapter_products(out, rows, spec, a_factors, _scaled_b(b_factors, suffix))
    return out.view(*x.shape[:-1], out.shape[-1]), hidden, z


def dora_backward(
    dy,
    x,
    weight,
    spec: ProjectionSpec,
    dora,
    a_factors,
    b_factors,
    magnitudes,
    norms,
    hidden,
    *,
    z=None,
    out=None,
    bias=None,
    need_x: bool,
    bias_dtype,
    need_a,
    need_b,
    need_m,
    dx_into=None,
):
    """(dx, db, [dA_i], [dB_i], [dm_k]) of the module docstring, autocast off.

    Σ_rows dy ⊙ z comes from the saved z, or, where the caller keeps the output y instead (a fused
    MLP keeps gate(x) and up(x) anyway), from y: Σ dy ⊙ z = (Σ dy ⊙ y − (Σ dy) ⊙ b − Σ_i G_i ⊙ Σ_r B_i ⊙ P_i) / c,
    a division per output unit, never per element. ``need_m`` has one flag per adapter (False for LoRA ones).
    """
    dy = _cast(dy.reshape(-1, dy.shape[-1]), spec.compute_dtype)
    gains = _gains(dora, magnitudes, norms)
    suffix = _suffix_gains(gains)
    dx = None
    if need_x:
        w = dense(weight, spec.compute_dtype)
        w = w.t() if spec.fan_in_fan_out else w
        scaled_dy = dy * suffix[0].to(dy.dtype)
        dx = torch.mm(scaled_dy, w) if dx_into is None else dx_into.addmm_(scaled_dy, w)
        del scaled_dy
    column_sums = (
        dy.sum(0, dtype=torch.float32) if bias_dtype is not None or (out is not None and bias is not None) else None
    )
    dbias = _cast(column_sums, bias_dtype) if bias_dtype is not None else None
    grads_a, products = adapter_backward(
        dy,
        x,
        spec,
        a_factors,
        _scaled_b(b_factors, suffix),
        hidden,
        dx,
        need_a,
        [nb or any(need_m[i:]) for i, nb in enumerate(need_b)],
    )
    grads_b = [
        None if not need_b[i] else p if g is None else _cast(p.float() * g[:, None], b.dtype)
        for i, (b, g, p) in enumerate(zip(b_factors, suffix, products))
    ]
    grads_m: list[torch.Tensor | None] = [None] * len(norms)
    if any(need_m):
        through_b = [None if p is None else (b.float() * p.float()).sum(1) for b, p in zip(b_factors, products)]
        if z is not None:
            through_z = (dy * z.reshape(dy.shape)).sum(0, dtype=torch.float32)
        else:
            through_out = (dy * out.reshape(dy.shape)).sum(0, dtype=torch.float32)
            if bias is not None:
                through_out -= column_sums * bias.float()
            for g, t in zip(suffix, through_b):
                if t is not None:
                    through_out -= _times(g, t)
            through_z = through_out / suffix[0]
        grads_m = _magnitude_grads(through_z, through_b, gains, need_m, norms, magnitudes)
    return dx, dbias, grads_a, grads_b, grads_m


class _DoraLinearFunction(torch.autograd.Function):
    """Saves x, z = x Wᵀ and the h_i; W, A, B, m are parameters and n [d] a constant."""

    @staticmethod
    def forward(ctx, x, weight, bias, spec: ProjectionSpec, dora, *tensors):
        count, dora_count = len(dora), sum(dora)
        a_factors, b_factors = tensors[:count], tensors[count : 2 * count]
        magnitudes, norms = tensors[2 * count : 2 * count + dora_count], tensors[2 * count + dora_count :]
        with _autocast_off(x.device.type):
            out, hidden, z = dora_forward(x, weight, bias, spec, dora, a_factors, b_factors, magnitudes, norms)
        ctx.spec, ctx.dora = spec, dora
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x, weight, z, *tensors, *hidden)
        return out

    @staticmethod
    def backward(ctx, dy):
        spec, dora = ctx.spec, ctx.dora
        count, dora_count = len(dora), sum(dora)
        x, weight, z, *rest = ctx.saved_tensors
        a_factors, b_factors = rest[:count], rest[count : 2 * count]
        magnitudes = rest[2 * count : 2 * count + dora_count]
        norms = rest[2 * count + dora_count : 2 * count + 2 * dora_count]
        hidden = rest[2 * count + 2 * dora_count :]
        needs = ctx.needs_input_grad
        with _autocast_off(dy.device.type):
            dx, dbias, grads_a, grads_b, grads_m = dora_backward(
                dy,
                x,
                weight,
                spec,
                dora,
                a_factors,
                b_factors,
                magnitudes,
                norms,
                hidden,
                z=z,
                need_x=needs[0],
                bias_dtype=ctx.bias_dtype if needs[2] else None,
                need_a=needs[5 : 5 + count],
                need_b=needs[5 + count : 5 + 2 * count],
                need_m=per_adapter(dora, needs[5 + 2 * count : 5 + 2 * count + dora_count], False),
            )
        if dx is not None:
            dx = _cast(dx.view(x.shape), x.dtype)
        return (dx, None, dbias, None, None, *grads_a, *grads_b, *grads_m, *([None] * dora_count))


def per_adapter(dora: Sequence[bool], dora_values: Sequence, default) -> list:
    """One entry per adapter from one entry per DoRA adapter (``default`` for the LoRA ones)."""
    values = iter(dora_values)
    return [next(values) if is_dora else default for is_dora in dora]


def _magnitude_grads(through_z, through_b, gains, need_m, norms, magnitudes) -> list[torch.Tensor | None]:
    """dm_k for each DoRA adapter k (the module docstring's formula), in its magnitude's dtype; None where not
    needed."""
    grads, dora_index = [], 0
    for k, gain in enumerate(gains):
        if gain is None:
            continue
        if need_m[k]:
            total = _times(_product(gains, skip=k), through_z)
            for i in range(k + 1):
                total = total + _times(_product(gains[i:], skip=k - i), through_b[i])
            grads.append(_cast(total / norms[dora_index], magnitudes[dora_index].dtype))
        else:
            grads.append(None)
        dora_index += 1
    return grads


def _times(gain: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    return value if gain is None else gain * value
