"""One tuner per method; ``tuner_for(config)`` picks the one a config belongs to."""

from __future__ import annotations

from ..config import DeltaConfig
from ..errors import ConfigError
from .base import Tuner
from .lora import LoraTuner

_TUNERS: dict[str, Tuner] = {tuner.config_class.peft_type: tuner for tuner in (LoraTuner(),)}


def tuner_for(config: DeltaConfig) -> Tuner:
    """The tuner that implements ``config``'s method."""
    try:
        return _TUNERS[config.peft_type]
    except KeyError:
        raise ConfigError(f"no tuner for peft_type={config.peft_type!r}") from None
