"""LoRA on raw ``nn.Parameter``s (``LoraConfig.target_parameters``): fused mixture-of-experts weights.

transformers 5 keeps all experts of an MoE layer in 3-D parameters (Qwen3-MoE, Mixtral, gpt-oss:
``mlp.experts.gate_up_proj`` [E, out, in], ``mlp.experts.down_proj``), with no ``nn.Linear`` to wrap.
Each expert e gets its own rank-r update, and the module that owns the parameter runs as usual but
sees the adapted weight::

    W[e] = W0[e] + s · B_e A_e        A_e = lora_A[e·r:(e+1)·r, :]   [r, in]
                                      B_e = lora_B[:, e::E]         [out, r]

``lora_A`` is [E·r, in] (expert-major rows) and ``lora_B`` is [out, r·E] (expert-minor columns),
exactly peft's file layout. A 2-D parameter [out, in] is the case E = 1 (plain ``B @ A``); a module
flagged ``is_transposed`` stores [E, in, out] and gets the transposed update.

As in peft: entries match ``<module name>.<parameter name>`` (equal, or a suffix after a "."), with
no layer filter (``layers_to_transform`` and ``exclude_modules`` apply to modules only); several
parameters of one module are wrapped one inside the other in the order the module registers them
(so the inner one's file keys read ``<module>.base_layer.lora_A.weight``); every adapter of a model
that targets parameters targets the same ones; ``target_modules=None`` then means no module (saved as
``[]``; peft reads ``[]`` and null alike); the update applies when the owner module is called, so code
that reads the parameter from outside the owner sees W0. Refused as peft refuses them: ``lora_dropout`` (the
layer never sees the input
that dropout would act on), DoRA, ``lora_bias``, ``fan_in_fan_out``, initialisations from the base
weight (PiSSA, OLoRA, orthogonal).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import nn

from deltatune.errors import ConfigError
from deltatune.tuners.base import replace_module
from deltatune.tuners.lora.config import LoraConfig
from deltatune.tuners.lora.layer import LoraLayer
from deltatune.tuners.targeting import find_targets, name_matches, pattern_value


class LoraParameter(LoraLayer):
    """Per-expert LoRA on one parameter of ``base_layer``'s innermost module (the owner).

    ``base_layer`` is the owner itself, or another ``LoraParameter`` when several parameters of one
    module are adapted; calling the layer runs ``base_layer`` with the owner's parameter replaced
    by W0 + Σ s · B_e A_e over the active, unmerged adapters (``torch.func.functional_call``).
    """

    def __init__(self, base_layer: nn.Module, parameter_name: str) -> None:
        super().__init__(base_layer)
        self.parameter_name = parameter_name
        shape = self.base_weight.shape
        self.transposed = len(shape) == 3 and bool(getattr(self.owner, "is_transposed", False))
        self.num_experts = shape[0] if len(shape) == 3 else 1
        rows, cols = shape[-2:]
        self.in_features, self.out_features = (rows, cols) if self.transposed else (cols, rows)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    @property
    def owner(self) -> nn.Module:
        """The module that registers the parameter (below any other parameter wrappers)."""
        return _unwrapped(self.base_layer)

    @property
    def base_weight(self) -> nn.Parameter:
        """The adapted base parameter W0 (what merging writes into)."""
        return getattr(self.owner, self.parameter_name)

    def _named_containers(self):
        return [("lora_A", self.lora_A), ("lora_B", self.lora_B)]

    def _create(self, name, rank, device, dtype):
        experts = self.num_experts
        self.lora_A[name] = nn.Linear(self.in_features, rank * experts, bias=False, device=device, dtype=dtype)
        self.lora_B[name] = nn.Linear(rank * experts, self.out_features, bias=False, device=device, dtype=dtype)

    # -- the update ---------------------------------------------------------------------
    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(left [E, d0, r], right [E, r, d1]) with s · left @ right the update, laid out like W0 [E, d0, d1]."""
        experts, rank = self.num_experts, self.r[name]
        a = self.lora_A[name].weight.view(experts, rank, self.in_features)
        b = self.lora_B[name].weight.view(self.out_features, rank, experts).permute(2, 0, 1)
        return (a.transpose(1, 2), b.transpose(1, 2)) if self.transposed else (b, a)

    def delta_weight(self, name: str) -> torch.Tensor:
        left, right = self.factors(name)
        param = self.base_weight
        return (torch.bmm(left, right) * self.scaling[name]).reshape(param.shape).to(self.merge_dtype)

    def adapted(self, names: list[str]) -> torch.Tensor:
        """W0 + Σ s · left @ right over ``names``, in W0's dtype (autocast off: the owner expects W0's dtype)."""
        param = self.base_weight
        weight = param.view(self.num_experts, *param.shape[-2:])
        with torch.autocast(param.device.type, enabled=False):
            for name in names:
                left, right = self.factors(name)
                weight = torch.baddbmm(weight, left.to(param.dtype), right.to(param.dtype), alpha=self.scaling[name])
        return weight.view(param.shape)

    def forward(self, *args, **kwargs):
        names = self.unmerged_active()
        if not names:
            return self.base_layer(*args, **kwargs)
        path = ".".join([*["base_layer"] * len(_stack(self.base_layer)), self.parameter_name])
        return torch.func.functional_call(self.base_layer, {path: self.adapted(names)}, args, kwargs)

    def extra_repr(self) -> str:
        return f"parameter_name={self.parameter_name!r}, experts={self.num_experts}, " + super().extra_repr()


# -- targeting and injection ---------------------------------------------------------------
class ParameterTarget(NamedTuple):
    """One parameter a config adapts: where its module sits now, its name, the matched key, r and alpha."""

    slot: str
    parameter_name: str
    key: str
    rank: int
    alpha: float


def module_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """``find_targets``, except that with ``target_parameters`` no module target is needed (peft's rule).

    ``target_modules=None`` then means no module, and is recorded as ``[]`` (peft reads ``[]`` and null alike).
    """
    if config.target_parameters and not config.target_modules:
        config.target_modules = []
        return []
    targets = find_targets(model, config)
    for name in targets:
        if isinstance(model.get_submodule(name), LoraParameter):
            raise ConfigError(
                f"target_modules selects {name!r}, whose parameter is adapted by another adapter's target_parameters; "
                f"adapt the module or its parameter, not both"
            )
    return targets


def parameter_targets(model: nn.Module, config: LoraConfig, modules: list[str]) -> list[ParameterTarget]:
    """The parameters ``config.target_parameters`` selects, checked before the model is touched.

    ``modules`` are the module targets of the same config. Raises ``ConfigError`` naming the entry
    that matches nothing, a matched parameter LoRA cannot adapt, or an option peft refuses here.
    """
    entries = config.target_parameters or []
    if not entries:
        return []
    _check_options(config)
    for name, _ in model.named_parameters(recurse=False):
        if name_matches(name, entries):
            raise ConfigError(
                f"target_parameters selects {name!r}, a parameter of the top-level {type(model).__name__}, which "
                f"cannot be wrapped (as in peft); target a parameter of a submodule"
            )
    found, matched = [], set()
    for user_name, slot, slot_module, owner in _owners(model):
        for param_name, param in owner.named_parameters(recurse=False):
            key = f"{user_name}.{param_name}"
            hits = [entry for entry in entries if name_matches(key, [entry])]
            if not hits:
                continue
            matched.update(hits)
            _check_parameter(key, param, user_name, slot_module, modules)
            rank = pattern_value(key, config.rank_pattern, config.r)
            alpha = pattern_value(key, config.alpha_pattern, config.lora_alpha)
            found.append(ParameterTarget(slot, param_name, key, rank, alpha))
    missing = [entry for entry in entries if entry not in matched]
    if missing:
        raise ConfigError(
            f"target_parameters entry {missing[0]!r} matches no parameter of this {type(model).__name__}; "
            f"2-D/3-D parameters are named e.g.: {', '.join(_candidates(model)) or 'none'}"
        )
    _check_same_parameters(model, found)
    return found


def inject_parameters(model: nn.Module, targets: list[ParameterTarget], adapter_name: str, config: LoraConfig) -> None:
    """Add adapter ``adapter_name`` on every target, reusing a parameter's wrapper from an earlier adapter."""
    for target in targets:
        slot_module = model.get_submodule(target.slot)
        layer = _wrapper_of(slot_module, target.parameter_name)
        if layer is None:
            layer = replace_module(model, target.slot, LoraParameter(slot_module, target.parameter_name))
        layer.add(adapter_name, target.rank, target.alpha, config)


def _owners(model: nn.Module, name: str = "", path: str = "") -> Iterator[tuple[str, str, nn.Module, nn.Module]]:
    """(name as in the user's model, where its outermost wrapper sits, that slot's module, the module itself).

    Parameter wrappers are looked through; another delta layer (a LoRA module, a modules_to_save
    copy) is shown as its base module and not entered.
    """
    for child_name, child in model.named_children():
        user_name = f"{name}.{child_name}" if name else child_name
        slot = f"{path}.{child_name}" if path else child_name
        owner, inner = _unwrapped(child), slot + ".base_layer" * len(_stack(child))
        if getattr(owner, "is_delta_layer", False):
            yield user_name, slot, child, owner.base_layer
            continue
        yield user_name, slot, child, owner
        yield from _owners(owner, user_name, inner)


def _check_options(config: LoraConfig) -> None:
    refused = {
        "lora_dropout": config.lora_dropout > 0,
        "use_dora": config.use_dora,
        "lora_bias": config.lora_bias,
        "fan_in_fan_out": config.fan_in_fan_out,
    }
    for option, on in refused.items():
        if on:
            raise ConfigError(
                f"{option}={getattr(config, option)!r} does not work with target_parameters (as in peft); "
                f"leave it at its default or adapt the parameters' modules with target_modules instead"
            )
    if config.init_lora_weights not in (True, False, "gaussian"):
        raise ConfigError(
            f"init_lora_weights={config.init_lora_weights!r} does not work with target_parameters; use True, "
            f"False or 'gaussian'"
        )


def _check_parameter(
    key: str, param: nn.Parameter, module_name: str, slot_module: nn.Module, modules: list[str]
) -> None:
    wrapped = getattr(slot_module, "is_delta_layer", False) and not isinstance(slot_module, LoraParameter)
    if module_name in modules or wrapped:
        raise ConfigError(
            f"target_parameters selects {key!r}, but module {module_name!r} is itself adapted (target_modules or "
            f"modules_to_save); adapt the module or its parameter, not both"
        )
    if param.ndim not in (2, 3):
        raise ConfigError(
            f"target_parameters selects {key!r} of shape {tuple(param.shape)}; LoRA adapts 2-D [out, in] and 3-D "
            f"[experts, out, in] parameters only"
        )


def _check_same_parameters(model: nn.Module, found: list[ParameterTarget]) -> None:
    """Every adapter that targets parameters must target the same ones: the wrapper nesting is shared (peft's rule)."""
    existing = sorted(
        f"{name.replace('.base_layer', '')}.{layer.parameter_name}"
        for name, layer in model.named_modules()
        if isinstance(layer, LoraParameter) and layer.adapter_names
    )
    wanted = sorted(target.key for target in found)
    if existing and existing != wanted:
        raise ConfigError(
            f"this model's adapters already target the parameters {existing}, and every adapter with "
            f"target_parameters must target the same ones (as in peft); this one selects {wanted}"
        )


def _stack(module: nn.Module) -> list[LoraParameter]:
    """The parameter wrappers from ``module`` down to the module they wrap, outermost first."""
    stack = []
    while isinstance(module, LoraParameter):
        stack.append(module)
        module = module.base_layer
    return stack


def _unwrapped(module: nn.Module) -> nn.Module:
    """``module`` without its parameter wrappers."""
    stack = _stack(module)
    return stack[-1].base_layer if stack else module


def _wrapper_of(module: nn.Module, parameter_name: str) -> LoraParameter | None:
    """The wrapper of ``parameter_name`` in the stack at a module's slot, if an earlier adapter made one."""
    return next((layer for layer in _stack(module) if layer.parameter_name == parameter_name), None)


def _candidates(model: nn.Module) -> list[str]:
    """Distinct ``<module>.<parameter>`` endings of the 2-D/3-D parameters, for error messages (at most 12)."""
    names = {
        f"{user_name.rpartition('.')[2]}.{param_name}"
        for user_name, _, _, owner in _owners(model)
        for param_name, param in owner.named_parameters(recurse=False)
        if param.ndim in (2, 3)
    }
    return sorted(names)[:12]
