"""Gated MLPs whose projections carry LoRA run as one fused function (``deltatune.kernels.lora_mlp``).

Llama, Mistral, Qwen, Gemma, SmolLM and most recent decoders compute their MLP as::

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

Run module by module, autograd keeps x, gate(x), act(gate(x)), up(x) and their product; the fused
function keeps x, gate(x) and up(x) and recomputes the rest in backward (see the kernel's
docstring for the arithmetic). A module qualifies by what its class's ``forward`` says, not by
its class name: the source must be exactly that expression (any argument name), and ``act_fn``
one of the activations the kernel knows (SiLU, exact or tanh GELU). Its three projections must
be ``nn.Linear`` layers, with or without LoRA.

A qualifying MLP gets an instance-level ``forward`` (a ``FusedMlpForward``) while one of its
projections is a LoRA layer; ``sync_fused_mlps`` adds and removes it as adapters come and go,
so ``unload()`` hands back modules with their class's forward. On every call it checks that
fusing reproduces the modules exactly; otherwise (hooks, a trainable base weight, merged or
disabled adapters everywhere, ``fused``/``fuse_mlp`` off, mixed dtypes) it runs the class's own
forward, which goes through the LoRA layers one by one.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap

import torch
import torch.nn.functional as F
from torch import nn
from transformers import activations

from ..kernels.lora_mlp import Projection, fused_lora_mlp
from .lora import LoraLinear, has_hooks, is_frozen_plain_linear

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_GATED_EXPRESSION = "self.down_proj(self.act_fn(self.gate_proj({x})) * self.up_proj({x}))"


class FusedMlpForward:
    """The instance-level ``forward`` of a gated MLP with LoRA on its projections."""

    def __init__(self, mlp: nn.Module) -> None:
        self.mlp = mlp

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        mlp = self.mlp
        activation = activation_name(mlp.act_fn)
        fused = None if activation is None or has_hooks(mlp.act_fn) else _projections(mlp, x)
        if fused is None:
            return type(mlp).forward(mlp, x)
        projections, adapter_dtype = fused
        return fused_lora_mlp(x, *projections, activation=activation, adapter_dtype=adapter_dtype)

    def __repr__(self) -> str:
        return f"FusedMlpForward({type(self.mlp).__name__})"


def sync_fused_mlps(model: nn.Module) -> None:
    """Give every gated MLP of ``model`` with a LoRA projection a ``FusedMlpForward``; take it from the others."""
    for module in model.modules():
        installed = isinstance(vars(module).get("forward"), FusedMlpForward)
        wanted = is_gated_mlp(module) and bool(_lora_layers(module))
        if wanted and not installed and "forward" not in vars(module):
            module.forward = FusedMlpForward(module)
        elif installed and not wanted:
            del module.forward


def is_gated_mlp(module: nn.Module) -> bool:
    """``module``'s class computes ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` over ``nn.Linear`` projections."""
    return (
        _forward_is_gated(type(module))
        and activation_name(getattr(module, "act_fn", None)) is not None
        and all(type(_base(getattr(module, name, None))) is nn.Linear for name in PROJECTIONS)
    )


def activation_name(act: object) -> str | None:
    """The kernel's name (``ACTIVATIONS``) for the activation module ``act``, or None if it has none."""
    if type(act) in (nn.SiLU, activations.SiLUActivation):
        return "silu"
    if type(act) is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(act.approximate)
    if type(act) is activations.GELUActivation and act.act is F.gelu:
        return "gelu"
    if type(act) is activations.GELUTanh and isinstance(act.act, functools.partial):
        partial = act.act
        if partial.func is F.gelu and not partial.args and partial.keywords == {"approximate": "tanh"}:
            return "gelu_tanh"
    return None


@functools.cache
def _forward_is_gated(cls: type) -> bool:
    """Whether ``cls.forward``'s source is ``return <the gated expression>`` (optionally via one variable)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
    except (OSError, TypeError, SyntaxError):  # no source (built-in, generated, frozen): not recognisable
        return False
    function = tree.body[0]
    if not isinstance(function, ast.FunctionDef) or function.decorator_list:
        return False
    arguments = function.args
    if len(arguments.args) != 2 or arguments.vararg or arguments.kwarg or arguments.kwonlyargs or arguments.posonlyargs:
        return False
    expected = ast.dump(ast.parse(_GATED_EXPRESSION.format(x=arguments.args[1].arg), mode="eval").body)
    body = [statement for statement in function.body if not _is_docstring(statement)]
    if len(body) == 1 and isinstance(body[0], ast.Return):
        return body[0].value is not None and ast.dump(body[0].value) == expected
    if len(body) == 2 and isinstance(body[0], ast.Assign) and isinstance(body[1], ast.Return):
        (target,) = body[0].targets if len(body[0].targets) == 1 else (None,)
        returned = body[1].value
        return (
            isinstance(target, ast.Name)
            and isinstance(returned, ast.Name)
            and returned.id == target.id
            and ast.dump(body[0].value) == expected
        )
    return False


def _is_docstring(statement: ast.stmt) -> bool:
    return isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant) and isinstance(statement.value.value, str)


def _projections(mlp: nn.Module, x: torch.Tensor) -> tuple[tuple[Projection, ...], torch.dtype | None] | None:
    """(gate, up, down as the kernel takes them, the adapters' ``adapter_dtype``), or None where
    fusing would not reproduce the modules or no adapter is active."""
    layers = [getattr(mlp, name) for name in PROJECTIONS]
    lora_layers = [layer for layer in layers if isinstance(layer, LoraLinear)]
    gate, up, down = (_base(layer).weight for layer in layers)
    if not (gate.shape[1] == up.shape[1] == x.shape[-1] and gate.shape[0] == up.shape[0] == down.shape[1]):
        return None
    if len({(w.dtype, w.device) for w in (gate, up, down)}) != 1 or len({l.adapter_dtype for l in lora_layers}) != 1:
        return None
    projections, any_adapter = [], False
    for layer in layers:
        base = _base(layer)
        if isinstance(layer, LoraLinear):
            names = layer.unmerged_active()
            if not (layer.fuse_mlp and not has_hooks(layer) and layer.fusable(x, names)):
                return None
            projections.append(Projection(base.weight, base.bias, layer.factors(names)))
            any_adapter = any_adapter or bool(names)
        elif is_frozen_plain_linear(base, x):
            projections.append(Projection(base.weight, base.bias))
        else:
            return None
    return (tuple(projections), lora_layers[0].adapter_dtype) if any_adapter else None


def _lora_layers(mlp: nn.Module) -> list[LoraLinear]:
    layers = [getattr(mlp, name, None) for name in PROJECTIONS]
    return [layer for layer in layers if isinstance(layer, LoraLinear)]


def _base(layer: nn.Module | None) -> nn.Module | None:
    return layer.base_layer if isinstance(layer, LoraLinear) else layer
