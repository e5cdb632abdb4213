"""The training stages by name, and each stage's defaults where they differ from ``TrainConfig``'s
(torch-free: ``deltatune train`` reads them before anything loads). A key given in the config file or on
the command line wins; a method's own ``run_defaults`` win too (a prompt method's learning rate).

SimPO's reward is β times a per-token *mean* log-probability, some 1/|y| of DPO's summed one, so it
needs a far larger β than DPO's 0.1 (the SimPO paper uses 2.0-2.5; docs/training.md has the measured runs).
"""

from __future__ import annotations

from typing import Any

STAGES = ("sft", "dpo", "kto", "orpo", "simpo", "rm", "grpo")
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "simpo": {"beta": 2.5},
    "grpo": {"beta": 0.0, "loss_type": "dapo"},  # TRL's GRPOConfig defaults: no KL term, DAPO's token average
}
