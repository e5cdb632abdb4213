"""A short real run of each prompt method on the embedded SmolLM2-135M-Instruct: five AdamW steps on
four chatterbot Q/A pairs lower the loss on four held-out pairs (answer tokens only).

Plain "Question: ... Answer: ..." text keeps the sequences short (<= 24 tokens), so the three
runs take about half a minute on one CPU thread.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import deltatune
from deltatune.runtime.assets import chatterbot_pairs

pytestmark = pytest.mark.slow

STEPS = 5


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, local_files_only=True).eval()
    return model, AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)


def qa_batches(tokenizer) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(train, held-out) batches of four short pairs each, right-padded, labels on the answer only."""
    examples = []
    for pair in chatterbot_pairs():
        prompt = tokenizer(f"Question: {pair.question}\nAnswer:")["input_ids"]
        full = tokenizer(f"Question: {pair.question}\nAnswer: {pair.answer}{tokenizer.eos_token}")["input_ids"]
        if len(full) <= 24:
            examples.append((full, [-100] * len(prompt) + full[len(prompt) :]))

    def collate(chosen):
        width = max(len(ids) for ids, _ in chosen)
        return {
            "input_ids": torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in chosen]),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in chosen]),
            "labels": torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in chosen]),
        }

    return collate(examples[0:64:16]), collate(examples[3:64:16])


def method_config(method: str, tokenizer_path: str) -> deltatune.DeltaConfig:
    if method == "prompt_tuning":
        return deltatune.PromptTuningConfig(
            num_virtual_tokens=8,
            task_type="CAUSAL_LM",
            prompt_tuning_init="TEXT",
            prompt_tuning_init_text="Answer the question in one short sentence.",
            tokenizer_name_or_path=tokenizer_path,
        )
    if method == "p_tuning":
        return deltatune.PromptEncoderConfig(num_virtual_tokens=8, task_type="CAUSAL_LM", encoder_hidden_size=128)
    return deltatune.PrefixTuningConfig(num_virtual_tokens=8, task_type="CAUSAL_LM")


@pytest.mark.parametrize("method,lr", [("prompt_tuning", 5e-2), ("p_tuning", 3e-3), ("prefix_tuning", 3e-2)])
def test_a_few_steps_lower_the_heldout_loss(smollm2, smollm2_dir, method, lr):
    base, tokenizer = smollm2
    train, heldout = qa_batches(tokenizer)
    torch.manual_seed(0)
    model = deltatune.get_delta_model(base, method_config(method, str(smollm2_dir)))
    try:
        with torch.no_grad():
            before = model(**heldout).loss.item()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        model.train()
        for _ in range(STEPS):
            optimizer.zero_grad(set_to_none=True)
            model(**train).loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            after = model(**heldout).loss.item()
    finally:
        model.unload()  # the module's base model is shared by the three runs
    assert after < before, (before, after)
