"""deltatune: parameter-efficient fine-tuning (LoRA and friends) for transformers models.

Adapters are saved in peft's file format, so they load in peft and vLLM, and peft's load here.
"""

from .config import DeltaConfig, LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig
from .errors import AdapterLoadError, ConfigError, DeltaTuneError, MergeError, TargetError
from .model import DeltaModel, get_delta_model

__version__ = "0.1.0"

__all__ = [
    "AdapterLoadError",
    "ConfigError",
    "DeltaConfig",
    "DeltaModel",
    "DeltaTuneError",
    "LoraConfig",
    "MergeError",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptTuningConfig",
    "TargetError",
    "get_delta_model",
]
