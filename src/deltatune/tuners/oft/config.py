"""OFT's configuration: peft 0.21.2's ``OFTConfig`` fields, defaults and meanings, validated at construction."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

from deltatune.config import (
    DeltaConfig,
    check_bool,
    check_layer_choice,
    check_positive_int,
    check_positive_number,
    check_probability,
    module_names,
    modules_to_save_names,
)
from deltatune.errors import ConfigError

OFT_BIASES = ("none", "all", "oft_only")

# The peft release whose OFT numbers deltatune reproduces, written into saved configs as ``peft_version``.
PEFT_FORMAT_VERSION = "0.21.2"


@dataclass
class OFTConfig(DeltaConfig):
    """OFT (Qiu et al., 2023, arXiv:2306.07280): ``y = W0 (R x)`` with R a trainable block-diagonal rotation.

    Each of the r diagonal blocks of R (size b = in_features / r) is the Cayley transform of a skew-symmetric
    matrix S whose b(b-1)/2 upper-triangle entries train (``tuners/oft/rotation.py``); S = 0 at start, so R = I
    and the model starts as the base model. Merging writes W0 Rᵀ into the weight.

    Args:
        r: the number of blocks per layer; 0 to derive it from ``oft_block_size``. Set exactly one of the two.
        oft_block_size: b, the size of each block (peft's default 32; 0 to derive it from ``r``). A value that
            does not divide a layer's width is moved to the nearest divisor for that layer, with a warning,
            as in peft.
        module_dropout: while training, this share of each layer's blocks (``int(p · blocks)``, chosen at
            random) is the identity (multiplicative dropout). peft 0.21.2 builds this layer but never calls it.
        target_modules / exclude_modules: as LoRA's (names, suffixes, a regex or "all-linear"); OFT wraps
            ``nn.Linear``, ``nn.Conv2d`` and ``nn.Embedding``, the layers peft 0.21.2's OFT wraps.
        fan_in_fan_out: peft's field; OFT wraps no [in, out] layer, so True is reset to False with a warning.
        bias: "none", "all" (train every bias) or "oft_only" (the biases of adapted layers).
        init_weights: True: S = 0 (R = I); False: S's entries N(0, 0.1²), a random rotation (for tests).
        layers_to_transform / layers_pattern: adapt only these layer indices (of the named layer list).
        modules_to_save: extra modules trained in full and saved with the adapter.
        coft: constrained OFT: before each use, every block's S is pulled back into the Frobenius ball of radius
            eps / sqrt(blocks) (written into the parameter, as peft does).
        eps: that radius's numerator.
        block_share: one S for all blocks of a layer (b(b-1)/2 parameters per layer).
        use_cayley_neumann: approximate the Cayley transform's inverse by a Neumann series (faster, nearly
            orthogonal) instead of solving exactly.
        num_cayley_neumann_terms: the number of series terms.
    """

    peft_type: ClassVar[str] = "OFT"
    # peft leaves OFT's targets to a per-architecture table (query and value); every linear layer trains better
    # on the embedded model. A rotation moves the output from the first step (LoRA's zero B does not), so its
    # step is half LoRA's: 2e-3 rose above the base loss by step 10 (docs/oft.md).
    train_defaults: ClassVar[dict[str, Any]] = {"target_modules": "all-linear"}
    run_defaults: ClassVar[dict[str, Any]] = {"learning_rate": 5e-4}

    r: int = 0
    oft_block_size: int = 32
    module_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    bias: str = "none"
    exclude_modules: list[str] | str | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("r", "oft_block_size"):
            value = getattr(self, name)
            if value != 0:
                check_positive_int(name, value)
        if self.r == 0 and self.oft_block_size == 0:
            raise ConfigError("r=0 and oft_block_size=0: set one of them (the other follows from the layer width)")
        if self.r != 0 and self.oft_block_size != 0:
            raise ConfigError(
                f"r={self.r} and oft_block_size={self.oft_block_size} are both set: set one and leave the other 0 "
                f"(r x oft_block_size = in_features)"
            )
        check_probability("module_dropout", self.module_dropout)
        for name in ("fan_in_fan_out", "init_weights", "coft", "block_share", "use_cayley_neumann"):
            check_bool(name, getattr(self, name))
        if self.bias not in OFT_BIASES:
            raise ConfigError(f"bias={self.bias!r} is unknown; use 'none', 'all' or 'oft_only'")
        check_positive_number("eps", self.eps)
        check_positive_int("num_cayley_neumann_terms", self.num_cayley_neumann_terms)
        self.target_modules = module_names("target_modules", self.target_modules)
        self.exclude_modules = module_names("exclude_modules", self.exclude_modules)
        self.modules_to_save = modules_to_save_names(self.modules_to_save)
        check_layer_choice(self)

    def to_dict(self) -> dict[str, Any]:
        """peft's keys, with ``peft_version``: peft reads it to tell the Cayley-Neumann series of peft >= 0.18
        (which deltatune computes) from the older one, and warns without it."""
        return {**super().to_dict(), "peft_version": PEFT_FORMAT_VERSION}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeltaConfig:
        """As ``DeltaConfig.from_dict``; a file from before peft 0.14's OFT (no ``oft_block_size``) is refused, and
        a Cayley-Neumann adapter from before peft 0.18 (another series) warns, as peft does."""
        if "oft_block_size" not in data:
            raise ConfigError(
                "this OFT adapter config has no oft_block_size: it was saved by peft < 0.14, whose OFT weights mean "
                "something else; retrain the adapter with peft >= 0.14 or deltatune"
            )
        version = re.match(r"(\d+)\.(\d+)", str(data.get("peft_version", "0.0")))
        if data.get("use_cayley_neumann") and (version is None or tuple(map(int, version.groups())) < (0, 18)):
            warnings.warn(
                "this OFT adapter uses the Cayley-Neumann series as peft < 0.18 computed it, which peft 0.18 changed "
                "(and deltatune follows); retrain it for the same numbers",
                stacklevel=2,
            )
        return super().from_dict(data)
