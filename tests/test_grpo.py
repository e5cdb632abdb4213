"""GRPOTrainer on a tiny chat model (the embedded tokenizer): the reward rises, the loss is ``policy_loss`` on the
generation it sampled, the reference is the adapter switched off, generations are reused as configured, reward
functions see TRL's arguments (chat completions as messages), and bad settings stop in one line."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM, TrainingArguments

import deltatune
from deltatune.data.formats import normalise
from deltatune.data.readers import Table
from deltatune.errors import ConfigError
from deltatune.train.grpo import GRPOTrainer, RepeatBatchSampler, encode_prompts
from deltatune.train.grpo_settings import GRPOSettings
from deltatune.train.policy_loss import policy_loss
from deltatune.train.rewards import NamedReward
from sft_helpers import save_tiny_chat_model

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    return save_tiny_chat_model(tmp_path_factory.mktemp("grpo_model"))


@pytest.fixture(scope="module")
def tokenizer(chat_model_dir):
    return AutoTokenizer.from_pretrained(chat_model_dir)


def adapted(folder) -> deltatune.DeltaModel:
    torch.manual_seed(0)
    base = LlamaForCausalLM.from_pretrained(folder)
    return deltatune.get_delta_model(base, deltatune.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))


def prompt_records(rows: list[dict]) -> list:
    """``rows`` read as the data layer reads a file (the prompt-only format)."""
    return normalise(Table("prompts.jsonl", list(enumerate(rows, 1))))[1]


def liked_tokens(model, share: float = 0.2) -> set[int]:
    """The tokens whose embeddings point most along one token's: a reward the tiny model can learn."""
    embeddings = model.get_input_embeddings().weight.detach()
    alignment = embeddings @ embeddings[1000]
    return set((alignment > alignment.quantile(1 - share)).nonzero()[:, 0].tolist())


def trainer_for(model, tokenizer, tmp_path, reward, steps=1, batch=8, **settings) -> GRPOTrainer:
    rows = encode_prompts(
        tokenizer, prompt_records([{"prompt": f"Count {i}:", "n": i} for i in range(16)]), 32
    ).examples
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=batch,
        learning_rate=3e-2,
        max_steps=steps,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        lr_scheduler_type="constant",
        use_cpu=True,
        seed=0,
        gradient_accumulation_steps=settings.pop("accumulation", 1),
    )
    settings = {"num_generations": 4, "max_completion_length": 6, **settings}
    return GRPOTrainer(
        model,
        args,
        train_dataset=rows,
        rewards=[NamedReward("liked", reward)],
        settings=GRPOSettings(**settings),
        processing_class=tokenizer,
        eval_prompts=rows[:4],
    )


def share_reward(liked: set[int]):
    def reward(completion_ids, **kwargs):
        return [sum(token in liked for token in ids) / max(len(ids), 1) for ids in completion_ids]

    return reward


@pytest.mark.slow
def test_the_reward_rises_within_a_few_steps(chat_model_dir, tokenizer, tmp_path):
    model = adapted(chat_model_dir)
    trainer = trainer_for(model, tokenizer, tmp_path, share_reward(liked_tokens(model)), steps=10, batch=16)
    before = trainer.evaluate()["eval_reward"]
    trainer.train()
    rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.05
    assert trainer.evaluate()["eval_reward"] > before


def test_the_loss_is_policy_loss_on_the_sampled_generation(chat_model_dir, tokenizer, tmp_path):
    model = adapted(chat_model_dir)
    trainer = trainer_for(model, tokenizer, tmp_path, share_reward(liked_tokens(model)), loss_type="grpo")
    model.train()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert batch["completion_ids"].shape[0] == 8 and batch["advantages"].abs().sum() > 0
    loss = trainer.batch_loss(model, batch)
    logps = trainer.completion_logps(model, batch)
    expected = policy_loss(logps, batch["advantages"], batch["loss_mask"], loss_type="grpo", max_completion_length=6)
    torch.testing.assert_close(loss, expected.loss)
    with torch.no_grad():  # the log-probs are the model's at the sampling temperature, position by position
        ids = torch.cat([batch["prompt_ids"][:1], batch["completion_ids"][:1]], dim=1)
        mask = torch.cat([batch["prompt_mask"][:1], batch["completion_mask"][:1]], dim=1)
        keep = mask[0].bool()
        logits = model(input_ids=ids[:, keep]).logits[0]
        width = int(batch["prompt_mask"][0].sum())
        tokens = int(batch["completion_mask"][0].sum())
        direct = logits[width - 1 : width - 1 + tokens].log_softmax(-1)
        direct = direct.gather(-1, ids[0, keep][width : width + tokens, None])[:, 0]
    torch.testing.assert_close(logps[0, :tokens].detach(), direct, atol=1e-5, rtol=0)


def test_the_reference_is_the_model_with_its_adapter_off(chat_model_dir, tokenizer, tmp_path):
    model = adapted(chat_model_dir)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)  # the adapter moves the model
    trainer = trainer_for(model, tokenizer, tmp_path, share_reward(liked_tokens(model)), beta=0.04)
    model.train()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    plain = LlamaForCausalLM.from_pretrained(chat_model_dir)
    with torch.no_grad():
        expected = trainer.completion_logps(plain, batch)
        policy = trainer.completion_logps(model, batch)
    torch.testing.assert_close(batch["ref_logps"], expected, atol=1e-5, rtol=0)
    assert (policy - expected).abs().max() > 1e-2
    trainer.batch_loss(model, batch)
    assert trainer._metrics["train"]["kl"][-1] > 0


def test_a_generation_serves_its_micro_steps_and_iterations(chat_model_dir, tokenizer, tmp_path):
    model = adapted(chat_model_dir)
    trainer = trainer_for(
        model, tokenizer, tmp_path, share_reward(liked_tokens(model)), accumulation=2, num_iterations=2, batch=4
    )
    model.train()
    calls = []
    generate = trainer._generate_and_score
    trainer._generate_and_score = lambda rows: calls.append(len(rows)) or generate(rows)
    prompts = iter(trainer.get_train_dataloader())
    batches = [trainer._prepare_inputs(next(prompts)) for _ in range(4)]
    assert calls == [2]  # 2 micro-steps x 2 iterations from one generation of 2 prompts x 4 completions
    assert all("old_logps" in b and len(b["advantages"]) == 4 for b in batches)
    torch.testing.assert_close(batches[0]["completion_ids"], batches[2]["completion_ids"])
    trainer._prepare_inputs(next(prompts))
    assert calls == [2, 2]


def test_sampling_under_gradient_checkpointing_keeps_the_cache_and_training_mode(chat_model_dir, tokenizer, tmp_path):
    model = adapted(chat_model_dir)
    model.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainer = trainer_for(model, tokenizer, tmp_path, share_reward(liked_tokens(model)))
    model.train()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert model.training and batch["completion_ids"].shape[1] == 6
    trainer.batch_loss(model, batch).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


def test_chat_prompts_give_reward_functions_messages_and_every_column(chat_model_dir, tokenizer, tmp_path):
    seen = {}

    def reward(prompts, completions, completion_ids, topic, **kwargs):
        seen.update(prompts=prompts, completions=completions, topic=topic)
        return [None if i % 2 else 1.0 for i in range(len(completions))]

    data = [{"prompt": [{"role": "user", "content": f"Hi {i}"}], "topic": f"t{i}"} for i in range(4)]
    encoded = encode_prompts(tokenizer, prompt_records(data), 64)
    rows = encoded.examples
    assert encoded.n_truncated == 0
    assert rows[0]["prompt_input_ids"][-3:] == tokenizer("<|im_start|>assistant\n")["input_ids"][-3:]
    model = adapted(chat_model_dir)
    trainer = trainer_for(model, tokenizer, tmp_path, reward)
    trainer.train_dataset = rows
    model.train()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert seen["completions"][0][0]["role"] == "assistant" and isinstance(seen["completions"][0][0]["content"], str)
    first = next(row for row in rows if row["prompt"] == seen["prompts"][0])  # prompts come shuffled
    assert seen["prompts"][:4] == [first["prompt"]] * 4 and seen["topic"][:4] == [first["columns"]["topic"]] * 4
    assert batch["advantages"].abs().sum() == 0  # every scored completion got the same reward


def test_long_prompts_are_cut_from_the_left_and_counted(tokenizer):
    encoded = encode_prompts(
        tokenizer, prompt_records([{"prompt": "one two three four five six"}, {"prompt": "hi"}]), 3
    )
    full = tokenizer("one two three four five six", add_special_tokens=False)["input_ids"]
    rows = encoded.examples
    assert encoded.n_truncated == 1 and encoded.reasons == {"prompt cut from the left": 1}
    assert rows[0]["prompt_input_ids"] == full[-3:] and len(rows[1]["prompt_input_ids"]) <= 3


def test_repeat_sampler_yields_each_batch_for_every_step_it_serves_and_reshuffles_each_epoch():
    sampler = RepeatBatchSampler(count=10, size=3, repeat=2, seed=0)
    first = list(sampler)
    assert len(first) == len(sampler) == 6 and first[0] == first[1] and first[2] == first[3]
    assert len({i for batch in first for i in batch}) == 9
    assert list(sampler) != first


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"num_generations": 1}, "at least 2 completions"),
        ({"loss_type": "ppo"}, "loss_type='ppo' is unknown"),
        ({"scale_rewards": "rank"}, "scale_rewards='rank' is unknown"),
        ({"temperature": 0.0}, "temperature=0.0 must be above 0"),
        ({"max_completion_length": 0}, "max_completion_length=0"),
    ],
)
def test_bad_settings_stop_in_one_line(settings, message):
    with pytest.raises(ConfigError, match=message):
        GRPOSettings(**settings)


def test_a_batch_that_does_not_form_groups_is_refused(chat_model_dir, tokenizer, tmp_path):
    model = adapted(chat_model_dir)
    with pytest.raises(ConfigError, match="do not form groups of num_generations=4"):
        trainer_for(model, tokenizer, tmp_path, share_reward(set()), batch=6)
