"""Held-out loss and sample answers: the two numbers a fine-tuning run is judged by."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from deltatune.data.encoding import prompt_ids
from deltatune.data.records import Message
from deltatune.generation.engine import GenerationEngine
from deltatune.generation.sampling import SamplingParams
from deltatune.kernels.packed_linear import PackedWeights
from deltatune.train.lm_loss import causal_lm_loss
from deltatune.tuners.prompt.config import PromptLearningConfig


@torch.no_grad()
def heldout_loss(
    model: nn.Module,
    examples: Sequence[Mapping[str, Sequence[int]]],
    collate: Callable[[Sequence[Mapping[str, Sequence[int]]]], dict[str, torch.Tensor]],
    batch_size: int = 8,
    desc: str = "eval",
) -> float:
    """Mean cross-entropy per labelled token over ``examples`` (labels -100 are ignored), through the
    training loss path (``lm_loss.causal_lm_loss``)."""
    was_training = model.training
    model.eval()
    total_loss, total_tokens = 0.0, 0
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(examples), batch_size), desc=desc, leave=False):
        batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size]).items()}
        loss = causal_lm_loss(model, batch)
        total_loss += loss.total.item()
        total_tokens += loss.tokens
    model.train(was_training)
    return total_loss / max(total_tokens, 1)


def perplexity(loss: float) -> float:
    """exp(loss), capped at exp(50) so a diverged run still prints a number."""
    return math.exp(min(loss, 50.0))


@torch.no_grad()
def answer(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    max_new_tokens: int = 48,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    packed_weights: PackedWeights | None = None,
) -> str:
    """The model's next assistant message after ``messages``: greedy at ``temperature`` 0, else sampled (``top_p``,
    ``seed``). It runs on the generation engine, as serving and GRPO do; an adapter with virtual tokens (the prompt
    methods, which the engine's cache does not hold) answers through transformers' ``generate``. ``packed_weights``:
    the engine's packed linear weights (``kernels.packed_linear``), kept by the caller across answers."""
    ids = prompt_ids(tokenizer, messages)
    if has_virtual_tokens(model):
        output = _transformers_answer(model, tokenizer, ids, max_new_tokens, temperature, top_p, seed)
    else:
        stops = model.generation_config.eos_token_id if hasattr(model, "generation_config") else None
        stops = [stops] if isinstance(stops, int) else list(stops or [tokenizer.eos_token_id])
        engine = GenerationEngine(model, stop_token_ids=stops, max_batch=1, seed=seed, packed_weights=packed_weights)
        output = engine.generate([ids], SamplingParams(max_new_tokens, temperature, top_p))[0].output_ids
    return tokenizer.decode(output, skip_special_tokens=True).strip()


def has_virtual_tokens(model: nn.Module) -> bool:
    """``model`` holds a prompt-learning adapter (prompt tuning, P-tuning, prefix tuning)."""
    return any(isinstance(config, PromptLearningConfig) for config in getattr(model, "peft_config", {}).values())


def _transformers_answer(model, tokenizer, ids, max_new_tokens, temperature, top_p, seed) -> list[int]:
    """``answer`` through transformers' ``generate``: the new token ids."""
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = {"temperature": temperature, "top_p": top_p} if temperature > 0 else {}
    torch.manual_seed(seed)
    output = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        pad_token_id=pad,
        **sampling,
    )
    return output[0, input_ids.shape[1] :].tolist()
