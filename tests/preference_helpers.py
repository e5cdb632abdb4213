"""A tiny synthetic preference task for the DPO and KTO tests, and the pieces to run TRL beside us.

The task: after any prompt, the desirable completion is the token pattern 1 2 3 4 in that order;
the undesirable one is the same four tokens in another order. The unigram content is identical,
so only order separates them: a model must learn the pattern, not a token frequency.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import peft
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast, TrainingArguments

from deltatune import DeltaModel, LoraConfig, get_delta_model
from tiny_models import VOCAB, tiny_llama

PATTERN = [1, 2, 3, 4]
SHUFFLED = [list(order) for order in itertools.permutations(PATTERN) if list(order) != PATTERN]
PAD = 0
LORA = {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"}


def preference_triples(n: int, seed: int) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen, rejected) token lists: a 3-token random prompt, the pattern, a shuffle of it."""
    rng = random.Random(seed)
    return [([rng.randrange(10, VOCAB) for _ in range(3)], PATTERN, rng.choice(SHUFFLED)) for _ in range(n)]


def tokenised(prompt: list[int], completion: list[int]) -> dict[str, list[int]]:
    return {"input_ids": prompt + completion, "labels": [-100] * len(prompt) + completion}


def dpo_examples(n: int, seed: int) -> list[dict[str, list[int]]]:
    """deltatune's tokenised DPO examples of ``preference_triples(n, seed)``."""
    examples = []
    for prompt, chosen, rejected in preference_triples(n, seed):
        chosen_row, rejected_row = tokenised(prompt, chosen), tokenised(prompt, rejected)
        examples.append(
            {
                f"{side}_{key}": row[key]
                for side, row in (("chosen", chosen_row), ("rejected", rejected_row))
                for key in ("input_ids", "labels")
            }
        )
    return examples


def kto_examples(n: int, seed: int) -> list[dict]:
    """deltatune's tokenised KTO examples: even rows desirable (the pattern), odd rows undesirable."""
    return [
        {**tokenised(prompt, chosen if i % 2 == 0 else rejected), "label": i % 2 == 0}
        for i, (prompt, chosen, rejected) in enumerate(preference_triples(n, seed))
    ]


def lora_policy(seed: int = 0, **lora: object) -> DeltaModel:
    """A tiny Llama with a fresh LoRA adapter (B = 0: the policy starts equal to the reference)."""
    torch.manual_seed(seed)
    return get_delta_model(tiny_llama(), LoraConfig(**{**LORA, **lora}))


def perturb_lora(model: torch.nn.Module, seed: int = 3) -> None:
    """Add seeded noise to every LoRA weight (peft's or deltatune's), so the policy leaves the reference."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_" in name:
                param.add_(0.5 * torch.randn(param.shape, generator=generator))


def trl_beside_deltatune(
    trainer_class: type, config: object, placeholder: dict, tmp_path: Path
) -> tuple[object, DeltaModel]:
    """A TRL trainer that adds a LoRA adapter to a tiny Llama itself (so its reference is the model with
    the adapter disabled, as ours), that adapter perturbed, and the same adapter loaded in deltatune from
    peft's files. Both models are in train mode. ``placeholder``: one data row, since TRL wants a data set."""
    trl_trainer = trainer_class(
        model=tiny_llama(),
        args=config,
        train_dataset=Dataset.from_list([placeholder]),
        processing_class=word_tokenizer(),
        peft_config=peft.LoraConfig(**LORA),
    )
    perturb_lora(trl_trainer.model)
    trl_trainer.model.save_pretrained(tmp_path / "adapter")
    model = DeltaModel.from_pretrained(tiny_llama(), tmp_path / "adapter", is_trainable=True)
    trl_trainer.model.train(), model.train()
    return trl_trainer, model


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer over the tiny vocabulary (token i is the word "t<i>"), for trainers that want one."""
    vocab = {f"t{i}": i for i in range(VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="t5"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=f"t{PAD}", eos_token="t0", unk_token="t5")


def training_args(output_dir: Path, **overrides: object) -> TrainingArguments:
    """Quiet CPU arguments: no saving, no reporting, a fixed seed."""
    values = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 16,
        "learning_rate": 1e-2,
        "max_steps": 30,
        "logging_steps": 10,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "seed": 0,
        "lr_scheduler_type": "constant",
        "disable_tqdm": True,
    }
    return TrainingArguments(**{**values, **overrides})
