"""GRPO's loss against TRL 1.16's ``GRPOTrainer._compute_loss`` on the same log-probabilities and advantages:
loss and gradients within 1e-6 for every loss type, with and without the KL term and with a moved policy
(clipping on both sides); advantages against the plain formula and TRL's ``nanstd``.

TRL's method is called unbound, on a stand-in ``self`` with just the attributes it reads, its forward pass
replaced by the given per-token log-probabilities: the numbers compared are TRL's arithmetic."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from trl.trainer.grpo_trainer import GRPOTrainer
from trl.trainer.utils import nanstd

from deltatune.errors import ConfigError
from deltatune.train.policy_loss import LOSS_TYPES, combine_rewards, group_advantages, nan_std, policy_loss

COMPLETIONS, LENGTH, MAX_LENGTH = 6, 5, 7
TOLERANCE = 1e-6


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(COMPLETIONS, LENGTH, generator=g, dtype=torch.float64) * 3
    mask = torch.ones(COMPLETIONS, LENGTH, dtype=torch.long)
    for row, length in enumerate([5, 3, 1, 4, 5, 2]):
        mask[row, length:] = 0
    return {
        "logps": logps,
        "old": logps + 0.4 * torch.randn(COMPLETIONS, LENGTH, generator=g, dtype=torch.float64),  # moved: clipping
        "ref": logps + 0.3 * torch.randn(COMPLETIONS, LENGTH, generator=g, dtype=torch.float64),
        "advantages": torch.tensor([1.2, -0.7, 0.0, 2.0, -1.5, 0.3], dtype=torch.float64),
        "mask": mask,
    }


def trl_loss(logps: torch.Tensor, data: dict, loss_type: str, beta: float, moved: bool, tokens: int):
    accelerator = SimpleNamespace(
        num_processes=1, gather=lambda x: x, reduce=lambda x, reduction: x, gather_for_metrics=lambda x: x
    )
    me = SimpleNamespace(
        top_entropy_quantile=1.0,
        aux_loss_enabled=False,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=beta,
        loss_type=loss_type,
        epsilon_low=0.2,
        epsilon_high=0.28,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=MAX_LENGTH,
        accelerator=accelerator,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        _entropy_bonus_enabled=False,
        _metrics={"train": defaultdict(list)},
    )
    me._get_per_token_logps_and_entropies = lambda *args, **kwargs: (logps, torch.zeros_like(logps), None)
    inputs = {
        "prompt_ids": torch.zeros(COMPLETIONS, 2, dtype=torch.long),
        "prompt_mask": torch.ones(COMPLETIONS, 2, dtype=torch.long),
        "completion_ids": torch.zeros(COMPLETIONS, LENGTH, dtype=torch.long),
        "completion_mask": data["mask"],
        "advantages": data["advantages"],
        "num_items_in_batch": torch.tensor(float(tokens)),
    }
    if moved:
        inputs["old_per_token_logps"] = data["old"]
    if beta:
        inputs["ref_per_token_logps"] = data["ref"]
    return GRPOTrainer._compute_loss(me, None, inputs), me._metrics["train"]


@pytest.mark.parametrize("moved", [False, True], ids=["on-policy", "moved"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_and_gradients_equal_trl(loss_type, beta, moved):
    data = batch()
    tokens = int(data["mask"].sum()) + 9  # dapo: the whole generation batch has more tokens than this slice
    ours_logps = data["logps"].clone().requires_grad_()
    theirs_logps = data["logps"].clone().requires_grad_()
    ours = policy_loss(
        ours_logps,
        data["advantages"],
        data["mask"],
        loss_type=loss_type,
        epsilon_low=0.2,
        epsilon_high=0.28,
        old_logps=data["old"] if moved else None,
        ref_logps=data["ref"],
        beta=beta,
        max_completion_length=MAX_LENGTH,
        tokens=tokens,
    )
    theirs, metrics = trl_loss(theirs_logps, data, loss_type, beta, moved, tokens)
    torch.testing.assert_close(ours.loss, theirs, atol=TOLERANCE, rtol=0)
    ours.loss.backward(), theirs.backward()
    torch.testing.assert_close(ours_logps.grad, theirs_logps.grad, atol=TOLERANCE, rtol=0)
    assert ours_logps.grad.abs().max() > 0
    assert ours.clipped_low.item() == pytest.approx(metrics["clip_ratio/low_mean"][0], abs=TOLERANCE)
    assert ours.clipped_high.item() == pytest.approx(metrics["clip_ratio/high_mean"][0], abs=TOLERANCE)
    assert ours.clipped.item() == pytest.approx(metrics["clip_ratio/region_mean"][0], abs=TOLERANCE)
    if moved:
        assert ours.clipped_low > 0 and ours.clipped_high > 0  # both sides of the clip are exercised
    if beta:
        assert ours.kl.item() == pytest.approx(metrics["kl"][0], abs=TOLERANCE)
    else:
        assert ours.kl is None


def test_group_advantages_are_each_completion_over_its_group_mean():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    group = group_advantages(rewards, 4, "group")
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std()  # Bessel-corrected
    torch.testing.assert_close(group[:4], (torch.tensor([1.0, 0.0, 0.0, 1.0]) - 0.5) / (std + 1e-4))
    assert group[4:].abs().max() == 0  # a group that agrees teaches nothing
    torch.testing.assert_close(group_advantages(rewards, 4, "none"), torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))
    batch_std = rewards.std()
    torch.testing.assert_close(
        group_advantages(rewards, 4, "batch"), group_advantages(rewards, 4, "none") / (batch_std + 1e-4)
    )


def test_unscored_completions_are_left_out_and_get_no_advantage():
    rewards = torch.tensor([1.0, float("nan"), 3.0, 2.0])
    advantages = group_advantages(rewards, 4, "group")
    kept = torch.tensor([1.0, 3.0, 2.0])
    expected = (kept - kept.mean()) / (kept.std() + 1e-4)
    torch.testing.assert_close(advantages, torch.stack([expected[0], torch.tensor(0.0), expected[1], expected[2]]))


def test_nan_std_is_trls_nanstd():
    values = torch.tensor(
        [[1.0, float("nan"), 3.0, 7.0], [2.0, 2.0, float("nan"), float("nan")], [5.0] + [float("nan")] * 3]
    )
    torch.testing.assert_close(nan_std(values, dim=1), nanstd(values, dim=1), equal_nan=True)
    torch.testing.assert_close(nan_std(values), nanstd(values))


def test_weighted_rewards_sum_what_each_function_said():
    per_function = torch.tensor([[1.0, 0.5], [float("nan"), 2.0], [float("nan"), float("nan")]])
    total = combine_rewards(per_function, torch.tensor([1.0, 0.5]))
    torch.testing.assert_close(total[:2], torch.tensor([1.25, 1.0]))
    assert total[2].isnan()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: policy_loss(torch.zeros(1, 1), torch.zeros(1), torch.ones(1, 1), loss_type="ppo"), "loss_type='ppo'"),
        (lambda: policy_loss(torch.zeros(1, 1), torch.zeros(1), torch.ones(1, 1), beta=0.1), "ref_logps"),
        (
            lambda: policy_loss(torch.zeros(1, 1), torch.zeros(1), torch.ones(1, 1), loss_type="dr_grpo"),
            "max_completion",
        ),
        (lambda: group_advantages(torch.zeros(5), 4), "do not form groups of 4"),
        (lambda: group_advantages(torch.zeros(4), 4, "rank"), "scale_rewards='rank'"),
    ],
)
def test_bad_settings_are_refused_in_one_line(call, message):
    with pytest.raises(ConfigError, match=message):
        call()
