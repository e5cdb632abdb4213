"""Tiny, seeded, deterministic models for tests that must not touch the network.

Every factory builds its model from a config (never ``from_pretrained``) under a fixed seed, in
eval mode with dropout off, so two calls return bit-identical models and a forward pass is
deterministic; ``inputs_for(kind)`` gives matching inputs. ``SCENARIOS`` are LoRA configs that
mean the same in peft and deltatune, with builders for both libraries (peft is a test-only oracle).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

import deltatune

VOCAB = 128
SEED = 0


def _seeded(make, seed: int = SEED):
    """``make()`` under ``seed``, in eval mode; the global RNG state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make()
    return model.eval()


# The tiny decoders' sizes (Llama, Qwen2): vocab 128, hidden 32, 2 layers, 4 heads over 2 kv heads, intermediate 64.
DECODER_SIZES = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    max_position_embeddings=64,
    attn_implementation="eager",
)


def tiny_llama(seed: int = SEED, tied: bool = False) -> LlamaForCausalLM:
    """Llama at ``DECODER_SIZES``, its head untied from the embeddings unless ``tied``."""
    config = LlamaConfig(**DECODER_SIZES, tie_word_embeddings=tied)
    return _seeded(lambda: LlamaForCausalLM(config), seed)


def tiny_gpt2(seed: int = SEED) -> GPT2LMHeadModel:
    """GPT-2 (``Conv1D`` projections with biases): vocab 128, n_embd 32, 2 layers, 4 heads."""
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation="eager",
    )
    return _seeded(lambda: GPT2LMHeadModel(config), seed)


def tiny_bert(seed: int = SEED) -> BertForSequenceClassification:
    """BERT for sequence classification (3 labels, head named ``classifier``)."""
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
        initializer_range=0.2,  # BERT's 0.02 makes logits so small that an adapter barely moves them
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )
    return _seeded(lambda: BertForSequenceClassification(config), seed)


class ToyConvNet(nn.Module):
    """A 3x3 conv (stride 2, padding 1), a 1x1 conv and a linear head; input [batch, 3, 8, 8]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv3 = nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1)
        self.conv1 = nn.Conv2d(8, 6, kernel_size=1)
        self.head = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv3(x))
        x = torch.relu(self.conv1(x))
        return self.head(x.flatten(1))


def toy_conv(seed: int = SEED) -> ToyConvNet:
    return _seeded(ToyConvNet, seed)


def token_inputs(batch: int = 2, length: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random token ids (no padding) for the text models."""
    generator = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, VOCAB, (batch, length), generator=generator)}


def image_inputs(batch: int = 2, seed: int = 1) -> torch.Tensor:
    """A random image batch for ``ToyConvNet``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 8, 8, generator=generator)


FACTORIES = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert, "conv": toy_conv}


def build(kind: str, seed: int = SEED) -> nn.Module:
    """The tiny model of ``kind`` ("llama", "gpt2", "bert" or "conv")."""
    return FACTORIES[kind](seed)


def inputs_for(kind: str) -> dict[str, torch.Tensor]:
    """Keyword inputs for ``build(kind)``."""
    return {"x": image_inputs()} if kind == "conv" else token_inputs()


def output_tensor(output) -> torch.Tensor:
    """The logits of a transformers output, or the tensor a plain module returns."""
    return output if isinstance(output, torch.Tensor) else output.logits


# -- adapter scenarios shared by the peft parity and file tests -------------------------------
# lora_alpha differs from r where it is free to, so that a scaling mistake cannot hide behind 1.0.

LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Scenario:
    """One tiny model plus LoraConfig keyword arguments that mean the same in peft and deltatune."""

    kind: str
    lora: dict[str, Any]
    adapter: str = "default"

    def config_kwargs(self, **overrides: Any) -> dict[str, Any]:
        """A fresh copy of the kwargs: peft extends a SEQ_CLS ``modules_to_save`` list in place."""
        return {**copy.deepcopy(self.lora), **overrides}

    @property
    def plain(self) -> bool:
        """True when the save is a plain LoRA (no modules_to_save, no trained biases, no DoRA): what vLLM loads."""
        return (
            not self.lora.get("modules_to_save")
            and self.lora.get("bias", "none") == "none"
            and not self.lora.get("use_dora")
        )


SCENARIOS: dict[str, Scenario] = {
    "llama_linear": Scenario("llama", {"target_modules": LLAMA_LINEAR, "lora_alpha": 16}),
    "gpt2_conv1d": Scenario("gpt2", {"target_modules": ["c_attn", "c_proj", "c_fc"], "lora_alpha": 16}),
    "llama_embedding": Scenario("llama", {"target_modules": ["embed_tokens", "q_proj"], "lora_alpha": 4}),
    # r=6 exceeds conv3's 3 input channels: a Conv2d update is [out, in * kh * kw] = [8, 27].
    "conv2d": Scenario("conv", {"target_modules": ["conv3", "conv1"], "r": 6, "lora_alpha": 9}),
    "bert_query_value": Scenario("bert", {"target_modules": ["query", "value"], "lora_alpha": 32}),
    "non_default_name": Scenario("llama", {"target_modules": ["q_proj", "v_proj"]}, adapter="other"),
    "rank_alpha_pattern": Scenario(
        "llama",
        {
            "target_modules": ["q_proj", "v_proj", "o_proj"],
            "rank_pattern": {"q_proj": 4, r"layers\.1\.self_attn\.v_proj": 2},
            "alpha_pattern": {"o_proj": 32},
        },
    ),
    "rslora": Scenario("llama", {"target_modules": ["q_proj", "v_proj"], "r": 4, "lora_alpha": 16, "use_rslora": True}),
    "llama_lm_head": Scenario(
        "llama", {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"], "task_type": "CAUSAL_LM"}
    ),
    "bert_seq_cls": Scenario(
        "bert", {"target_modules": "all-linear", "task_type": "SEQ_CLS", "modules_to_save": ["classifier"]}
    ),
    "gpt2_bias_lora_only": Scenario("gpt2", {"target_modules": ["c_attn", "c_proj"], "bias": "lora_only"}),
    "gpt2_bias_all": Scenario("gpt2", {"target_modules": ["c_attn"], "bias": "all"}),
    "layers_to_transform": Scenario("llama", {"target_modules": ["q_proj", "gate_proj"], "layers_to_transform": [1]}),
    "layers_pattern": Scenario(
        "llama", {"target_modules": ["v_proj", "down_proj"], "layers_to_transform": 0, "layers_pattern": "layers"}
    ),
    "regex": Scenario("llama", {"target_modules": r"model\.layers\.1\.(self_attn\.(q|v)_proj|mlp\.up_proj)"}),
    "all_linear_llama": Scenario("llama", {"target_modules": "all-linear"}),
    "all_linear_gpt2": Scenario("gpt2", {"target_modules": "all-linear"}),
    "exclude_modules": Scenario("llama", {"target_modules": "all-linear", "exclude_modules": ["down_proj", "o_proj"]}),
    "dora_llama": Scenario(
        "llama", {"target_modules": [*LLAMA_LINEAR, "embed_tokens"], "lora_alpha": 16, "use_dora": True}
    ),
    "dora_gpt2_conv1d": Scenario("gpt2", {"target_modules": ["c_attn", "c_proj", "c_fc"], "use_dora": True, "r": 4}),
    "dora_modules_to_save": Scenario(
        "llama", {"target_modules": ["q_proj", "down_proj"], "use_dora": True, "modules_to_save": ["lm_head"]}
    ),
    "dora_rslora_pattern": Scenario(
        "llama",
        {"target_modules": ["q_proj", "v_proj"], "use_dora": True, "use_rslora": True, "rank_pattern": {"v_proj": 2}},
    ),
}


def peft_model(scenario: Scenario, seed: int = SEED, **overrides: Any):
    """peft's model for ``scenario`` (peft's own ``get_peft_model``), adapter weights drawn under ``seed``."""
    config = peft.LoraConfig(**scenario.config_kwargs(**overrides))
    return _seeded(lambda: peft.get_peft_model(build(scenario.kind), config, adapter_name=scenario.adapter), seed)


def delta_model(scenario: Scenario, seed: int = SEED, **overrides: Any):
    """deltatune's model for ``scenario``, adapter weights drawn under ``seed``."""
    config = deltatune.LoraConfig(**scenario.config_kwargs(**overrides))
    return _seeded(lambda: deltatune.get_delta_model(build(scenario.kind), config, adapter_name=scenario.adapter), seed)


def adapter_path(root: Path, adapter: str) -> Path:
    """Where peft keeps adapter ``adapter`` of a folder saved at ``root`` (spelled out, not from deltatune)."""
    return root if adapter == "default" else root / adapter


def perturb_trainable(model: nn.Module, seed: int = 7) -> None:
    """Add seeded noise to every trainable parameter, as training would (biases and head copies included)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=generator, dtype=param.dtype))
