"""Prompt methods at inference and under gradient checkpointing.

generate(): greedy continuations of a padded batch (left or right padding, with and without the
cache) equal those of each prompt alone, token for token and score for score; the first step's
scores are the adapted model's own next-token logits; sampling draws the same tokens with and
without the cache. Gradient checkpointing: the same loss and gradients as without it, and the
layers really are recomputed in the backward pass.
"""

from __future__ import annotations

import pytest
import torch

from prompt_cases import MODELS, batch, delta_model
from tiny_models import perturb_trainable

GENERATE = {"max_new_tokens": 5, "pad_token_id": 0, "output_scores": True, "return_dict_in_generate": True}
SHORT, LONG = torch.tensor([[17, 45, 9]]), torch.tensor([[5, 88, 23, 61, 30]])


def adapted(method: str, kind: str):
    model = delta_model(method, kind)
    perturb_trainable(model)
    return model.eval()


def padded(side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """LONG and SHORT in one batch, SHORT padded with 0 on ``side``."""
    pad = torch.zeros(1, LONG.shape[1] - SHORT.shape[1], dtype=torch.long)
    short = torch.cat([pad, SHORT], 1) if side == "left" else torch.cat([SHORT, pad], 1)
    mask = (
        (torch.arange(LONG.shape[1]) >= pad.shape[1])
        if side == "left"
        else (torch.arange(LONG.shape[1]) < SHORT.shape[1])
    )
    return torch.cat([LONG, short]), torch.stack([torch.ones_like(mask), mask]).long()


@pytest.mark.parametrize("method", ["prompt_random", "ptuning_lstm", "prefix", "prefix_projection"])
@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_padded_batch_continues_like_each_prompt_alone(method, kind, use_cache):
    model = adapted(method, kind)
    alone = [model.generate(prompt, use_cache=use_cache, do_sample=False, **GENERATE) for prompt in (LONG, SHORT)]
    with torch.no_grad():
        first_step = model(input_ids=SHORT).logits[:, -1]
        with model.disable_adapter():
            assert not torch.allclose(model(input_ids=SHORT).logits[:, -1], first_step, atol=1e-3)
    torch.testing.assert_close(alone[1].scores[0], first_step, atol=1e-5, rtol=0)
    for side in ("left", "right"):
        ids, mask = padded(side)
        both = model.generate(ids, attention_mask=mask, use_cache=use_cache, do_sample=False, **GENERATE)
        for row, single in enumerate(alone):
            new = both.sequences[row, ids.shape[1] :]
            assert new.tolist() == single.sequences[0, -GENERATE["max_new_tokens"] :].tolist(), side
            for step, scores in enumerate(both.scores):
                torch.testing.assert_close(scores[row : row + 1], single.scores[step], atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["ptuning_mlp", "prefix"])
def test_sampling_draws_the_same_with_and_without_cache(method):
    model = adapted(method, "llama")
    ids, mask = padded("left")
    draws = []
    for use_cache in (True, False):
        torch.manual_seed(11)
        draws.append(model.generate(ids, attention_mask=mask, do_sample=True, top_k=0, use_cache=use_cache, **GENERATE))
    assert torch.equal(draws[0].sequences, draws[1].sequences)
    for step, scores in enumerate(draws[0].scores):
        torch.testing.assert_close(draws[1].scores[step], scores, atol=1e-5, rtol=0)
    with model.disable_adapter():
        base = model.generate(ids, attention_mask=mask, do_sample=True, top_k=0, **GENERATE)
    assert not torch.allclose(base.scores[0], draws[0].scores[0], atol=1e-3), "the prompt shapes the distribution"


def loss_and_grads(method: str, kind: str, checkpointing: bool) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    """Loss, gradients of the trainable parameters and how often layer 0's attention ran in one step."""
    model = delta_model(method, kind)
    if checkpointing:
        model.base_model.activation_checkpointing_enable()
    attention = next(
        m
        for name, m in model.base_model.named_modules()
        if name.endswith(("0.self_attn", "0.attn", "0.attention.self"))
    )
    calls = []
    attention.register_forward_hook(lambda *_: calls.append(1))
    model.train()
    inputs = batch()
    if MODELS[kind].task_type == "CAUSAL_LM":
        loss = model(**inputs, labels=inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)).loss
    else:
        loss = model(**inputs, labels=torch.tensor([0, 2])).loss
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters() if p.requires_grad], len(calls)


@pytest.mark.parametrize("method", ["prompt_random", "ptuning_mlp", "prefix", "prefix_projection"])
@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2", "bert"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(method, kind):
    loss, grads, calls = loss_and_grads(method, kind, checkpointing=False)
    loss_ckpt, grads_ckpt, calls_ckpt = loss_and_grads(method, kind, checkpointing=True)
    assert (calls, calls_ckpt) == (1, 2), "the checkpointed layer runs again in the backward pass"
    torch.testing.assert_close(loss_ckpt, loss, atol=1e-6, rtol=0)
    assert all(g is not None and g.abs().sum() > 0 for g in grads_ckpt)
    for got, expected in zip(grads_ckpt, grads, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
