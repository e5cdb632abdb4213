"""AdaLoRA's configuration: peft's ``AdaLoraConfig`` (a ``LoraConfig`` with a rank budget), validated when built."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

from deltatune.config import check_positive_int, check_positive_number, jsonable
from deltatune.errors import ConfigError
from deltatune.tuners.lora.config import LoraConfig

# Suffix of a rank_pattern key: the module's name + ".lora_E" (peft names the singular values' parameter).
RANK_PATTERN_SUFFIX = ".lora_E"


@dataclass
class AdaLoraConfig(LoraConfig):
    """AdaLoRA (Zhang et al., 2023, arXiv:2303.10512): ``W = W0 + alpha / ranknum · P diag(E) Q``, ranks pruned.

    P = ``lora_B`` [out, r], E = ``lora_E`` [r, 1] (singular values, zero at start), Q = ``lora_A`` [r, in],
    r = ``init_r``, ranknum = ``init_r`` (kept when ranks are pruned, so the scale does not jump). While training,
    every step scores each triplet (P[:, i], E[i], Q[i]) by the smoothed sensitivity |w · dL/dw| times its
    uncertainty, and E[i] of the lowest-scoring triplets is set to zero, so that the total rank falls from
    ``init_r`` per layer to ``target_r`` per layer on a cubic schedule. The loss gets
    ``orth_reg_weight · mean over P, Q of ||PᵀP − I||_F, ||QQᵀ − I||_F``. The masks are saved as
    ``rank_pattern``; the file keeps only the triplets left, and loading it builds layers of those ranks.

    Args (besides LoRA's, see ``LoraConfig``):
        target_r: the average rank per layer at the end of the budget schedule.
        init_r: the rank every layer starts with (``r`` is unused, as in peft).
        tinit: steps of warm-up before any rank is pruned.
        tfinal: steps at the end where the final ranks are kept fixed (and only fine-tuned).
        deltaT: prune every ``deltaT`` steps during the schedule.
        beta1: EMA factor of the sensitivity.
        beta2: EMA factor of the sensitivity's uncertainty.
        orth_reg_weight: weight of the orthogonality regulariser added to the training loss (0: none).
        total_step: the number of optimizer steps of the run; the schedule needs it. ``deltatune train``
            sets it from the run's own step count when it is left unset.
        rank_pattern: written by training: module name + ".lora_E" -> which of its ``init_r`` triplets are kept.

    Refused by name (``ADALORA_REFUSALS``): LoRA options peft's AdaLoRA ignores or refuses (DoRA, LoftQ, rsLoRA,
    ``lora_bias``, ``alpha_pattern``, ...), and initialisations other than True / False.
    """

    peft_type: ClassVar[str] = "ADALORA"
    train_defaults: ClassVar[dict[str, Any]] = {
        "init_r": 12,
        "target_r": 8,
        "lora_alpha": 32,
        "target_modules": "all-linear",
    }
    run_defaults: ClassVar[dict[str, Any]] = {"learning_rate": 1e-2}

    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1  # noqa: N815 (peft's name)
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict[str, list[bool]] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, reason in ADALORA_REFUSALS.items():
            value = jsonable(getattr(self, name))
            if value not in (None, False, {}, [], ""):
                raise ConfigError(f"{name}={value!r} is not supported by deltatune's AdaLoRA: {reason}")
        if not isinstance(self.init_lora_weights, bool):
            raise ConfigError(
                f"init_lora_weights={self.init_lora_weights!r} is not supported by deltatune's AdaLoRA: it has one "
                f"initialisation (E = 0, A and B ~ N(0, 0.02²); peft applies it to any true value); use True or False"
            )
        if self.r != 8:
            warnings.warn("AdaLoRA does not use r (as in peft); its starting rank is init_r", stacklevel=3)
        for name in ("target_r", "init_r", "deltaT"):
            check_positive_int(name, getattr(self, name))
        for name in ("tinit", "tfinal"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name}={value!r} must be a non-negative integer")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                raise ConfigError(f"{name}={value!r} must be a number in (0, 1)")
        if self.orth_reg_weight != 0:
            check_positive_number("orth_reg_weight", self.orth_reg_weight)
        if self.total_step is not None:
            self.check_schedule(self.total_step)

    def check_schedule(self, total_step: Any) -> None:
        """``total_step`` leaves a budgeting phase between ``tinit`` and ``total_step - tfinal`` (peft's rule)."""
        check_positive_int("total_step", total_step)
        if self.tinit >= total_step - self.tfinal:
            raise ConfigError(
                f"tinit={self.tinit} and tfinal={self.tfinal} leave no budgeting phase in total_step={total_step} "
                f"steps; lower tinit/tfinal or train for more steps"
            )

    def check_patterns(self) -> None:
        """AdaLoRA's ``rank_pattern``: module name + ".lora_E" -> kept triplets (a list of booleans)."""
        if self.rank_pattern is None:
            return
        if not isinstance(self.rank_pattern, dict):
            raise ConfigError(f"rank_pattern={self.rank_pattern!r} must map module name + '.lora_E' to booleans")
        for key, mask in self.rank_pattern.items():
            if not isinstance(key, str) or not key.endswith(RANK_PATTERN_SUFFIX):
                raise ConfigError(f"rank_pattern key {key!r} must be a module name followed by '{RANK_PATTERN_SUFFIX}'")
            if not isinstance(mask, list) or not all(isinstance(kept, bool) for kept in mask):
                raise ConfigError(f"rank_pattern[{key!r}] must be a list of true/false (one per triplet)")

    def layer_rank(self, module_name: str) -> int:
        """The rank of ``module_name``'s layer: the triplets ``rank_pattern`` keeps, else ``init_r``."""
        mask = (self.rank_pattern or {}).get(module_name + RANK_PATTERN_SUFFIX)
        return self.init_r if mask is None else sum(mask)


# LoRA fields peft's AdaLoRA refuses or ignores (it would train something else than it says), each with the reason.
ADALORA_REFUSALS: dict[str, str] = {
    "use_dora": "AdaLoRA has no DoRA variant (peft refuses it too)",
    "use_rslora": "AdaLoRA scales by lora_alpha / init_r; peft ignores use_rslora for AdaLoRA",
    "lora_bias": "AdaLoRA's factors have no bias; peft ignores lora_bias for AdaLoRA",
    "alpha_pattern": "AdaLoRA uses one lora_alpha for every layer; peft ignores alpha_pattern for AdaLoRA",
    "trainable_token_indices": "trainable token rows are not built for AdaLoRA adapters; use LoRA for them",
    "target_parameters": "peft's AdaLoRA adapts modules only (nn.Linear, Conv1D, nn.Conv2d), not raw parameters",
    "ensure_weight_tying": "it only concerns trainable token rows, which AdaLoRA adapters do not have",
}
