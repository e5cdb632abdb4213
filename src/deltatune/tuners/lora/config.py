"""LoRA's configuration: peft's ``LoraConfig`` fields, defaults and meanings, validated at construction."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from deltatune.config import (
    DeltaConfig,
    check_bool,
    check_layer_choice,
    check_positive_int,
    check_positive_number,
    check_probability,
    check_rank_alpha_patterns,
    jsonable,
    module_names,
    modules_to_save_names,
)
from deltatune.errors import ConfigError

# peft's neutral values of the fields above; any other value turns the feature on.
_NEUTRAL = (None, False, {}, [], "", {"ephemeral_gpu_offload": False})


@dataclass
class LoraConfig(DeltaConfig):
    """LoRA (Hu et al., 2021): ``W = W0 + (alpha / r) * B @ A``, A: [r, in], B: [out, r], B = 0 at start.

    Args:
        r: rank of the update; the paper finds r in 1..8 often enough for attention weights.
        lora_alpha: scale numerator; the update is multiplied by ``lora_alpha / r``
            (``lora_alpha / sqrt(r)`` with ``use_rslora``), so changing r keeps the step size.
        lora_dropout: dropout probability on the adapter's input path only.
        target_modules: module names (exact full name or "."-suffix), a regex string fullmatched
            against the full module name, or ``"all-linear"``; None picks per-architecture defaults.
        exclude_modules: same matching rules as ``target_modules``, removed from the targets.
        bias: "none", "all" (train every bias of the model) or "lora_only" (biases of adapted layers).
        fan_in_fan_out: the base weight is stored [in, out] (GPT-2 ``Conv1D``); set automatically.
        modules_to_save: extra modules trained in full and saved with the adapter (e.g. a new head).
        init_lora_weights: True (Kaiming-uniform A, zero B), "gaussian" (normal A, std 1/r), False
            (random A and B: the model changes at once; for tests), or, on Linear/Conv1D layers only:
            "pissa" / "pissa_niter_<n>" (top-r singular vectors of W0, full or randomised SVD) and
            "olora" (QR of W0), both of which also replace W0 by the residual W0 - s·BA (the output at
            step 0 is the base model's; save/ship that residual base with the adapter, or convert the
            trained adapter to a plain rank-2r LoRA for the original base with
            ``save_pretrained(..., convert_to_lora_from=<initial adapter dir>)``), or "orthogonal"
            (nonzero A and B with BA = 0; even r). Numerics match peft 0.21 (``tuners/lora_init.py``).
            As in peft, a saved file keeps the method's name, and loading it re-runs the method on
            the base given: set ``init_lora_weights=True`` before saving an adapter meant to be
            loaded onto its residual base. "loftq", "eva", "corda", "lora_ga" and "mica" are refused
            (``LORA_INIT_REFUSALS`` says why), and so are their ``*_config`` fields.
        use_rslora: rank-stabilised scaling ``alpha / sqrt(r)``.
        layers_to_transform: adapt only these layer indices.
        layers_pattern: name of the layer list (e.g. "layers", "h") used to find the layer index.
        rank_pattern / alpha_pattern: per-module overrides, keys are regexes matched as suffixes.
        use_dora: DoRA (Liu et al., 2024, arXiv:2402.09353): ``W = m ⊙ (W0 + s·BA) / ||W0 + s·BA||``
            with a trainable magnitude m per output row (the norm is a constant for the gradient).
        lora_bias: B gets a trainable bias (merged into the base layer's bias).
        trainable_token_indices: train only these rows of the input embedding (a list of token ids, or
            {embedding module name: ids}); the rows are saved with the adapter.
        target_parameters: LoRA on raw ``nn.Parameter``s by name (e.g. the fused expert weights of a
            mixture-of-experts layer), where there is no ``nn.Linear`` to wrap.
        ensure_weight_tying: keep tied input/output embeddings tied for ``modules_to_save`` and
            ``trainable_token_indices``.

    Every other peft field is accepted by name; one that turns on a feature deltatune does not have
    raises a ``ConfigError`` naming it (``LORA_REFUSALS``).
    """

    peft_type: ClassVar[str] = "LORA"
    train_defaults: ClassVar[dict[str, Any]] = {
        "r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.05,
        "target_modules": "all-linear",
    }

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    bias: str = "none"
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    use_rslora: bool = False
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    # Fields below are written to adapter_config.json only when set, so files stay loadable by older peft.
    use_dora: bool = False
    lora_bias: bool = False
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    target_parameters: list[str] | None = None
    ensure_weight_tying: bool = False
    loftq_config: dict[str, Any] = field(default_factory=dict)
    eva_config: dict[str, Any] | None = None
    corda_config: dict[str, Any] | None = None
    lora_ga_config: dict[str, Any] | None = None
    megatron_config: dict[str, Any] | None = None
    megatron_core: str | None = "megatron.core"
    velora_config: dict[str, Any] | None = None
    monteclora_config: dict[str, Any] | None = None
    kasa_config: dict[str, Any] | None = None
    use_bdlora: dict[str, Any] | None = None
    arrow_config: dict[str, Any] | None = None
    alora_invocation_tokens: list[int] | None = None
    use_qalora: bool = False
    qalora_group_size: int = 16
    layer_replication: list[list[int]] | None = None
    runtime_config: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("r", self.r)
        check_positive_number("lora_alpha", self.lora_alpha)
        for name in ("fan_in_fan_out", "use_rslora", "use_dora", "lora_bias", "ensure_weight_tying"):
            check_bool(name, getattr(self, name))
        check_probability("lora_dropout", self.lora_dropout)
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"bias={self.bias!r} is unknown; use 'none', 'all' or 'lora_only'")
        for name, reason in LORA_REFUSALS.items():
            value = jsonable(getattr(self, name))
            if value not in _NEUTRAL:
                raise ConfigError(f"{name}={value!r} is not supported by deltatune: {reason}")
        self.init_lora_weights = _lora_init(self.init_lora_weights)
        for method in ("loftq", "eva", "corda", "lora_ga"):  # each refused method's own options field
            name = f"{method}_config"
            value = jsonable(getattr(self, name))
            if value not in _NEUTRAL:
                raise ConfigError(
                    f"{name}={value!r} is not supported by deltatune (it configures init_lora_weights={method!r}): "
                    f"{LORA_INIT_REFUSALS[method]}"
                )
        if self.lora_bias and self.init_lora_weights not in (True, False):
            raise ConfigError(
                f"lora_bias=True needs init_lora_weights=True or False (got {self.init_lora_weights!r}), as in peft"
            )
        if self.lora_bias and self.use_dora:
            raise ConfigError("lora_bias=True does not combine with use_dora=True (as in peft); set one of them")
        self.target_modules = module_names("target_modules", self.target_modules)
        self.exclude_modules = module_names("exclude_modules", self.exclude_modules)
        self.modules_to_save = modules_to_save_names(self.modules_to_save)
        self.trainable_token_indices = _token_indices(self.trainable_token_indices)
        self.target_parameters = _parameter_names(self.target_parameters)
        check_layer_choice(self)
        self.check_patterns()

    def check_patterns(self) -> None:
        """``rank_pattern`` / ``alpha_pattern``: module regex -> rank / alpha (AdaLoRA's rank_pattern differs)."""
        check_rank_alpha_patterns(self)

    def to_dict(self) -> dict[str, Any]:
        """peft's keys; the ones after ``alpha_pattern`` only when they differ from their default."""
        data = super().to_dict()
        optional = [f for f in dataclasses.fields(self) if f.name in _OPTIONAL_LORA_KEYS]
        for f in optional:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if data[f.name] == jsonable(default):
                del data[f.name]
        return data

    def scaling(self, rank: int, alpha: float) -> float:
        """The factor in front of B @ A: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


_OPTIONAL_LORA_KEYS = frozenset(
    {
        "use_dora",
        "lora_bias",
        "trainable_token_indices",
        "target_parameters",
        "ensure_weight_tying",
        "loftq_config",
        "eva_config",
        "corda_config",
        "lora_ga_config",
        "megatron_config",
        "megatron_core",
        "velora_config",
        "monteclora_config",
        "kasa_config",
        "use_bdlora",
        "arrow_config",
        "alora_invocation_tokens",
        "use_qalora",
        "qalora_group_size",
        "layer_replication",
        "runtime_config",
    }
)


# init_lora_weights strings deltatune implements (``pissa_niter_<n>`` is spelled out by ``_lora_init``).
LORA_INITS = ("gaussian", "pissa", "olora", "orthogonal")


def _lora_init(value: Any) -> bool | str:
    """``init_lora_weights`` normalised: True, False, or one of ``LORA_INITS`` / ``pissa_niter_<n>`` (lower case)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        spelled = value.lower()
        if spelled in LORA_INITS or re.fullmatch(r"pissa_niter_[1-9][0-9]*", spelled):
            return spelled
        if spelled in LORA_INIT_REFUSALS:
            raise ConfigError(
                f"init_lora_weights={value!r} is not supported by deltatune: {LORA_INIT_REFUSALS[spelled]}"
            )
    raise ConfigError(
        f"init_lora_weights={value!r} is not supported; use True, False, "
        f"{', '.join(repr(i) for i in LORA_INITS)} or 'pissa_niter_<n>'"
    )


def _token_indices(value: Any) -> list[int] | dict[str, list[int]] | None:
    """``trainable_token_indices``: None, a list of token ids, or {embedding module name: token ids}.

    The order is kept: the saved rows [n, dim] follow it, as in peft's files.
    """

    def ids(item: Any) -> bool:
        return (
            isinstance(item, (list, tuple))
            and bool(item)
            and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in item)
        )

    def unique(item: Any) -> list[int]:
        if len(set(item)) != len(item):
            raise ConfigError(f"trainable_token_indices={value!r} repeats a token id; list each token once")
        return list(item)

    if value is None:
        return None
    if ids(value):
        return unique(value)
    if isinstance(value, dict) and value and all(isinstance(k, str) and k and ids(v) for k, v in value.items()):
        return {key: unique(v) for key, v in value.items()}
    raise ConfigError(
        f"trainable_token_indices={value!r} must be a non-empty list of token ids, or a mapping of "
        f"embedding module name -> token ids"
    )


def _parameter_names(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple, set)) and value and all(isinstance(item, str) and item for item in value):
        return sorted(set(value))
    raise ConfigError(
        f"target_parameters={value!r} must be a non-empty list of parameter names (e.g. 'experts.gate_up_proj')"
    )


# peft LoraConfig fields deltatune refuses when they are set, each with the reason (docs/lora-options.md's table
# is generated from this and ``LORA_INIT_REFUSALS``). A field at its neutral value (None, False, {}) is fine.
LORA_REFUSALS: dict[str, str] = {
    "megatron_config": "Megatron-LM tensor-parallel layers are not supported; train with peft on Megatron, or "
    "convert the model to transformers first",
    "velora_config": "VeLoRA (compressed activations) is not supported; deltatune's fused path already keeps "
    "only x and the rank-r products for backward",
    "monteclora_config": "MonteCLoRA (Monte Carlo sampled adapters) is not supported",
    "kasa_config": "KaSA (singular-value adaptation of the base weight) is not supported",
    "use_bdlora": "BD-LoRA (block-diagonal factors for sharded serving) is not supported",
    "arrow_config": "Arrow routing between several LoRA experts is not supported",
    "alora_invocation_tokens": "activated LoRA (aLoRA: the adapter switched on after invocation tokens) is not "
    "supported",
    "use_qalora": "QA-LoRA (group-pooled inputs for GPTQ bases) is not supported",
    "layer_replication": "layer replication (stacking shared copies of decoder layers) is not supported",
    "runtime_config": "ephemeral_gpu_offload is not supported; keep the model on one device",
}


# init_lora_weights values deltatune refuses, each with the reason.
LORA_INIT_REFUSALS: dict[str, str] = {
    "mica": "MiCA changes the forward pass (minor singular components, frozen B) and is not supported",
    "loftq": "LoftQ needs a quantised base model and its NF4 quantiser (bitsandbytes), which deltatune does not "
    "have; run peft's LoftQ and load the result, or use init_lora_weights='pissa' on the unquantised model",
    "eva": "EVA needs a data-driven initialisation pass over a dataloader, which deltatune does not have; use "
    "init_lora_weights=True",
    "corda": "CorDA needs a data pass collecting each layer's input covariance, which deltatune does not have; use "
    "init_lora_weights='pissa'",
    "lora_ga": "LoRA-GA needs a pass estimating full-weight gradients over a dataloader, which deltatune does not "
    "have; use init_lora_weights=True",
}
