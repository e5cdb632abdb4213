"""KTOTrainer: mismatched KL pairs, rewards zero at step 0, it learns the synthetic preference, and its
loss, rewards and KL equal TRL's on the same model and batch."""

from __future__ import annotations

import pytest
import trl
from datasets import Dataset
from transformers import AutoTokenizer

from deltatune.data.chatterbot import chatterbot_kto_examples
from deltatune.errors import ConfigError, DataError
from deltatune.train.kto import KTOTrainer
from deltatune.train.preference_data import KTOCollator, encode_kto_examples
from preference_helpers import (
    PAD,
    kto_examples,
    lora_policy,
    training_args,
    trl_beside_deltatune,
)

# (prompt, completion, desirable) of different lengths, so that padding is exercised
ROWS = [
    ([11, 12, 13], [1, 2, 3, 4], True),
    ([20, 21], [5], False),
    ([30], [9, 10, 40], True),
    ([50, 51], [6, 7], False),
]


def ours(rows) -> list[dict]:
    return [{"input_ids": p + c, "labels": [-100] * len(p) + c, "label": good} for p, c, good in rows]


def trainer_for(model, tmp_path, train=None, evaluation=None, args=None, **kwargs) -> KTOTrainer:
    arguments = training_args(tmp_path, **(args or {}))
    return KTOTrainer(model, arguments, train_dataset=train, eval_dataset=evaluation, pad_token_id=PAD, **kwargs)


def test_collator_pairs_each_prompt_with_the_previous_rows_completion() -> None:
    batch = KTOCollator(pad_token_id=0)(ours(ROWS[:3]))
    assert batch["input_ids"].tolist() == [[11, 12, 13, 1, 2, 3, 4], [20, 21, 5, 0, 0, 0, 0], [30, 9, 10, 40, 0, 0, 0]]
    # row 0 gets row 2's completion (cyclic), row 1 gets row 0's, row 2 gets row 1's
    assert batch["kl_input_ids"].tolist() == [[11, 12, 13, 9, 10, 40], [20, 21, 1, 2, 3, 4], [30, 5, 0, 0, 0, 0]]
    assert batch["kl_labels"].tolist() == [
        [-100, -100, -100, 9, 10, 40],
        [-100, -100, 1, 2, 3, 4],
        [-100, 5, -100, -100, -100, -100],
    ]
    assert batch["kl_attention_mask"][2].tolist() == [1, 1, 0, 0, 0, 0]
    assert batch["desirable"].tolist() == [True, False, True]
    cut = KTOCollator(pad_token_id=0, max_length=4)(ours(ROWS[:2]))
    assert cut["kl_input_ids"].tolist() == [[11, 12, 13, 5], [20, 21, 1, 2]]


def test_collator_refuses_an_example_without_completion_tokens() -> None:
    with pytest.raises(DataError, match="no completion tokens"):
        KTOCollator(pad_token_id=0)([{"input_ids": [1, 2], "labels": [-100, -100], "label": True}])


def test_chat_encoding_labels_only_the_completion_and_keeps_the_label(smollm2_dir) -> None:
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)
    records = chatterbot_kto_examples()[:4]  # SYNTHETIC: desirable = the real answer, undesirable = another's
    encoded = encode_kto_examples(tokenizer, records, max_length=512)
    assert [example["label"] for example in encoded.examples] == [True, False, True, False]
    for record, example in zip(records, encoded.examples):
        start = next(i for i, label in enumerate(example["labels"]) if label != -100)
        assert tokenizer.decode(example["input_ids"][start:]) == record.completion[0].content + tokenizer.eos_token
    batch = KTOCollator(tokenizer.pad_token_id)(encoded.examples)
    assert batch["kl_input_ids"].shape[0] == 4 and batch["desirable"].tolist() == [True, False, True, False]


def test_at_step_zero_the_rewards_and_kl_are_exactly_zero(tmp_path) -> None:
    metrics = trainer_for(lora_policy(), tmp_path, evaluation=kto_examples(16, seed=1)).evaluate()
    assert metrics["eval_rewards/chosen"] == 0.0 and metrics["eval_rewards/rejected"] == 0.0
    assert metrics["eval_kl"] == 0.0
    assert metrics["eval_loss"] == pytest.approx(0.5, abs=1e-6)  # 1 − σ(0)


def test_kto_lowers_its_loss_and_separates_desirable_from_undesirable(tmp_path) -> None:
    train, held_out = Dataset.from_list(kto_examples(64, seed=0)), Dataset.from_list(kto_examples(32, seed=1))
    trainer = trainer_for(lora_policy(), tmp_path, train=train, evaluation=held_out, beta=2.0)
    trainer.train()
    logged = trainer.state.log_history[-2]
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "kl"} <= set(logged)
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] < 0.5 * 0.5, metrics  # 0.5 at step zero
    assert metrics["eval_rewards/margins"] > 0, metrics
    assert metrics["eval_rewards/accuracies"] >= 0.8, metrics  # chance is 0.5


def test_loss_rewards_and_kl_equal_trl_on_the_same_adapter_and_batch(tmp_path) -> None:
    config = trl.KTOConfig(
        output_dir=str(tmp_path / "trl"),
        beta=0.5,
        desirable_weight=1.5,
        undesirable_weight=0.5,
        report_to=[],
        use_cpu=True,
        per_device_train_batch_size=4,
    )
    placeholder = {"prompt": "t1", "completion": " t2", "label": True}
    reference, model = trl_beside_deltatune(trl.KTOTrainer, config, placeholder, tmp_path)
    completions = [c for _, c, _ in ROWS]
    trl_rows = [
        {"prompt_ids": p, "completion_ids": c, "KL_completion_ids": kl, "label": good}
        for (p, c, good), kl in zip(ROWS, completions[-1:] + completions[:-1])
    ]  # TRL's own pairing: each row gets the previous row's completion
    trl_loss = reference.compute_loss(reference.model, reference.data_collator(trl_rows))
    trl_metrics = {key: values[-1] for key, values in reference._metrics["train"].items()}

    trainer = trainer_for(model, tmp_path, beta=0.5, desirable_weight=1.5, undesirable_weight=0.5)
    loss = trainer.compute_loss(model, trainer.data_collator(ours(ROWS)))
    trainer.log({"loss": loss.item()})
    logged = trainer.state.log_history[-1]

    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-5)
    assert logged["kl"] == pytest.approx(trl_metrics["kl"], abs=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert logged[key] == pytest.approx(trl_metrics[key], abs=1e-5), key
    assert abs(logged["rewards/margins"]) > 1e-3  # the adapter moved the policy away from the reference


def test_refuses_batches_too_small_for_the_kl_estimate_and_bad_weights(tmp_path) -> None:
    with pytest.raises(ConfigError, match="per_device_train_batch_size=1 must be at least 2"):
        trainer_for(lora_policy(), tmp_path, args={"per_device_train_batch_size": 1})
    with pytest.raises(ConfigError, match="desirable_weight=0 must be positive"):
        trainer_for(lora_policy(), tmp_path, desirable_weight=0)
