"""GRPO's settings, with TRL's ``GRPOConfig`` names, defaults and meanings (torch-free, checked at construction)."""

from __future__ import annotations

import dataclasses

from deltatune.errors import ConfigError

LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo")  # how the per-token loss is averaged (train/policy_loss.py)
SCALE_REWARDS = ("group", "batch", "none")  # which standard deviation divides the advantages


@dataclasses.dataclass(frozen=True)
class GRPOSettings:
    """How GRPO samples, scores and weighs completions.

    ``num_generations`` completions per prompt form a group; ``steps_per_generation`` micro-batches (default:
    the gradient-accumulation steps, one generation per optimizer step) share one generation, which is used
    ``num_iterations`` times. ``epsilon_high`` defaults to ``epsilon`` (DAPO raises it: clip-higher).
    ``reward_weights`` weighs the reward functions (default: 1 each). ``padding_free`` (deltatune's, as SFT's):
    the log-probabilities of a micro-batch come from one row holding every prompt and completion without padding.
    """

    num_generations: int = 8
    max_prompt_length: int | None = 512
    max_completion_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    num_iterations: int = 1
    steps_per_generation: int | None = None
    mask_truncated_completions: bool = False
    reward_weights: tuple[float, ...] | None = None
    padding_free: bool = True

    def __post_init__(self) -> None:
        if self.num_generations < 2:
            raise ConfigError(f"num_generations={self.num_generations}: GRPO compares at least 2 completions a prompt")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ConfigError(f"max_prompt_length={self.max_prompt_length} must be at least 1 (or None: no cut)")
        if self.max_completion_length < 1:
            raise ConfigError(f"max_completion_length={self.max_completion_length} must be at least 1")
        if self.temperature <= 0:
            raise ConfigError(f"temperature={self.temperature} must be above 0: GRPO learns from sampled answers")
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"loss_type={self.loss_type!r} is unknown; use one of {', '.join(LOSS_TYPES)}")
        if self.scale_rewards not in SCALE_REWARDS:
            raise ConfigError(f"scale_rewards={self.scale_rewards!r} is unknown; use one of {', '.join(SCALE_REWARDS)}")
        if self.beta < 0 or self.epsilon <= 0 or (self.epsilon_high is not None and self.epsilon_high <= 0):
            raise ConfigError("beta must be 0 or more, and epsilon / epsilon_high above 0")
        if self.num_iterations < 1 or (self.steps_per_generation is not None and self.steps_per_generation < 1):
            raise ConfigError("num_iterations and steps_per_generation must be at least 1")

    @property
    def clip_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high
