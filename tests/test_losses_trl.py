"""ORPO, SimPO and the reward model's Bradley-Terry loss against TRL 1.16's own loss code on the same
tensors: the losses, their gradients and the logged rewards agree within 1e-5.

TRL's methods are called unbound, on a stand-in ``self`` carrying just the attributes they read, so the
numbers compared are TRL's arithmetic, not a transcription of it."""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import pytest
import torch
from trl.experimental.cpo import CPOTrainer
from trl.experimental.orpo import ORPOTrainer
from trl.trainer.reward_trainer import RewardTrainer

from deltatune.errors import ConfigError
from deltatune.train.losses import bradley_terry_loss, log1mexp, orpo_loss, simpo_loss

# per-token mean log-probs of 5 pairs: both sides of −log 2 (log1mexp's two branches), ties and near-zero
CHOSEN = (-0.2, -1.3, -0.05, -2.5, -0.6931)
REJECTED = (-0.9, -0.4, -3.0, -2.5, -0.01)
SCORES_CHOSEN, SCORES_REJECTED = (1.5, -0.3, 0.2, 2.0), (0.5, 0.4, 0.2, -1.0)
TOLERANCE = 1e-5


def leaves(*values) -> list[torch.Tensor]:
    return [torch.tensor(v, dtype=torch.float32, requires_grad=True) for v in values]


def accelerator() -> SimpleNamespace:
    return SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a.float(), b.float(), atol=TOLERANCE, rtol=0)


def trl_orpo(chosen, rejected, nll, beta):
    """TRL's ORPOTrainer.get_batch_loss_metrics, its forward pass replaced by the given log-probs and NLL."""
    logits = torch.zeros(len(CHOSEN), 2, 3)
    me = SimpleNamespace(beta=beta, accelerator=accelerator(), aux_loss_enabled=False)
    me.concatenated_forward = lambda model, batch: (chosen, rejected, logits, logits, nll)
    me.odds_ratio_loss = functools.partial(ORPOTrainer.odds_ratio_loss, me)
    return ORPOTrainer.get_batch_loss_metrics(me, None, {})


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_orpo_loss_gradients_and_rewards_equal_trl(beta) -> None:
    ours_inputs, trl_inputs = leaves(CHOSEN, REJECTED, 1.7), leaves(CHOSEN, REJECTED, 1.7)
    result = orpo_loss(*ours_inputs, beta=beta)
    trl_loss, trl_metrics = trl_orpo(*trl_inputs, beta=beta)
    assert close(result.loss, trl_loss)
    result.loss.backward(), trl_loss.backward()
    for ours, theirs in zip(ours_inputs, trl_inputs):
        assert close(ours.grad, theirs.grad)
    assert result.chosen_rewards.mean().item() == pytest.approx(trl_metrics["rewards/chosen"], abs=TOLERANCE)
    assert result.rejected_rewards.mean().item() == pytest.approx(trl_metrics["rewards/rejected"], abs=TOLERANCE)
    assert result.log_odds.mean().item() == pytest.approx(trl_metrics["log_odds_chosen"], abs=TOLERANCE)
    accuracy = (result.chosen_rewards > result.rejected_rewards).float().mean().item()
    assert accuracy == pytest.approx(trl_metrics["rewards/accuracies"])


def test_log1mexp_is_log_of_one_minus_exp_on_both_branches() -> None:
    x = torch.tensor([-5.0, -1.0, -0.7, -0.69, -0.1, -1e-4], dtype=torch.float64)
    assert torch.allclose(log1mexp(x), torch.log(1 - torch.exp(x)), atol=1e-9)


def trl_simpo(chosen, rejected, beta, gamma, label_smoothing):
    """TRL's CPOTrainer(loss_type="simpo", cpo_alpha=0).get_batch_loss_metrics on the given mean log-probs
    (with cpo_alpha=0 TRL's NLL term is the constant 0, as SimPO has none)."""
    logits = torch.zeros(len(CHOSEN), 2, 3)
    me = SimpleNamespace(
        beta=beta,
        simpo_gamma=gamma,
        label_smoothing=label_smoothing,
        loss_type="simpo",
        alpha=0.0,
        cpo_alpha=0.0,
        accelerator=accelerator(),
        aux_loss_enabled=False,
    )
    me.concatenated_forward = lambda model, batch: (chosen, rejected, logits, logits, torch.tensor(0.0))
    me.cpo_loss = functools.partial(CPOTrainer.cpo_loss, me)
    return CPOTrainer.get_batch_loss_metrics(me, None, {})


@pytest.mark.parametrize(("beta", "gamma", "label_smoothing"), [(2.0, 0.5, 0.0), (0.1, 1.2, 0.0), (2.5, 0.3, 0.1)])
def test_simpo_loss_gradients_and_rewards_equal_trl_cpo_simpo(beta, gamma, label_smoothing) -> None:
    ours_inputs, trl_inputs = leaves(CHOSEN, REJECTED), leaves(CHOSEN, REJECTED)
    result = simpo_loss(*ours_inputs, beta=beta, gamma=gamma, label_smoothing=label_smoothing)
    trl_loss, trl_metrics = trl_simpo(*trl_inputs, beta=beta, gamma=gamma, label_smoothing=label_smoothing)
    assert close(result.loss, trl_loss)
    result.loss.backward(), trl_loss.backward()
    for ours, theirs in zip(ours_inputs, trl_inputs):
        assert close(ours.grad, theirs.grad)
    margins = (result.chosen_rewards - result.rejected_rewards).mean().item()
    assert margins == pytest.approx(trl_metrics["rewards/margins"], abs=TOLERANCE)
    assert result.chosen_rewards.mean().item() == pytest.approx(trl_metrics["rewards/chosen"], abs=TOLERANCE)


def test_simpo_at_equal_log_probs_is_softplus_of_gamma() -> None:
    logps = torch.tensor([-1.0, -2.0])
    assert simpo_loss(logps, logps, beta=2.0, gamma=0.5).loss.item() == pytest.approx(math.log1p(math.exp(0.5)))


def trl_reward(chosen, rejected, margin, center_rewards_coefficient):
    """TRL's RewardTrainer.compute_loss with a model whose scores are the given ones."""
    scores = torch.cat([chosen, rejected]).unsqueeze(-1)
    model = lambda **inputs: SimpleNamespace(logits=scores)  # noqa: E731
    me = SimpleNamespace(
        model=SimpleNamespace(training=False),
        args=SimpleNamespace(center_rewards_coefficient=center_rewards_coefficient),
        accelerator=accelerator(),
        _metrics={"eval": {name: [] for name in ("num_tokens", "min_reward", "mean_reward", "max_reward")}},
        _total_train_tokens=0,
    )
    me._metrics["eval"].update(accuracy=[], margin=[])
    inputs = {"input_ids": torch.zeros(2 * len(chosen), 3, dtype=torch.long)}
    if margin is not None:
        inputs["margin"] = margin
    return RewardTrainer.compute_loss(me, model, inputs), me._metrics["eval"]


@pytest.mark.parametrize(("with_margin", "center"), [(False, None), (True, None), (True, 0.01)])
def test_bradley_terry_loss_and_gradients_equal_trl_reward_trainer(with_margin, center) -> None:
    margin = torch.tensor([0.5, 0.0, 1.0, 2.0]) if with_margin else None
    ours_inputs, trl_inputs = leaves(SCORES_CHOSEN, SCORES_REJECTED), leaves(SCORES_CHOSEN, SCORES_REJECTED)
    loss = bradley_terry_loss(*ours_inputs, margin=margin, center_rewards_coefficient=center)
    trl_loss, trl_metrics = trl_reward(*trl_inputs, margin, center)
    assert close(loss, trl_loss)
    loss.backward(), trl_loss.backward()
    for ours, theirs in zip(ours_inputs, trl_inputs):
        assert close(ours.grad, theirs.grad)
    accuracy = (ours_inputs[0] > ours_inputs[1]).float().mean().item()
    assert accuracy == pytest.approx(trl_metrics["accuracy"][-1]) == 0.5  # one tie, one wrong pair


def test_bad_settings_are_one_line_config_errors() -> None:
    logps = torch.tensor([-1.0])
    with pytest.raises(ConfigError, match="beta=0 must be positive"):
        orpo_loss(logps, logps, torch.tensor(1.0), beta=0)
    with pytest.raises(ConfigError, match="gamma=-1 must be 0 or more"):
        simpo_loss(logps, logps, gamma=-1)
    with pytest.raises(ConfigError, match="label_smoothing=0.5"):
        simpo_loss(logps, logps, label_smoothing=0.5)
