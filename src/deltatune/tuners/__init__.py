"""One tuner per method; ``tuner_for(config)`` picks the one a config belongs to."""

from __future__ import annotations

from ..config import DeltaConfig
from ..errors import ConfigError
from .base import Tuner
from .bottleneck import BottleneckTuner
from .lora_tuner import LoraTuner
from .prefix import PrefixTuner
from .prompt import PromptTuningTuner, PTuningTuner

_TUNERS: dict[str, Tuner] = {tuner.config_class.peft_type: tuner for tuner in (
    LoraTuner(), BottleneckTuner(), PromptTuningTuner(), PTuningTuner(), PrefixTuner()
)}  # fmt: skip


def tuner_for(config: DeltaConfig) -> Tuner:
    """The tuner that implements ``config``'s method."""
    try:
        return _TUNERS[config.peft_type]
    except KeyError:
        raise ConfigError(f"no tuner for peft_type={config.peft_type!r}") from None


def config_classes() -> list[type[DeltaConfig]]:
    """The config class of every registered method, in registration order."""
    return [tuner.config_class for tuner in _TUNERS.values()]
