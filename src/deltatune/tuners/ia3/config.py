"""IA3's configuration: peft's ``IA3Config`` fields, defaults and meanings, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from deltatune.config import DeltaConfig, check_bool, module_names, modules_to_save_names
from deltatune.errors import ConfigError

# config.model_type -> the modules IA3 scales by default, and which of them scale their input (peft 0.21.2's
# TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING / _FEEDFORWARD_MODULES_MAPPING): keys, values, and the
# MLP's output projection, as the paper's (IA)³ rescales them.
IA3_TARGET_MODULES: dict[str, list[str]] = {
    "t5": ["k", "v", "wo"],
    "mt5": ["k", "v", "wi_1"],
    "gpt2": ["c_attn", "mlp.c_proj"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"],
    "roberta": ["key", "value", "output.dense"],
    "opt": ["q_proj", "k_proj", "fc2"],
    "gptj": ["q_proj", "v_proj", "fc_out"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"],
    "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    "bart": ["q_proj", "v_proj", "fc2"],
    "gpt_bigcode": ["c_attn", "mlp.c_proj"],
    "llama": ["k_proj", "v_proj", "down_proj"],
    "llama4": ["q_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"],
    "mixtral": ["k_proj", "v_proj", "w2"],
    "bert": ["key", "value", "output.dense"],
    "deberta-v2": ["key_proj", "value_proj", "output.dense"],
    "deberta": ["in_proj", "output.dense"],
    "RefinedWebModel": ["query_key_value", "dense_4h_to_h"],
    "RefinedWeb": ["query_key_value", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense_4h_to_h"],
    "phi": ["q_proj", "v_proj", "fc2"],
    "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"],
    "gemma3_text": ["q_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],
    "qwen3": ["q_proj", "v_proj", "down_proj"],
}
IA3_FEEDFORWARD_MODULES: dict[str, list[str]] = {
    "t5": ["wo"],
    "mt5": [],
    "gpt2": ["mlp.c_proj"],
    "bloom": ["mlp.dense_4h_to_h"],
    "roberta": ["output.dense"],
    "opt": ["fc2"],
    "gptj": ["fc_out"],
    "gpt_neox": ["dense_4h_to_h"],
    "gpt_neo": ["c_proj"],
    "bart": ["fc2"],
    "gpt_bigcode": ["mlp.c_proj"],
    "llama": ["down_proj"],
    "llama4": ["down_proj"],
    "mistral": ["down_proj"],
    "mixtral": ["w2"],
    "bert": ["output.dense"],
    "deberta-v2": ["output.dense"],
    "deberta": ["output.dense"],
    "RefinedWeb": ["dense_4h_to_h"],
    "RefinedWebModel": ["dense_4h_to_h"],
    "falcon": ["dense_4h_to_h"],
    "phi": ["fc2"],
    "gemma": ["down_proj"],
    "gemma2": ["down_proj"],
    "gemma3_text": ["down_proj"],
    "qwen2": ["down_proj"],
    "qwen3": ["down_proj"],
}


@dataclass
class IA3Config(DeltaConfig):
    """(IA)³ (Liu et al., 2022, arXiv:2205.05638): a learned vector l rescales a layer's activations.

    ``y = W (x ⊙ l)`` for a feed-forward module (l: [in]), ``y = (W x + b) ⊙ l`` for any other (l: [out]);
    l starts at ones, so training starts at exactly the base model. Merging folds l into W (and b).

    Args:
        target_modules: module names (exact full name or "."-suffix), a regex string fullmatched against the
            full module name, or ``"all-linear"``; None picks peft's per-architecture defaults
            (``IA3_TARGET_MODULES``, e.g. Llama's k_proj, v_proj, down_proj).
        exclude_modules: same matching rules as ``target_modules``, removed from the targets.
        feedforward_modules: the targets whose INPUT is scaled (a regex fullmatched against the full name, or
            names matched as an end of it, as peft does); the others scale their output. A list must be a
            subset of a list ``target_modules``. None picks peft's per-architecture defaults
            (``IA3_FEEDFORWARD_MODULES``); ``[]`` scales every output.
        fan_in_fan_out: the base weight is stored [in, out] (GPT-2 ``Conv1D``); set automatically.
        modules_to_save: extra modules trained in full and saved with the adapter (e.g. a new head).
        init_ia3_weights: True starts l at ones (the base model); False at N(0, 1) (the model changes at
            once; for tests).
    """

    peft_type: ClassVar[str] = "IA3"
    # ``deltatune train``: peft's per-architecture targets (target_modules=None), and a learning rate ten times
    # LoRA's: each trained number scales a whole row or column of a weight, starting from one.
    run_defaults: ClassVar[dict[str, Any]] = {"learning_rate": 1e-2}

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bool("fan_in_fan_out", self.fan_in_fan_out)
        check_bool("init_ia3_weights", self.init_ia3_weights)
        self.target_modules = module_names("target_modules", self.target_modules)
        self.exclude_modules = module_names("exclude_modules", self.exclude_modules)
        self.feedforward_modules = module_names("feedforward_modules", self.feedforward_modules)
        self.modules_to_save = modules_to_save_names(self.modules_to_save)
        if isinstance(self.feedforward_modules, list) and isinstance(self.target_modules, list):
            extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if extra:
                raise ConfigError(
                    f"feedforward_modules {extra} are not in target_modules {self.target_modules}; "
                    f"feedforward_modules must be a subset of target_modules (as in peft)"
                )


def resolved(config: IA3Config, model_type: str | None) -> IA3Config:
    """``config`` with target_modules / feedforward_modules that are None filled in from peft's tables for
    ``model_type`` (peft writes the filled-in values into the saved config too)."""
    for field, table in (("target_modules", IA3_TARGET_MODULES), ("feedforward_modules", IA3_FEEDFORWARD_MODULES)):
        if getattr(config, field) is None:
            if model_type not in table:
                raise ConfigError(
                    f"IA3 has no default {field} for model_type={model_type!r}; pass {field} "
                    f"(feedforward_modules=[] scales every target's output)"
                )
            setattr(config, field, sorted(table[model_type]))
    return config
