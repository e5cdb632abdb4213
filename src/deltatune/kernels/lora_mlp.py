"""A gated MLP with LoRA on its projections as one autograd function: y = down(act(gate(x)) ⊙ up(x)).

    x ──► gate: W_g + LoRA ──► g ──► act ──► a ──┐
    │                                           (⊙) ──► h ──► down: W_d + LoRA ──► y
    └───► up:   W_u + LoRA ──► u ────────────────┘

Saved for backward: x, g and u, plus each adapter's rank-r product; nothing else. Backward
recomputes a = act(g) and h = a ⊙ u (two elementwise passes) instead of keeping them:

    dh = dy W_d + LoRA terms          (dA_d, dB_d use dy and the recomputed h)
    du = dh ⊙ a,    dg = act'(g) ⊙ (dh ⊙ u)
    dx = dg W_g + du W_u + LoRA terms of gate and up      (both added into one [N, in] tensor)

Per token the MLP keeps hidden + 2·intermediate values. The autograd graph of the same modules
keeps g (for act's backward), a and u (for the product's) and, because each LoRA layer must
keep its input for dA, x and h too: hidden + 4·intermediate. The frozen model without adapters
keeps g, a and u: 3·intermediate, more than this function whenever intermediate > hidden.
Each projection's own math (dtypes, autocast, dropout masks regenerated from seeds, several
adapters, bias) is ``lora_linear``'s; a projection may have no adapter at all. A projection with
DoRA adapters runs ``dora_linear``'s math: gate and up need nothing more saved (DoRA's magnitude
gradient needs Σ_rows dy ⊙ x Wᵀ, which backward reads from g and u themselves), down keeps
z_d = h W_dᵀ [N, hidden] (its output is not kept here), and every DoRA projection its norm [out].

The elementwise steps are where a GPU spends the recomputation: eagerly, h = act(g) ⊙ u is two
kernels and (dg, du) three, each reading and writing [N, intermediate] tensors. With
``compile_elementwise`` (the default on CUDA, while gradients are on) each becomes one
``torch.compile``d kernel, over 2-D [N, intermediate] views in both directions so that one graph
per dtype serves every batch shape: h reads g, u and writes h; (dg, du) reads g, u, dh and writes
dg, du. Counting each read or write of an [N, intermediate] tensor as a pass: 3 instead of 5 in
forward, 8 instead of 14 in backward, where the frozen model's own autograd makes 5 and 9. If
compiling fails (no compiler for the device, say), a warning says so once and the eager kernels
run from then on; errors of running (out of memory) propagate as they would eagerly.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from deltatune.kernels.dora_linear import dora_backward, dora_forward, per_adapter
from deltatune.kernels.lora_linear import (
    LoraFactors,
    ProjectionSpec,
    _any_requires_grad,
    _autocast_off,
    _cast,
    linear_backward,
    linear_forward,
    projection_spec,
)


class Activation(NamedTuple):
    """An elementwise activation: ``forward(g)`` and ``backward(grad, g)`` = grad ⊙ act'(g)."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    backward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


ACTIVATIONS: dict[str, Activation] = {
    "silu": Activation(F.silu, torch.ops.aten.silu_backward),
    "gelu": Activation(F.gelu, functools.partial(torch.ops.aten.gelu_backward, approximate="none")),
    "gelu_tanh": Activation(
        functools.partial(F.gelu, approximate="tanh"),
        functools.partial(torch.ops.aten.gelu_backward, approximate="tanh"),
    ),
}


class Projection(NamedTuple):
    """One frozen ``nn.Linear`` of the MLP (weight [out, in], bias or None) and its active adapters."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    adapters: Sequence[LoraFactors] = ()


class MlpSpec(NamedTuple):
    """The non-tensor arguments of one call: each projection's constants and the activation's name."""

    projections: tuple[ProjectionSpec, ProjectionSpec, ProjectionSpec]  # gate, up, down
    activation: str
    compile_elementwise: bool
    dora: tuple[tuple[bool, ...], ...] = ((), (), ())  # per projection: which adapters are DoRA adapters


def fused_lora_mlp(
    x: torch.Tensor,
    gate: Projection,
    up: Projection,
    down: Projection,
    activation: str,
    adapter_dtype: torch.dtype | None = None,
    compile_elementwise: bool | None = None,
) -> torch.Tensor:
    """``down(act(gate(x)) ⊙ up(x))`` with each projection's LoRA terms, through the backward above.

    ``activation`` is a key of ``ACTIVATIONS``. Dtypes follow ``fused_lora_linear``: the base
    GEMMs in the activation (or autocast) dtype, the rank-r math too unless ``adapter_dtype``.
    ``compile_elementwise`` (default: on CUDA) runs the elementwise steps as compiled kernels while
    gradients are on.
    """
    projections = (gate, up, down)
    compiled = x.is_cuda if compile_elementwise is None else compile_elementwise
    compiled = compiled and torch.is_grad_enabled()  # inference (decoding, evaluation) stays eager: fewer graphs
    specs = tuple(projection_spec(x, p.adapters, False, adapter_dtype) for p in projections)
    dora = tuple(tuple(f.magnitude is not None for f in p.adapters) for p in projections)
    spec = MlpSpec(specs, activation, compiled, dora)
    factors = [t for p in projections for t in _adapter_tensors(p.adapters)]
    tensors = [t for p in projections for t in (p.weight, p.bias)] + factors
    if torch.is_grad_enabled() and _any_requires_grad(x, *(p.bias for p in projections), *factors):
        return _LoraMlpFunction.apply(x, spec, *tensors)
    with _autocast_off(x.device.type):  # nothing to differentiate: skip autograd's bookkeeping
        return _forward(x, spec, *_unpack(spec, tensors))[0]


def _adapter_tensors(adapters: Sequence[LoraFactors]) -> list[torch.Tensor]:
    """A..., B..., then m..., n... of the DoRA adapters: one projection's share of the flat arguments."""
    doras = [f for f in adapters if f.magnitude is not None]
    return [*(f.a for f in adapters), *(f.b for f in adapters), *(f.magnitude for f in doras), *(f.norm for f in doras)]


class _Unpacked(NamedTuple):
    """The flat arguments of the function (tensors, or which of them need a gradient), per projection."""

    weights: list
    biases: list
    a_factors: list[Sequence]
    b_factors: list[Sequence]
    magnitudes: list[Sequence]
    norms: list[Sequence]


def _unpack(spec: MlpSpec, flat: Sequence) -> _Unpacked:
    """Split [W_g, b_g, W_u, b_u, W_d, b_d, then per projection A..., B..., m..., n...] per projection."""
    counts = [(len(p.scalings), sum(d)) for p, d in zip(spec.projections, spec.dora)]
    groups = _split(flat[6:], [2 * count + 2 * doras for count, doras in counts])
    parts = [_split(group, [count, count, doras, doras]) for group, (count, doras) in zip(groups, counts)]
    return _Unpacked(list(flat[0:6:2]), list(flat[1:6:2]), *(list(column) for column in zip(*parts)))


def _split(flat: Sequence, sizes: Sequence[int]) -> list[Sequence]:
    """``flat`` cut into consecutive groups of ``sizes``."""
    groups, start = [], 0
    for size in sizes:
        groups.append(flat[start : start + size])
        start += size
    return groups


def _forward(x, spec: MlpSpec, weights, biases, a_factors, b_factors, magnitudes, norms):
    """(y, g, u, [rank-r products per projection], z_d) with autocast off; z_d = h W_dᵀ when down has DoRA."""

    def project(i, inputs):
        if any(spec.dora[i]):
            return dora_forward(
                inputs,
                weights[i],
                biases[i],
                spec.projections[i],
                spec.dora[i],
                a_factors[i],
                b_factors[i],
                magnitudes[i],
                norms[i],
            )
        return (*linear_forward(inputs, weights[i], biases[i], spec.projections[i], a_factors[i], b_factors[i]), None)

    g, hidden_g, _ = project(0, x)  # DoRA's z of gate and up is never kept: backward reads it from g and u
    u, hidden_u, _ = project(1, x)
    rows_g, rows_u = g.reshape(-1, g.shape[-1]), u.reshape(-1, u.shape[-1])  # 2-D, as in backward: one graph
    h = _elementwise(gated_product, spec.compile_elementwise)(rows_g, rows_u, spec.activation).view(g.shape)
    y, hidden_d, z_d = project(2, h)
    return y, g, u, (hidden_g, hidden_u, hidden_d), z_d


def gated_product(g: torch.Tensor, u: torch.Tensor, activation: str) -> torch.Tensor:
    """h = act(g) ⊙ u."""
    return ACTIVATIONS[activation].forward(g).mul_(u)


def gated_grads(
    g: torch.Tensor, u: torch.Tensor, dh: torch.Tensor, activation: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dg, du) = (act'(g) ⊙ dh ⊙ u, dh ⊙ act(g)), the gradients through h = act(g) ⊙ u."""
    act = ACTIVATIONS[activation]
    return act.backward(dh * u, g), dh * act.forward(g)


_compile_failed = False


def _elementwise(fn: Callable, compiled: bool) -> Callable:
    """``fn`` itself, or ``fn`` compiled into one kernel (falling back to ``fn`` for good if compiling fails)."""
    if not compiled or _compile_failed or torch.compiler.is_compiling():  # inside a compiled model, dynamo fuses it
        return fn
    return functools.partial(_run_compiled, fn)


def _run_compiled(fn: Callable, *args):
    global _compile_failed
    try:
        return _compiled(fn)(*args)
    except (
        torch._dynamo.exc.TorchDynamoException
    ) as error:  # e.g. no compiler for the device (not OOM: that propagates)
        _compile_failed = True
        warnings.warn(
            f"deltatune: compiling the fused MLP's elementwise kernels failed ({type(error).__name__}: {error}); "
            f"running them eagerly from now on",
            RuntimeWarning,
            stacklevel=2,
        )
        return fn(*args)


@functools.cache
def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=True)


class _LoraMlpFunction(torch.autograd.Function):
    """Forward and backward of the module docstring; saves x, g, u, the weights, factors and rank-r products
    (and, when down has a DoRA adapter, z_d = h W_dᵀ)."""

    @staticmethod
    def forward(ctx, x, spec: MlpSpec, *tensors):
        unpacked = _unpack(spec, tensors)
        with _autocast_off(x.device.type):
            y, g, u, hidden, z_d = _forward(x, spec, *unpacked)
        ctx.spec = spec
        ctx.bias_dtypes = [None if b is None else b.dtype for b in unpacked.biases]
        ctx.save_for_backward(x, g, u, z_d, *tensors, *(h for group in hidden for h in group))
        return y

    @staticmethod
    def backward(ctx, dy):
        spec: MlpSpec = ctx.spec
        x, g, u, z_d, *rest = ctx.saved_tensors
        tensor_count = 6 + sum(2 * len(p.scalings) + 2 * sum(d) for p, d in zip(spec.projections, spec.dora))
        unpacked = _unpack(spec, rest[:tensor_count])
        hidden = _split(rest[tensor_count:], [len(p.scalings) for p in spec.projections])  # rank-r products
        needs = _unpack(spec, ctx.needs_input_grad[2:])  # the same layout: after x and spec come W_g, b_g, ...
        bias_dtypes = [dtype if need else None for dtype, need in zip(ctx.bias_dtypes, needs.biases)]
        need_m = [per_adapter(spec.dora[i], needs.magnitudes[i], False) for i in range(3)]
        need_x = ctx.needs_input_grad[0]
        need_dh = need_x or any(
            bias_dtypes[i] is not None or any(needs.a_factors[i]) or any(needs.b_factors[i]) or any(need_m[i])
            for i in range(2)
        )  # anything upstream of h
        activation = ACTIVATIONS[spec.activation]
        g, u = g.reshape(-1, g.shape[-1]), u.reshape(-1, u.shape[-1])
        grads = [(None, [None] * len(hidden[i]), [None] * len(hidden[i]), []) for i in range(3)]

        def project_back(i, d_out, inputs, need_inputs, dx_into=None, **dora_source):
            """(d inputs, db, [dA], [dB], [dm]) of projection i (0 gate, 1 up, 2 down)."""
            common = dict(need_a=needs.a_factors[i], need_b=needs.b_factors[i], bias_dtype=bias_dtypes[i])
            if any(spec.dora[i]):
                return dora_backward(
                    d_out,
                    inputs,
                    unpacked.weights[i],
                    spec.projections[i],
                    spec.dora[i],
                    unpacked.a_factors[i],
                    unpacked.b_factors[i],
                    unpacked.magnitudes[i],
                    unpacked.norms[i],
                    hidden[i],
                    need_x=need_inputs,
                    need_m=need_m[i],
                    dx_into=dx_into,
                    **dora_source,
                    **common,
                )
            return (
                *linear_backward(
                    d_out,
                    inputs,
                    unpacked.weights[i],
                    spec.projections[i],
                    unpacked.a_factors[i],
                    unpacked.b_factors[i],
                    hidden[i],
                    need_x=need_inputs,
                    dx_into=dx_into,
                    **common,
                ),
                [],
            )

        dx = None
        compiled = spec.compile_elementwise
        with _autocast_off(dy.device.type):
            a = None if compiled else activation.forward(g)  # eagerly, a serves h and du both
            h = _elementwise(gated_product, True)(g, u, spec.activation) if compiled else a * u
            dh, *grads[2] = project_back(2, dy, h, need_dh, z=z_d)
            del h
            if need_dh and compiled:
                dg, du = _elementwise(gated_grads, True)(g, u, dh, spec.activation)
            elif need_dh:
                du = dh * a
                del a
                dg = activation.backward(dh.mul_(u), g)  # dh ⊙ u is the gradient of a
            if need_dh:
                del dh
                for i, (d_out, out) in enumerate(((dg, g), (du, u))):  # DoRA reads Σ dy ⊙ z from g and u
                    dx, *grads[i] = project_back(i, d_out, x, need_x, dx_into=dx, out=out, bias=unpacked.biases[i])
        if dx is not None:
            dx = _cast(dx.view(x.shape), x.dtype)
        bias_grads = [grad[0] for grad in grads]
        factor_grads = [
            t
            for i, grad in enumerate(grads)
            for t in (*grad[1], *grad[2], *(grad[3] or [None] * sum(spec.dora[i])), *([None] * sum(spec.dora[i])))
        ]
        return (dx, None, None, bias_grads[0], None, bias_grads[1], None, bias_grads[2], *factor_grads)
