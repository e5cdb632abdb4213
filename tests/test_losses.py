"""The preference losses against references worked out by hand on fixed log-probabilities."""

from __future__ import annotations

import math

import pytest
import torch

from deltatune.errors import ConfigError
from deltatune.train.losses import (
    completion_lengths,
    dpo_loss,
    kto_loss,
    sequence_logprob,
)


def softplus(x: float) -> float:
    """−log σ(x) = log(1 + e^(−x)), written out."""
    return math.log(1 + math.exp(-x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# -- sequence log-probabilities ------------------------------------------------------------------


def test_sequence_logprob_sums_the_shifted_labelled_tokens() -> None:
    # one row, vocab 3; logits[t] predicts labels[t + 1]
    logits = torch.tensor([[[0.0, 1.0, 2.0], [1.0, 1.0, 1.0], [3.0, 0.0, 0.0], [9.0, 9.0, 9.0]]])
    labels = torch.tensor([[-100, 2, 0, -100]])
    # token 2 after position 0: 2 − log(1 + e + e²); token 0 after position 1: −log 3
    expected = (2 - math.log(1 + math.e + math.e**2)) + (-math.log(3))
    assert sequence_logprob(logits, labels).item() == pytest.approx(expected, abs=1e-6)
    assert completion_lengths(labels).tolist() == [2]


def test_sequence_logprob_ignores_masked_rows_and_keeps_rows_apart() -> None:
    logits = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[-100] * 5, [-100, -100, 4, 1, -100], [-100, 3, 3, 3, 3]])
    logps = sequence_logprob(logits, labels)
    reference = torch.log_softmax(logits, -1)
    assert logps[0].item() == 0.0
    assert logps[1].item() == pytest.approx((reference[1, 1, 4] + reference[1, 2, 1]).item(), abs=1e-6)
    assert logps[2].item() == pytest.approx(reference[2, :4, 3].sum().item(), abs=1e-6)
    assert completion_lengths(labels).tolist() == [0, 2, 4]


def test_sequence_logprob_refuses_mismatched_shapes() -> None:
    with pytest.raises(ConfigError, match="do not match labels"):
        sequence_logprob(torch.zeros(2, 5, 3), torch.zeros(2, 4, dtype=torch.long))


# -- DPO / cDPO / IPO ------------------------------------------------------------------------------

POLICY_CHOSEN, POLICY_REJECTED = t(-1.0, -2.0, -4.0), t(-3.0, -1.5, -4.5)
REFERENCE_CHOSEN, REFERENCE_REJECTED = t(-1.5, -2.0, -3.0), t(-2.5, -1.0, -5.0)
# log-ratios: chosen (0.5, 0.0, −1.0), rejected (−0.5, −0.5, 0.5); chosen − rejected = (1.0, 0.5, −1.5)
DIFFS = (1.0, 0.5, -1.5)


def dpo(**kwargs):
    return dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED, **kwargs)


def test_dpo_sigmoid_loss_and_rewards_match_the_hand_computation() -> None:
    result = dpo(beta=0.5)
    expected = sum(softplus(0.5 * d) for d in DIFFS) / 3
    assert result.loss.item() == pytest.approx(expected, abs=1e-12)
    # the three terms evaluated by hand: log(1 + e^-0.5), log(1 + e^-0.25), log(1 + e^0.75)
    assert result.loss.item() == pytest.approx((0.474077 + 0.575930 + 1.136881) / 3, abs=1e-6)
    assert result.chosen_rewards.tolist() == pytest.approx([0.25, 0.0, -0.5])
    assert result.rejected_rewards.tolist() == pytest.approx([-0.25, -0.25, 0.25])


def test_cdpo_label_smoothing_mixes_in_the_flipped_label() -> None:
    result = dpo(beta=0.5, label_smoothing=0.2)
    expected = sum(0.8 * softplus(0.5 * d) + 0.2 * softplus(-0.5 * d) for d in DIFFS) / 3
    assert result.loss.item() == pytest.approx(expected, abs=1e-12)


def test_ipo_loss_is_the_squared_distance_of_per_token_log_ratios_from_one_over_two_beta() -> None:
    chosen_lengths, rejected_lengths = torch.tensor([2, 1, 4]), torch.tensor([1, 5, 2])
    result = dpo(beta=0.25, loss_type="ipo", chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    # per-token log-ratio differences, 0.5/2 − (−0.5)/1, 0/1 − (−0.5)/5 and −1/4 − 0.5/2,
    # are 0.75, 0.1 and −0.5; 1/(2β) = 2
    expected = ((0.75 - 2) ** 2 + (0.1 - 2) ** 2 + (-0.5 - 2) ** 2) / 3
    assert result.loss.item() == pytest.approx(expected, abs=1e-12)
    unnormalised = dpo(beta=0.25, loss_type="ipo")
    assert unnormalised.loss.item() == pytest.approx(sum((d - 2) ** 2 for d in DIFFS) / 3, abs=1e-12)
    assert unnormalised.chosen_rewards.tolist() == pytest.approx([0.125, 0.0, -0.25])  # rewards stay summed


def test_dpo_gradient_pushes_chosen_up_and_rejected_down() -> None:
    policy_chosen, policy_rejected = POLICY_CHOSEN.clone().requires_grad_(), POLICY_REJECTED.clone().requires_grad_()
    result = dpo_loss(policy_chosen, policy_rejected, REFERENCE_CHOSEN, REFERENCE_REJECTED, beta=0.5)
    result.loss.backward()
    # d/dx of softplus(−βx)/N = −β·σ(−βx)/N for x = chosen − rejected
    expected = [-0.5 * sigmoid(-0.5 * d) / 3 for d in DIFFS]
    assert policy_chosen.grad.tolist() == pytest.approx(expected, abs=1e-12)
    assert policy_rejected.grad.tolist() == pytest.approx([-g for g in expected], abs=1e-12)
    assert not result.chosen_rewards.requires_grad and not result.rejected_rewards.requires_grad


def test_dpo_at_the_reference_is_log_two_with_zero_rewards() -> None:
    logps = t(-3.0, -7.0)
    result = dpo_loss(logps, logps - 1, logps, logps - 1, beta=0.1)
    assert result.loss.item() == pytest.approx(math.log(2), abs=1e-12)
    assert result.chosen_rewards.tolist() == [0.0, 0.0]


def test_dpo_is_finite_for_huge_margins() -> None:
    zero = t(0.0)
    assert dpo_loss(t(1e4), zero, zero, zero).loss.item() == pytest.approx(0.0, abs=1e-12)
    assert dpo_loss(t(-1e4), zero, zero, zero, beta=0.1).loss.item() == pytest.approx(1e3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"beta": 0.0}, "beta=0.0 must be positive"),
        ({"loss_type": "hinge"}, "loss_type='hinge' is unknown"),
        ({"label_smoothing": 0.5}, r"label_smoothing=0.5 must be in \[0, 0.5\)"),
        ({"label_smoothing": 0.1, "loss_type": "ipo"}, "applies to the sigmoid loss only"),
    ],
)
def test_dpo_refuses_bad_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        dpo(**kwargs)


# -- KTO ------------------------------------------------------------------------------------------

POLICY, REFERENCE = t(-1.0, -2.0, -3.0, -1.0), t(-1.5, -1.0, -3.5, -2.0)  # log-ratios (0.5, −1.0, 0.5, 1.0)
DESIRABLE = torch.tensor([True, False, False, True])


def test_kto_loss_matches_the_hand_computation() -> None:
    # mismatched pairs: log-ratios (0.4, 0.2) -> KL = 0.3
    result = kto_loss(
        POLICY,
        REFERENCE,
        DESIRABLE,
        t(-2.0, -3.0),
        t(-2.4, -3.2),
        beta=2.0,
        desirable_weight=1.5,
        undesirable_weight=0.5,
    )
    assert result.kl.item() == pytest.approx(0.3, abs=1e-12)
    expected = (
        1.5 * (1 - sigmoid(2.0 * (0.5 - 0.3)))
        + 0.5 * (1 - sigmoid(2.0 * (0.3 - (-1.0))))
        + 0.5 * (1 - sigmoid(2.0 * (0.3 - 0.5)))
        + 1.5 * (1 - sigmoid(2.0 * (1.0 - 0.3)))
    ) / 4
    assert result.loss.item() == pytest.approx(expected, abs=1e-12)
    assert result.rewards.tolist() == pytest.approx([1.0, -2.0, 1.0, 2.0])


def test_kto_clamps_a_negative_kl_estimate_at_zero() -> None:
    result = kto_loss(POLICY, REFERENCE, DESIRABLE, t(-3.0, -3.0), t(-2.0, -2.5), beta=1.0)  # mean log-ratio −0.75
    assert result.kl.item() == 0.0
    expected = ((1 - sigmoid(0.5)) + (1 - sigmoid(1.0)) + (1 - sigmoid(-0.5)) + (1 - sigmoid(1.0))) / 4
    assert result.loss.item() == pytest.approx(expected, abs=1e-12)


def test_kto_kl_term_is_detached_and_the_gradient_has_the_hand_computed_form() -> None:
    policy, policy_kl = POLICY.clone().requires_grad_(), t(-2.0, -3.0).requires_grad_()
    result = kto_loss(policy, REFERENCE, DESIRABLE, policy_kl, t(-2.4, -3.2), beta=2.0)
    result.loss.backward()
    assert policy_kl.grad is None
    # desirable: d/dρ (1 − σ(β(ρ − KL)))/N = −β σ'(·)/N ; undesirable: +β σ'(·)/N
    ratios, kl, beta = (0.5, -1.0, 0.5, 1.0), 0.3, 2.0
    expected = []
    for ratio, good in zip(ratios, DESIRABLE.tolist()):
        s = sigmoid(beta * (ratio - kl) if good else beta * (kl - ratio))
        expected.append((-1 if good else 1) * beta * s * (1 - s) / 4)
    assert policy.grad.tolist() == pytest.approx(expected, abs=1e-12)


def test_kto_with_one_class_only_and_at_the_reference() -> None:
    logps = t(-1.0, -2.0)
    for desirable in (torch.tensor([True, True]), torch.tensor([False, False])):
        result = kto_loss(logps, logps, desirable, logps, logps)
        assert result.loss.item() == pytest.approx(0.5, abs=1e-12)  # 1 − σ(0)
        assert result.kl.item() == 0.0 and result.rewards.tolist() == [0.0, 0.0]


def test_kto_refuses_non_positive_settings() -> None:
    logps = t(-1.0)
    with pytest.raises(ConfigError, match="undesirable_weight=0 must be positive"):
        kto_loss(logps, logps, torch.tensor([True]), logps, logps, undesirable_weight=0)
