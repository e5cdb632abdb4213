"""ORPOTrainer and SimPOTrainer: no reference forward pass, they learn the synthetic preference, and
their loss and logged metrics equal TRL's ORPOTrainer / CPOTrainer(loss_type="simpo") on the same
adapter and batch."""

from __future__ import annotations

import pytest
import torch
from trl.experimental.cpo import CPOConfig
from trl.experimental.cpo import CPOTrainer as TRLCPOTrainer
from trl.experimental.orpo import ORPOConfig
from trl.experimental.orpo import ORPOTrainer as TRLORPOTrainer

from deltatune.errors import ConfigError
from deltatune.train.reference_free import ORPOTrainer, SimPOTrainer
from preference_helpers import PAD, dpo_examples, lora_policy, training_args, trl_beside_deltatune
from test_dpo import TRIPLES, ours

TRAINERS = {"orpo": (ORPOTrainer, {"beta": 0.1}), "simpo": (SimPOTrainer, {})}


def trl_batch(triples) -> dict[str, torch.Tensor]:
    """TRL's padded chosen_* / rejected_* tensors of (prompt, chosen, rejected) token lists."""
    batch = {}
    for index, side in ((1, "chosen"), (2, "rejected")):
        rows = [(prompt, triple[index]) for triple in triples for prompt in [triple[0]]]
        width = max(len(p) + len(c) for p, c in rows)

        def padded(values, fill, width=width):
            return torch.tensor([v + [fill] * (width - len(v)) for v in values])

        batch[f"{side}_input_ids"] = padded([p + c for p, c in rows], PAD)
        batch[f"{side}_attention_mask"] = padded([[1] * (len(p) + len(c)) for p, c in rows], 0)
        batch[f"{side}_labels"] = padded([[-100] * len(p) + c for p, c in rows], -100)
    return batch


@pytest.mark.parametrize("name", ["orpo", "simpo"])
def test_learns_the_pattern_without_ever_disabling_the_adapter(tmp_path, name) -> None:
    cls, options = TRAINERS[name]
    model = lora_policy()
    model.disable_adapter = None  # a reference forward pass would call it
    trainer = cls(
        model,
        training_args(tmp_path),
        train_dataset=dpo_examples(64, seed=0),
        eval_dataset=dpo_examples(32, seed=1),
        pad_token_id=PAD,
        **options,
    )
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert before["eval_rewards/accuracies"] < 0.5 < 0.9 < after["eval_rewards/accuracies"], (before, after)
    assert after["eval_rewards/margins"] > before["eval_rewards/margins"]
    assert after["eval_loss"] < before["eval_loss"]


@pytest.mark.parametrize("name", ["orpo", "simpo"])
def test_loss_and_metrics_equal_trl_on_the_same_adapter_and_batch(tmp_path, name) -> None:
    common = {"output_dir": str(tmp_path / "trl"), "report_to": [], "use_cpu": True, "bf16": False}
    if name == "orpo":
        config, trl_class, options = ORPOConfig(beta=0.5, **common), TRLORPOTrainer, {"beta": 0.5}
        keys = ("nll_loss", "log_odds_ratio", "log_odds_chosen")
    else:
        config = CPOConfig(beta=2.0, loss_type="simpo", simpo_gamma=0.7, cpo_alpha=0.0, **common)
        trl_class, options, keys = TRLCPOTrainer, {"beta": 2.0, "gamma": 0.7}, ()
    placeholder = {"prompt": "t1", "chosen": " t2", "rejected": " t3"}
    reference, model = trl_beside_deltatune(trl_class, config, placeholder, tmp_path)
    trl_loss = reference.compute_loss(reference.model, trl_batch(TRIPLES))
    trl_metrics = {key: values[-1] for key, values in reference._stored_metrics["train"].items()}

    trainer = TRAINERS[name][0](model, training_args(tmp_path), pad_token_id=PAD, **options)
    loss = trainer.compute_loss(model, trainer.data_collator(ours(TRIPLES)))
    trainer.log({"loss": loss.item()})
    logged = trainer.state.log_history[-1]

    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", *keys):
        assert logged[key] == pytest.approx(trl_metrics[key], abs=1e-5), key
    assert abs(logged["rewards/margins"]) > 1e-3


def test_bad_settings_fail_before_training(tmp_path) -> None:
    with pytest.raises(ConfigError, match="beta=-1 must be positive"):
        ORPOTrainer(lora_policy(), training_args(tmp_path), beta=-1, pad_token_id=PAD)
    with pytest.raises(ConfigError, match="gamma=-0.5 must be 0 or more"):
        SimPOTrainer(lora_policy(), training_args(tmp_path), gamma=-0.5, pad_token_id=PAD)
