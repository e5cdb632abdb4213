"""Shared cases for the prompt-method tests: tiny models, method configs that mean the same in peft and
deltatune, inputs with padding, and the helpers that build, perturb and compare both libraries' models.

Every method runs on llama (4 heads over 2 key/value heads), qwen2 (the same with q/k/v biases),
gpt2 (Conv1D, learned positions) and bert (bidirectional encoder; SEQ_CLS and FEATURE_EXTRACTION).
peft is the oracle; it is a test-only dependency.
"""

from __future__ import annotations

import functools
import tempfile
from dataclasses import dataclass
from typing import Any

import peft
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import (
    BertConfig,
    BertModel,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import deltatune
from tiny_models import DECODER_SIZES, VOCAB, _seeded, tiny_bert, tiny_gpt2, tiny_llama

N_VIRTUAL = 4
INIT_TEXT = "classify the sentiment of this review"


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    """Qwen2: vocab 128, hidden 32, 2 layers, 4 heads over 2 key/value heads (GQA), q/k/v biases."""
    config = Qwen2Config(**DECODER_SIZES)
    return _seeded(lambda: Qwen2ForCausalLM(config), seed)


def tiny_bert_features(seed: int = 0) -> BertModel:
    """A bare BertModel (FEATURE_EXTRACTION), the same sizes as ``tiny_models.tiny_bert``."""
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        initializer_range=0.2,
        attn_implementation="eager",
    )
    return _seeded(lambda: BertModel(config), seed)


def trainable_llama(seed: int = 0) -> LlamaForCausalLM:
    """``tiny_llama`` with weights drawn at std 0.2: behind transformers' std 0.02 the logits stay so
    close to zero that no prompt can lower the loss much in a few steps."""
    config = tiny_llama().config
    config.initializer_range = 0.2
    return _seeded(lambda: LlamaForCausalLM(config), seed)


@dataclass(frozen=True)
class ModelKind:
    build: Any
    task_type: str
    output: str  # the output compared across libraries


MODELS = {
    "llama": ModelKind(tiny_llama, "CAUSAL_LM", "logits"),
    "qwen2": ModelKind(tiny_qwen2, "CAUSAL_LM", "logits"),
    "gpt2": ModelKind(tiny_gpt2, "CAUSAL_LM", "logits"),
    "llama_train": ModelKind(trainable_llama, "CAUSAL_LM", "logits"),
    "bert": ModelKind(tiny_bert, "SEQ_CLS", "logits"),
    "bert_features": ModelKind(tiny_bert_features, "FEATURE_EXTRACTION", "last_hidden_state"),
}


@functools.cache
def tokenizer_dir() -> str:
    """A word-level tokenizer whose ids fit the tiny vocabulary, saved once to a temporary folder."""
    words = ["[UNK]", "[PAD]", *INIT_TEXT.split(), "answer", "question"]
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = tempfile.mkdtemp(prefix="deltatune-tokenizer-")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(folder)
    return folder


def method_kwargs(method: str) -> tuple[str, dict[str, Any]]:
    """(config class name, keyword arguments) of ``method``, the same in peft and deltatune."""
    methods = {
        "prompt_random": ("PromptTuningConfig", {}),
        "prompt_sample_vocab": ("PromptTuningConfig", {"prompt_tuning_init": "SAMPLE_VOCAB"}),
        "prompt_text": (
            "PromptTuningConfig",
            {
                "prompt_tuning_init": "TEXT",
                "prompt_tuning_init_text": INIT_TEXT,
                "tokenizer_name_or_path": tokenizer_dir(),
            },
        ),
        "ptuning_mlp": ("PromptEncoderConfig", {"encoder_hidden_size": 24}),
        "ptuning_lstm": ("PromptEncoderConfig", {"encoder_reparameterization_type": "LSTM", "encoder_hidden_size": 12}),
        "prefix": ("PrefixTuningConfig", {}),
        "prefix_projection": ("PrefixTuningConfig", {"prefix_projection": True, "encoder_hidden_size": 20}),
    }
    return methods[method]


METHODS = [
    "prompt_random",
    "prompt_sample_vocab",
    "prompt_text",
    "ptuning_mlp",
    "ptuning_lstm",
    "prefix",
    "prefix_projection",
]
VIRTUAL_TOKEN_METHODS = [m for m in METHODS if not m.startswith("prefix")]


def config(library, method: str, kind: str, **overrides: Any):
    """The config of ``method`` for model ``kind`` from ``library`` (the ``peft`` or ``deltatune`` module)."""
    name, kwargs = method_kwargs(method)
    kwargs = {"num_virtual_tokens": N_VIRTUAL, "task_type": MODELS[kind].task_type, **kwargs, **overrides}
    return getattr(library, name)(**kwargs)


def delta_model(method: str, kind: str, seed: int = 0, **overrides: Any) -> deltatune.DeltaModel:
    """deltatune's model, adapter weights drawn under ``seed``."""
    return _seeded(
        lambda: deltatune.get_delta_model(MODELS[kind].build(), config(deltatune, method, kind, **overrides)), seed
    )


def peft_model(method: str, kind: str, seed: int = 0) -> nn.Module:
    """peft's model for the same method, adapter weights drawn under ``seed``."""
    return _seeded(lambda: peft.get_peft_model(MODELS[kind].build(), config(peft, method, kind)), seed)


def batch(length: int = 7) -> dict[str, torch.Tensor]:
    """Two rows of ids; the second is right-padded by 2, so the mask extension is exercised."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB, (2, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def outputs(model: nn.Module, kind: str, cut: int = 0, labels: bool = False) -> dict[str, torch.Tensor]:
    """The compared output (first ``cut`` virtual positions removed: peft keeps them) and, for a causal LM, the loss."""
    inputs = batch()
    if labels and MODELS[kind].task_type == "CAUSAL_LM":
        inputs["labels"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad():
        result = model(**inputs)
    value = result[MODELS[kind].output]
    found = {"output": value[:, cut:] if value.ndim == 3 else value}
    if "labels" in inputs:
        found["loss"] = result.loss
    return found
