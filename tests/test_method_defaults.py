"""Every method's defaults improve the embedded model: `deltatune train method=X` on a short budget ends
below the base model's held-out loss (the long comparison is scripts/compare_methods.py -> docs/methods.md)."""

from __future__ import annotations

import pytest

from deltatune.train.config import TrainConfig
from deltatune.train.methods import methods
from deltatune.train.run import run_training

pytestmark = pytest.mark.slow
SHORT = {"max_steps": 12, "batch_size": 4, "max_length": 64, "eval_examples": 24}


@pytest.mark.parametrize("method", sorted(methods()))
def test_the_defaults_of_every_method_end_below_the_base(method, tmp_path) -> None:
    config = TrainConfig.from_dict({**SHORT, "method": method, "output_dir": str(tmp_path)})
    result = run_training(config, log=lambda line: None)
    assert result.diverged is None
    assert result.eval_loss_after < result.eval_loss_before, (method, result.eval_loss_before, result.eval_loss_after)
