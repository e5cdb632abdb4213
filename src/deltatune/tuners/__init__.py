"""One tuner per method; ``tuner_for(config)`` picks the one a config belongs to.

The registry names each method's config class (torch-free) and where its tuner lives; a tuner
module (which imports torch) is imported on first use, so listing and validating methods stays fast.
"""

from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING

from deltatune.config import DeltaConfig
from deltatune.errors import ConfigError
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

if TYPE_CHECKING:
    from deltatune.tuners.base import Tuner

_TUNERS: dict[type[DeltaConfig], str] = {  # config class -> "module.TunerClass", in registration order
    LoraConfig: "lora.tuner.LoraTuner",
    BottleneckConfig: "bottleneck.tuner.BottleneckTuner",
    PromptTuningConfig: "prompt.prompt_tuning.PromptTuningTuner",
    PromptEncoderConfig: "prompt.prompt_tuning.PTuningTuner",
    PrefixTuningConfig: "prompt.prefix.PrefixTuner",
    IA3Config: "ia3.tuner.IA3Tuner",
    VeraConfig: "vera.tuner.VeraTuner",
    AdaLoraConfig: "adalora.tuner.AdaLoraTuner",
    OFTConfig: "oft.tuner.OFTTuner",
    LoHaConfig: "lycoris.tuner.LoHaTuner",
    LoKrConfig: "lycoris.tuner.LoKrTuner",
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
