"""deltatune: parameter-efficient fine-tuning (LoRA and friends) for transformers models.

Adapters are saved in peft's file format, so they load in peft and vLLM, and peft's load here.
"""

from .config import (
    BottleneckConfig,
    DeltaConfig,
    LoraConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
)
from .errors import AdapterLoadError, ConfigError, DataError, DeltaTuneError, MergeError, SaveError, TargetError
from .model import DeltaModel, get_delta_model

__version__ = "0.1.0"

__all__ = [
    "AdapterLoadError",
    "BottleneckConfig",
    "ConfigError",
    "DataError",
    "DeltaConfig",
    "DeltaModel",
    "DeltaTuneError",
    "LoraConfig",
    "MergeError",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptTuningConfig",
    "SaveError",
    "TargetError",
    "get_delta_model",
]
