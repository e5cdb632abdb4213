"""VeRA's configuration: peft's ``VeraConfig`` fields, defaults and meanings, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from deltatune.config import (
    DeltaConfig,
    check_bool,
    check_layer_choice,
    check_positive_int,
    check_probability,
    choice,
    module_names,
    modules_to_save_names,
)
from deltatune.errors import ConfigError

VERA_BIASES = ("none", "all", "vera_only")


@dataclass
class VeraConfig(DeltaConfig):
    """VeRA (Kopiczko et al., 2024, arXiv:2310.11454): ``W = W0 + Λb B Λd A``, A [r, in] and B [out, r] frozen
    random matrices shared by every adapted layer, Λb = diag(vera_lambda_b) [out] and Λd = diag(vera_lambda_d)
    [r] the only trained tensors (out + r numbers per layer).

    A and B are drawn once per model for the largest adapted shape (Kaiming-uniform from
    ``projection_prng_key``, exactly as peft draws them); each layer uses their top-left [r, in] / [out, r].

    Args:
        r: the width of the random projections; larger than LoRA ranks, as each costs one trained number.
        target_modules: module names (exact full name or "."-suffix), a regex string fullmatched against the
            full module name, or ``"all-linear"``; None picks per-architecture defaults (the query and value
            projections). Only ``nn.Linear`` and GPT-2 ``Conv1D`` layers, as in peft.
        projection_prng_key: the seed of A and B.
        save_projection: store A and B in the adapter file (``base_model.vera_A`` / ``base_model.vera_B``);
            False re-draws them from ``projection_prng_key`` when loading (a smaller file).
        vera_dropout: dropout probability on the adapter's input path only.
        d_initial: the start value of every entry of vera_lambda_d (vera_lambda_b starts at zero, so training
            starts at exactly the base model).
        fan_in_fan_out: the base weight is stored [in, out] (GPT-2 ``Conv1D``); set automatically.
        bias: "none", "all" (train every bias of the model) or "vera_only" (biases of adapted layers); trained
            biases are saved with the adapter.
        modules_to_save: extra modules trained in full and saved with the adapter (e.g. a new head).
        init_weights: True: λb = 0, λd = d_initial; False: λb = 1 and λd ~ N(0, 1) (the model changes at once;
            for tests).
        layers_to_transform: adapt only these layer indices.
        layers_pattern: name of the layer list (e.g. "layers", "h") used to find the layer index.
    """

    peft_type: ClassVar[str] = "VERA"
    # ``deltatune train``: every linear layer (peft's default, q_proj and v_proj, trains 38k numbers on SmolLM2-135M),
    # and a learning rate for vectors that start at zero (λb) and move the model only through them.
    train_defaults: ClassVar[dict[str, Any]] = {"target_modules": "all-linear"}
    run_defaults: ClassVar[dict[str, Any]] = {"learning_rate": 1e-2}

    r: int = 256
    target_modules: list[str] | str | None = None
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("r", self.r)
        if isinstance(self.projection_prng_key, bool) or not isinstance(self.projection_prng_key, int):
            raise ConfigError(f"projection_prng_key={self.projection_prng_key!r} must be an integer seed")
        for name in ("save_projection", "fan_in_fan_out", "init_weights"):
            check_bool(name, getattr(self, name))
        check_probability("vera_dropout", self.vera_dropout)
        if isinstance(self.d_initial, bool) or not isinstance(self.d_initial, (int, float)):
            raise ConfigError(f"d_initial={self.d_initial!r} must be a number")
        self.bias = choice("bias", self.bias, VERA_BIASES)
        self.target_modules = module_names("target_modules", self.target_modules)
        self.modules_to_save = modules_to_save_names(self.modules_to_save)
        check_layer_choice(self)
