"""One tuner per method; ``tuner_for(config)`` picks the one a config belongs to.

The registry names each method's config class (torch-free) and where its tuner lives; a tuner
module (which imports torch) is imported on first use, so listing and validating methods stays fast.
"""

from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING

from ..config import (
    BottleneckConfig,
    DeltaConfig,
    LoraConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
)
from ..errors import ConfigError

if TYPE_CHECKING:
    from .base import Tuner

_TUNERS: dict[type[DeltaConfig], str] = {  # config class -> "module.TunerClass", in registration order
    LoraConfig: "lora_tuner.LoraTuner",
    BottleneckConfig: "bottleneck.BottleneckTuner",
    PromptTuningConfig: "prompt.PromptTuningTuner",
    PromptEncoderConfig: "prompt.PTuningTuner",
    PrefixTuningConfig: "prefix.PrefixTuner",
}


def tuner_for(config: DeltaConfig) -> Tuner:
    """The tuner that implements ``config``'s method."""
    for config_class in _TUNERS:
        if config_class.peft_type == config.peft_type:
            return _tuner(config_class)
    raise ConfigError(f"no tuner for peft_type={config.peft_type!r}")


@functools.cache
def _tuner(config_class: type[DeltaConfig]) -> Tuner:
    module, name = _TUNERS[config_class].rsplit(".", 1)
    return getattr(importlib.import_module(f".{module}", __name__), name)()


def config_classes() -> list[type[DeltaConfig]]:
    """The config class of every registered method, in registration order."""
    return list(_TUNERS)
