"""DPOTrainer: the reference is the model with its adapter off (no copy is made), it learns a
synthetic preference, and its loss and rewards equal TRL's on the same model and batch."""

from __future__ import annotations

import dataclasses
import gc
import math

import pytest
import torch
import trl
from datasets import Dataset
from transformers import AutoTokenizer
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from deltatune import get_delta_model
from deltatune.data.chatterbot import chatterbot_preference_pairs
from deltatune.errors import ConfigError
from deltatune.train.losses import sequence_logprob
from deltatune.train.preference import DPOTrainer
from deltatune.train.preference_data import PreferenceCollator, encode_preference_pairs
from deltatune.tuners import config_classes
from preference_helpers import (
    PAD,
    dpo_examples,
    lora_policy,
    perturb_lora,
    training_args,
    trl_beside_deltatune,
)
from tiny_models import tiny_llama

# prompts and completions of different lengths, so that padding is exercised
TRIPLES = [([11, 12, 13], [1, 2, 3, 4], [2, 1]), ([20, 21], [5], [6, 7, 8]), ([30], [9, 10, 40], [41, 42, 43, 44, 45])]


def trainer_for(model, tmp_path, train=None, evaluation=None, args=None, **kwargs) -> DPOTrainer:
    arguments = training_args(tmp_path, **(args or {}))
    return DPOTrainer(model, arguments, train_dataset=train, eval_dataset=evaluation, pad_token_id=PAD, **kwargs)


def ours(triples) -> list[dict[str, list[int]]]:
    return [
        {
            "chosen_input_ids": p + c,
            "chosen_labels": [-100] * len(p) + c,
            "rejected_input_ids": p + r,
            "rejected_labels": [-100] * len(p) + r,
        }
        for p, c, r in triples
    ]


def test_collator_stacks_the_chosen_rows_over_the_rejected_rows() -> None:
    batch = PreferenceCollator(pad_token_id=0)(ours(TRIPLES[:2]))
    assert batch["input_ids"].tolist() == [
        [11, 12, 13, 1, 2, 3, 4],
        [20, 21, 5, 0, 0, 0, 0],
        [11, 12, 13, 2, 1, 0, 0],
        [20, 21, 6, 7, 8, 0, 0],
    ]
    assert batch["labels"][1].tolist() == [-100, -100, 5, -100, -100, -100, -100]
    assert batch["attention_mask"][2].tolist() == [1, 1, 1, 1, 1, 0, 0]


def test_chat_encoding_labels_only_each_answer_after_a_shared_prompt(smollm2_dir) -> None:
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)
    pairs = chatterbot_preference_pairs()[:6]
    encoded = encode_preference_pairs(tokenizer, pairs, max_length=512)
    assert (encoded.n_truncated, encoded.n_dropped, len(encoded.examples)) == (0, 0, 6)
    for pair, example in zip(pairs, encoded.examples):
        prompts = []
        for side, messages in (("chosen", pair.chosen), ("rejected", pair.rejected)):
            ids, labels = example[f"{side}_input_ids"], example[f"{side}_labels"]
            start = next(i for i, label in enumerate(labels) if label != -100)
            assert labels[start:] == ids[start:]
            assert tokenizer.decode(ids[start:]) == messages[0].content + tokenizer.eos_token
            prompts.append(ids[:start])
        assert prompts[0] == prompts[1] and pair.prompt[0].content in tokenizer.decode(prompts[0])
    # SmolLM2's default system prompt and the question take 34 tokens (35 for the last pair): at 35,
    # every pair is cut, and keeps its rows: the prompt loses its start, the answers keep theirs
    cut = encode_preference_pairs(tokenizer, pairs, max_length=35)
    assert (cut.n_truncated, cut.n_dropped, len(cut.examples)) == (6, 0, 6)
    assert all(max(len(e["chosen_input_ids"]), len(e["rejected_input_ids"])) == 35 for e in cut.examples)
    for pair, example in zip(pairs, cut.examples):
        kept = pair.prompt[-1].content + "<|im_end|>\n<|im_start|>assistant\n" + pair.chosen[0].content[:3]
        assert kept in tokenizer.decode(example["chosen_input_ids"])


def test_at_step_zero_the_rewards_are_exactly_zero(tmp_path) -> None:
    metrics = trainer_for(lora_policy(), tmp_path, evaluation=dpo_examples(16, seed=1)).evaluate()
    assert metrics["eval_rewards/chosen"] == 0.0 and metrics["eval_rewards/rejected"] == 0.0
    assert metrics["eval_rewards/margins"] == 0.0 and metrics["eval_rewards/accuracies"] == 0.0
    assert metrics["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_the_reference_is_the_base_model_with_the_adapter_disabled(tmp_path) -> None:
    model = lora_policy()
    perturb_lora(model)
    examples = ours(TRIPLES[:1])
    metrics = trainer_for(model, tmp_path, evaluation=examples, beta=0.5).evaluate()
    batch = PreferenceCollator(PAD)(examples)
    with torch.no_grad():
        policy = sequence_logprob(model(input_ids=batch["input_ids"]).logits, batch["labels"])
        base = sequence_logprob(tiny_llama()(input_ids=batch["input_ids"]).logits, batch["labels"])  # a separate copy
    expected = 0.5 * (policy - base)
    assert expected.abs().min() > 1e-3  # the adapter does change the log-probs
    assert metrics["eval_rewards/chosen"] == pytest.approx(expected[0].item(), abs=1e-5)
    assert metrics["eval_rewards/rejected"] == pytest.approx(expected[1].item(), abs=1e-5)


@pytest.mark.parametrize("config_class", config_classes(), ids=lambda cls: cls.__name__)
def test_every_method_trains_against_its_own_disabled_adapter(tmp_path, config_class) -> None:
    fields = {field.name for field in dataclasses.fields(config_class)}
    torch.manual_seed(0)
    options = {"num_virtual_tokens": 4} if "num_virtual_tokens" in fields else {}
    if config_class.peft_type == "ADALORA":  # its singular values start at 0: three steps barely move it
        options["init_lora_weights"] = False
    config = config_class(**options)
    model = get_delta_model(tiny_llama(), config)
    trainer = trainer_for(model, tmp_path, train=dpo_examples(16, seed=2), args={"max_steps": 3}, beta=0.5)
    trainer.train()
    examples = ours(TRIPLES[:1])
    metrics = trainer.evaluate(eval_dataset=examples)
    batch = PreferenceCollator(PAD)(examples)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        policy = sequence_logprob(model(**inputs).logits, batch["labels"])
        base = sequence_logprob(tiny_llama()(**inputs).logits, batch["labels"])  # a separate copy
    expected = 0.5 * (policy - base)
    assert expected.abs().min() > 1e-4  # three steps moved the policy away from the base
    assert metrics["eval_rewards/chosen"] == pytest.approx(expected[0].item(), abs=1e-5)
    assert metrics["eval_rewards/rejected"] == pytest.approx(expected[1].item(), abs=1e-5)


def test_training_makes_no_copy_of_the_model(tmp_path) -> None:
    model = lora_policy()
    own_layers = {id(module) for module in model.modules() if isinstance(module, LlamaDecoderLayer)}
    ran: set[int] = set()
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, output: ran.add(id(module)) if isinstance(module, LlamaDecoderLayer) else None
    )
    gc.collect()
    alive_before = sum(isinstance(obj, LlamaDecoderLayer) for obj in gc.get_objects())
    try:
        trainer = trainer_for(model, tmp_path, train=dpo_examples(16, seed=2), args={"max_steps": 2})
        trainer.train()
        gc.collect()
        alive_after = sum(isinstance(obj, LlamaDecoderLayer) for obj in gc.get_objects())
    finally:
        hook.remove()
    assert alive_after == alive_before  # the trainer holds no second model
    assert ran == own_layers  # every forward pass, the reference's included, ran through the model's own layers


def test_dpo_lowers_its_loss_and_prefers_the_pattern_on_held_out_pairs(tmp_path) -> None:
    train, held_out = Dataset.from_list(dpo_examples(64, seed=0)), Dataset.from_list(dpo_examples(32, seed=1))
    trainer = trainer_for(lora_policy(), tmp_path, train=train, evaluation=held_out, beta=0.5)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    logged = trainer.state.log_history[-2]
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= set(logged)
    assert losses[-1] < 0.5 * math.log(2), losses
    metrics = trainer.evaluate()
    assert metrics["eval_rewards/accuracies"] >= 0.9, metrics  # chance is 0.5
    assert metrics["eval_rewards/margins"] > 0


def test_gradient_accumulation_gives_the_full_batch_step(tmp_path) -> None:
    steps = []
    for batch_size, accumulation in ((8, 1), (4, 2)):
        model = lora_policy()
        perturb_lora(model)
        args = {
            "max_steps": 1,
            "logging_steps": 1,
            "per_device_train_batch_size": batch_size,
            "gradient_accumulation_steps": accumulation,
            "max_grad_norm": 1e9,
        }
        trainer = trainer_for(model, tmp_path, train=dpo_examples(8, seed=0), args=args)
        trainer.train()
        steps.append((trainer.state.log_history[0]["loss"], trainer.state.log_history[0]["grad_norm"]))
    assert steps[1] == pytest.approx(steps[0], rel=1e-5)


def test_ipo_lowers_its_loss(tmp_path) -> None:
    trainer = trainer_for(lora_policy(), tmp_path, train=dpo_examples(64, seed=0), beta=0.5, loss_type="ipo")
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_loss_and_rewards_equal_trl_on_the_same_adapter_and_batch(tmp_path, loss_type) -> None:
    config = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"), beta=0.5, loss_type=[loss_type], report_to=[], use_cpu=True
    )
    placeholder = {"prompt": "t1", "chosen": " t2", "rejected": " t3"}
    reference, model = trl_beside_deltatune(trl.DPOTrainer, config, placeholder, tmp_path)
    trl_batch = reference.data_collator([{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in TRIPLES])
    trl_loss = reference.compute_loss(reference.model, trl_batch)
    trl_metrics = {key: values[-1] for key, values in reference._metrics["train"].items()}

    trainer = trainer_for(model, tmp_path, beta=0.5, loss_type=loss_type)
    loss = trainer.compute_loss(model, trainer.data_collator(ours(TRIPLES)))
    trainer.log({"loss": loss.item()})
    logged = trainer.state.log_history[-1]

    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        assert logged[key] == pytest.approx(trl_metrics[key], abs=1e-5), key
    assert abs(logged["rewards/margins"]) > 1e-3  # the adapter moved the policy away from the reference


def test_refuses_a_model_without_an_adapter_to_disable(tmp_path) -> None:
    with pytest.raises(ConfigError, match="needs a DeltaModel"):
        trainer_for(tiny_llama(), tmp_path)
    with pytest.raises(ConfigError, match="beta=-1 must be positive"):
        trainer_for(lora_policy(), tmp_path, beta=-1)
