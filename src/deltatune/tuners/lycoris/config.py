"""The LyCORIS family's configurations: peft's ``LoHaConfig`` and ``LoKrConfig`` fields, defaults and meanings.

Both share ``LycorisConfig``'s fields (rank, alpha, the two training-time dropouts, targeting); LoKr adds how
the weight is split into a Kronecker product. Every field peft 0.21.2 has is built here, so nothing is refused
by name; what a layer type cannot carry (an embedding, GPT-2's ``Conv1D``, a 3-d convolution: peft has no LoHa
or LoKr for them) is refused when the adapter is injected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from deltatune.config import (
    DeltaConfig,
    check_bool,
    check_layer_choice,
    check_positive_int,
    check_probability,
    check_rank_alpha_patterns,
    module_names,
    modules_to_save_names,
)
from deltatune.errors import ConfigError


@dataclass
class LycorisConfig(DeltaConfig):
    """What LoHa and LoKr share (peft's ``LycorisConfig`` plus the fields both of its subclasses declare).

    Args:
        r: the rank of each low-rank factor.
        alpha: the update is multiplied by ``alpha / r``.
        rank_dropout: while training, each output row of the update is dropped with this probability
            (LoHa then rescales the kept rows by 1 / their share; LoKr only with ``rank_dropout_scale``).
        module_dropout: while training, the whole update of a layer is skipped with this probability
            (1.0: never applied while training).
        use_effective_conv2d: a convolution with a kernel larger than 1 keeps the kernel in a small core
            tensor (peft's Tucker form, ``hada_t1``/``hada_t2``, ``lokr_t2``) instead of in the factors.
        target_modules / exclude_modules: module names (exact or "."-suffix), a regex fullmatched against the
            full name, or ``"all-linear"``; None picks the per-architecture default (as LoRA's).
        init_weights: True (the update starts at zero), False (random: the model changes at once; for tests).
        layers_to_transform / layers_pattern: adapt only these layer indices (of the layer list named so).
        rank_pattern / alpha_pattern: per-module r / alpha, keys are regexes matched as name suffixes.
        modules_to_save: extra modules trained in full and saved with the adapter (e.g. a new head).
    """

    # init_weights strings a family accepts besides True and False.
    init_names: ClassVar[tuple[str, ...]] = ()

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    init_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("r", self.r)
        _check_finite("alpha", self.alpha)
        check_probability("rank_dropout", self.rank_dropout)
        dropout = self.module_dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout <= 1.0:
            raise ConfigError(f"module_dropout={self.module_dropout!r} must be a number in [0, 1]")
        check_bool("use_effective_conv2d", self.use_effective_conv2d)
        self.init_weights = self._init(self.init_weights)
        self.target_modules = module_names("target_modules", self.target_modules)
        self.exclude_modules = module_names("exclude_modules", self.exclude_modules)
        self.modules_to_save = modules_to_save_names(self.modules_to_save)
        # unlike LoRA, OFT and VeRA, LoHa/LoKr have never refused layers_to_transform with a regex target_modules
        check_layer_choice(self, refuse_regex_targets=False)
        check_rank_alpha_patterns(self, check_alpha=_check_finite)  # any finite alpha, as LyCORIS allows

    def _init(self, value: Any) -> bool | str:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in self.init_names:
            return value.lower()
        spelled = ", ".join(["True", "False", *(repr(name) for name in self.init_names)])
        raise ConfigError(f"init_weights={value!r} is unknown for {type(self).__name__}; use {spelled}")


def _check_finite(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name}={value!r} must be a finite number")


@dataclass
class LoHaConfig(LycorisConfig):
    """LoHa (Hyeon-Woo et al., 2022, FedPara, arXiv:2108.06098): ``ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) · alpha / r``.

    The Hadamard product of two rank-r products can reach rank r², for 2·r·(in + out) parameters. ``w2_b``
    starts at zero, so training starts at the base model. Fields: ``LycorisConfig``'s.
    """

    peft_type: ClassVar[str] = "LOHA"
    train_defaults: ClassVar[dict[str, Any]] = {"target_modules": "all-linear"}
    run_defaults: ClassVar[dict[str, Any]] = {"learning_rate": 1e-2}


@dataclass
class LoKrConfig(LycorisConfig):
    """LoKr (Yeh et al., 2023, arXiv:2309.14859): ``ΔW = kron(w1, w2) · alpha / r``.

    W [out, in] is split as out = a·b, in = c·d; w1 [a, c] and w2 [b, d] (a convolution's kernel rides on
    w2) are each kept in full or as a rank-r product (``lokr_w1_a @ lokr_w1_b``), per layer, as peft decides.

    Args (besides ``LycorisConfig``'s):
        decompose_both: also keep w1 as a rank-r product when r < max(a, c) / 2 (w2 is whenever r < max(b, d) / 2).
        decompose_factor: split each dimension n as (f, n / f) when f divides it; -1: the divisor pair nearest
            to √n (``kron_factors``).
        rank_dropout_scale: rescale the rows ``rank_dropout`` keeps by 1 / their share.
        init_weights: True (w1 = 0), False (random), or "lycoris" (w2 = 0, as the LyCORIS repository does).
    """

    peft_type: ClassVar[str] = "LOKR"
    init_names: ClassVar[tuple[str, ...]] = ("lycoris",)
    train_defaults: ClassVar[dict[str, Any]] = {"target_modules": "all-linear"}
    run_defaults: ClassVar[dict[str, Any]] = {"learning_rate": 1e-2}

    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bool("decompose_both", self.decompose_both)
        check_bool("rank_dropout_scale", self.rank_dropout_scale)
        factor = self.decompose_factor
        if isinstance(factor, bool) or not isinstance(factor, int) or not (factor == -1 or factor > 0):
            raise ConfigError(f"decompose_factor={factor!r} must be -1 (split near the square root) or a positive int")
