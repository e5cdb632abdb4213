"""A tiny chat model on disk and tiny JSONL data, for end-to-end runs of ``deltatune train`` and friends."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from deltatune.runtime.assets import smollm2_path


def save_tiny_chat_model(folder: Path) -> Path:
    """A 2-layer Llama (hidden 32) with the embedded SmolLM2 tokenizer and chat template, saved to ``folder``."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path(), local_files_only=True)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.generation_config.max_length = None
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_arithmetic_jsonl(path: Path, n: int = 40) -> Path:
    """``n`` prompt/completion rows: "What is i plus i?" -> "It is 2i."."""
    rows = [{"prompt": f"What is {i} plus {i}?", "completion": f"It is {2 * i}."} for i in range(n)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# Keys shared by the end-to-end runs: a few steps on the tiny model, small batches, short examples.
TINY_RUN = {
    "max_steps": 4,
    "batch_size": 4,
    "max_length": 48,
    "eval_examples": 4,
    "eval_fraction": 0.2,
    "learning_rate": 1e-2,
    "warmup_steps": 0,
    "logging_steps": 1,
    "r": 4,
}
