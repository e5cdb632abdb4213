"""deltatune: parameter-efficient fine-tuning (LoRA and friends) for transformers models.

Adapters are saved in peft's file format, so they load in peft and vLLM, and peft's load here.
"""

from deltatune.config import DeltaConfig
from deltatune.errors import (
    AdapterLoadError,
    ConfigError,
    DataError,
    DeltaTuneError,
    MergeError,
    SaveError,
    TargetError,
)
from deltatune.tuners.adalora.config import AdaLoraConfig
from deltatune.tuners.bottleneck.config import BottleneckConfig
from deltatune.tuners.ia3.config import IA3Config
from deltatune.tuners.lora.config import LoraConfig
from deltatune.tuners.lycoris.config import LoHaConfig, LoKrConfig
from deltatune.tuners.oft.config import OFTConfig
from deltatune.tuners.prompt.config import (
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
)
from deltatune.tuners.vera.config import VeraConfig

_LAZY = {"DeltaModel": "model", "get_delta_model": "model"}  # these import torch: loaded on first use

__version__ = "0.1.0"

__all__ = [
    "AdaLoraConfig",
    "AdapterLoadError",
    "BottleneckConfig",
    "ConfigError",
    "DataError",
    "DeltaConfig",
    "DeltaModel",
    "DeltaTuneError",
    "IA3Config",
    "LoHaConfig",
    "LoKrConfig",
    "LoraConfig",
    "MergeError",
    "OFTConfig",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptTuningConfig",
    "SaveError",
    "TargetError",
    "VeraConfig",
    "get_delta_model",
]


def __getattr__(name: str):
    """``deltatune.DeltaModel`` and ``get_delta_model`` import torch only when first used, so that
    ``import deltatune`` (and with it every command's ``--help`` and config check) stays fast."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
