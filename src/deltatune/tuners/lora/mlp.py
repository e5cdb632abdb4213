"""Gated MLPs whose projections carry LoRA run as one fused function (``deltatune.kernels.lora_mlp``).

Llama, Mistral, Qwen, Gemma, SmolLM and most recent decoders compute their MLP as::

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

Run module by module, autograd keeps x, gate(x), act(gate(x)), up(x) and their product; the fused
function keeps x, gate(x) and up(x) and recomputes the rest in backward (see the kernel's
docstring for the arithmetic). A module qualifies by what its class's ``forward`` says, not by
its class name: the source must be exactly that expression (any argument name), and ``act_fn``
one of the activations the kernel knows (SiLU, exact or tanh GELU). Its three projections must
be ``nn.Linear`` layers (or bitsandbytes 4-/8-bit Linears carrying LoRA), with or without LoRA.

A qualifying MLP takes the class ``fused_class(its class)`` (``FusedGatedMlp``'s forward first)
while one of its projections is a LoRA layer; ``sync_fused_mlps`` sets and restores the class as
adapters and wrappers come and go, so ``unload()`` hands back modules of their own class. On
every call the fused forward checks that fusing reproduces the modules exactly; otherwise
(another wrapper on a projection, hooks, a trainable base weight, merged or disabled adapters
everywhere, ``fused``/``fuse_mlp`` off, mixed dtypes or devices, projections that disagree on
``adapter_dtype`` or ``compile_mlp``, any other call signature) it
runs the class's own forward, which goes through the LoRA layers one by one.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from deltatune.compat.torch import has_hooks
from deltatune.compat.transformers import activation_name, forward_input_name
from deltatune.kernels.base_weight import QUANTIZED_LINEARS, is_quantized, logical_shape
from deltatune.kernels.lora_mlp import Projection, fused_lora_mlp
from deltatune.tuners.lora.fallback import log_fallback
from deltatune.tuners.lora.layer import LoraLinear, is_frozen_plain_linear

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_GATED_EXPRESSION = "self.down_proj(self.act_fn(self.gate_proj({x})) * self.up_proj({x}))"


class FusedGatedMlp:
    """Mixed into a qualifying MLP's class while one of its projections is a LoRA layer.

    The MLP's ``__class__`` becomes ``fused_class(its class)`` (a subclass, so ``isinstance`` and
    the state dict are unchanged); ``sync_fused_mlps`` sets and restores it. A class rather than
    an instance attribute, so replicas (``nn.DataParallel``) and copies run their own modules and
    nothing points from the module back to itself.
    """

    _unfused_class: type[nn.Module]

    def forward(self, *args, **kwargs):
        x = _single_input(self._unfused_class, args, kwargs)
        fused = None if x is None else _fused_call(self, x)
        return self._unfused_class.forward(self, *args, **kwargs) if fused is None else fused

    def __reduce_ex__(self, protocol):
        """Pickle through ``_new_fused(original class)``: both importable by name, the generated class is not."""
        _, _, *rest = super().__reduce_ex__(protocol)
        return (_new_fused, (self._unfused_class,), *rest)


@functools.cache
def fused_class(cls: type[nn.Module]) -> type[nn.Module]:
    """``cls`` with ``FusedGatedMlp``'s forward first in its MRO (one class per MLP class)."""
    return type(f"Fused{cls.__name__}", (FusedGatedMlp, cls), {"_unfused_class": cls, "__module__": __name__})


def _new_fused(cls: type[nn.Module]) -> nn.Module:
    """An empty instance of ``fused_class(cls)``; unpickling fills in its state."""
    fused = fused_class(cls)
    return fused.__new__(fused)


def sync_fused_mlps(model: nn.Module) -> None:
    """Give every gated MLP of ``model`` with a LoRA projection the fused class; restore the others'."""
    for module in model.modules():
        installed = isinstance(module, FusedGatedMlp)
        adapted = bool(_lora_layers(module))
        wanted = adapted and is_gated_mlp(module)
        if adapted and not wanted and len(_lora_layers(module)) == len(PROJECTIONS):
            log_fallback(
                f"the MLP {type(module).__name__}",
                "its forward or activation is not one the fused "
                "gated-MLP kernel recognises (deltatune.compat.transformers); its projections fuse one by one",
            )
        if wanted and not installed:
            module.__class__ = fused_class(type(module))
        elif installed and not wanted:
            module.__class__ = module._unfused_class


def is_gated_mlp(module: nn.Module) -> bool:
    """``module``'s class computes ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` over ``nn.Linear`` projections."""
    return (
        _gated_input_name(getattr(module, "_unfused_class", type(module))) is not None
        and activation_name(getattr(module, "act_fn", None)) is not None
        and all(_is_linear(_base(getattr(module, name, None))) for name in PROJECTIONS)
    )


def _is_linear(module: nn.Module | None) -> bool:
    """Exactly ``nn.Linear``, or a bitsandbytes 4-/8-bit Linear (its weight reaches the kernel through ``dense``)."""
    return type(module) is nn.Linear or type(module).__name__ in QUANTIZED_LINEARS


def _gated_input_name(cls: type) -> str | None:
    """The input's name if ``cls.forward`` returns the gated expression; None otherwise."""
    return forward_input_name(cls, _GATED_EXPRESSION)


def _single_input(cls: type, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The one tensor of a call ``mlp(x)`` or ``mlp(<its input name>=x)``; None for any other call."""
    if len(args) == 1 and not kwargs:
        return args[0]
    if not args and len(kwargs) == 1:
        return kwargs.get(_gated_input_name(cls))
    return None


def _fused_call(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The MLP's output through ``fused_lora_mlp``, or None where that would not reproduce the modules
    (the caller then runs the class's forward, module by module) or no adapter is active."""
    activation = activation_name(mlp.act_fn)
    if activation is None or has_hooks(mlp.act_fn) or not isinstance(x, torch.Tensor):
        return None
    layers = [getattr(mlp, name) for name in PROJECTIONS]
    if not all(_is_linear(_base(layer)) for layer in layers):  # e.g. wrapped by another method meanwhile
        return None
    weights = [layer.base_weight if isinstance(layer, LoraLinear) else layer.weight for layer in layers]
    gate, up, down = (logical_shape(w) for w in weights)
    if not (gate[1] == up[1] == x.shape[-1] and gate[0] == up[0] == down[1]):
        return None
    lora_layers = [layer for layer in layers if isinstance(layer, LoraLinear)]
    # one dtype (quantised weights: the compute dtype each layer's ``fusable`` checks) and x's device
    same_setup = len({w.dtype for w in weights if not is_quantized(w)}) <= 1 and {w.device for w in weights} == {
        x.device
    }
    if not same_setup or len({(layer.adapter_dtype, layer.compile_mlp) for layer in lora_layers}) != 1:
        return None
    projections, any_adapter = [], False
    for layer in layers:
        base = _base(layer)
        if isinstance(layer, LoraLinear):
            names = layer.unmerged_active()
            if not (layer.fuse_mlp and not has_hooks(layer) and layer.fusable(x, names)):
                return None
            projections.append(Projection(layer.base_weight, base.bias, layer.factors(names)))
            any_adapter = any_adapter or bool(names)
        elif type(base) is nn.Linear and is_frozen_plain_linear(base, x):
            projections.append(Projection(base.weight, base.bias))
        else:
            return None
    if not any_adapter:
        return None
    return fused_lora_mlp(
        x,
        *projections,
        activation=activation,
        adapter_dtype=lora_layers[0].adapter_dtype,
        compile_elementwise=lora_layers[0].compile_mlp,
    )


def _lora_layers(mlp: nn.Module) -> list[LoraLinear]:
    layers = [getattr(mlp, name, None) for name in PROJECTIONS]
    return [layer for layer in layers if isinstance(layer, LoraLinear)]


def _base(layer: nn.Module | None) -> nn.Module | None:
    return layer.base_layer if isinstance(layer, LoraLinear) else layer
