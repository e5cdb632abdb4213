"""GRPO's completion log-probs (train.completion_logps) through the chunked head against the full-logits formula,
on a tiny Llama with a LoRA adapter and rows of different prompt and completion lengths: values, the adapter's
gradients, logits for a chunk of completion tokens only, and the full-logits path kept for transformed logits."""

from __future__ import annotations

import pytest
import torch
from tests.tensor_checks import LargestVocabTensor
from tests.tiny_models import VOCAB, tiny_llama

from deltatune import LoraConfig, get_delta_model
from deltatune.kernels import linear_cross_entropy as lce
from deltatune.kernels.segment_attention import use_segment_attention
from deltatune.train.completion_logps import completion_logps, packed_rows

TEMPERATURE = 0.7
PROMPTS, COMPLETIONS = (3, 5, 4, 2), (4, 1, 6, 3)  # tokens per row: prompts left-padded, completions right-padded


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    width, length = max(PROMPTS), max(COMPLETIONS)
    prompt_mask = torch.tensor([[0] * (width - n) + [1] * n for n in PROMPTS])
    completion_mask = torch.tensor([[1] * n + [0] * (length - n) for n in COMPLETIONS])
    return dict(
        prompt_ids=torch.randint(3, VOCAB, prompt_mask.shape, generator=g) * prompt_mask,
        prompt_mask=prompt_mask,
        completion_ids=torch.randint(3, VOCAB, completion_mask.shape, generator=g) * completion_mask,
        completion_mask=completion_mask,
    )


def _reference(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The formula on the model's full logits: log softmax(logits / T) of each completion token, [rows, L]."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    length = batch["completion_ids"].shape[1]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -length - 1 : -1]
    logps = (logits.float() / TEMPERATURE).log_softmax(-1)
    return logps.gather(-1, batch["completion_ids"][..., None])[..., 0]


def _weighted_sum_grads(logps: torch.Tensor, model, mask: torch.Tensor) -> list[torch.Tensor]:
    """Gradients of Σ w·m·logπ with a different weight w per token, as policy_loss weighs them."""
    weights = torch.randn(logps.shape, generator=torch.Generator().manual_seed(3))
    (logps * weights * mask).sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    return grads


@pytest.mark.parametrize(
    "config",
    [
        LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
        LoraConfig(r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False),  # a LoRA head
        LoraConfig(r=4, target_modules=["v_proj"], modules_to_save=["lm_head"], init_lora_weights=False),
    ],
    ids=["all-linear", "lora-head", "saved-head"],
)
def test_completion_logps_equal_the_full_logits_formula_in_value_and_adapter_gradients(config) -> None:
    model = get_delta_model(tiny_llama(), config)
    batch = _batch()
    mask = batch["completion_mask"].bool()
    want = _reference(model, batch)
    want_grads = _weighted_sum_grads(want, model, mask)
    got = completion_logps(model, batch, TEMPERATURE)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got[mask], want[mask], atol=1e-5, rtol=1e-5)
    assert (got[~mask] == 0).all()  # padding: finite, and no part of any loss
    got_grads = _weighted_sum_grads(got, model, mask)
    assert len(got_grads) == len(want_grads) > 0
    for g, w in zip(got_grads, want_grads):
        assert w.abs().sum() > 0
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-4)
    with torch.no_grad():  # the old and reference log-probs: no graph, the same values
        again = completion_logps(model, batch, TEMPERATURE)
    assert again.grad_fn is None
    torch.testing.assert_close(again, got.detach())
    assert isinstance(model.get_output_embeddings(), torch.nn.Module)  # the head is back in place


def test_logits_exist_only_for_a_chunk_of_completion_tokens(monkeypatch) -> None:
    monkeypatch.setattr(lce, "CHUNK_BYTES", 4 * VOCAB * 4)  # chunks of 4 rows
    model = get_delta_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear"))
    batch = _batch()
    with LargestVocabTensor(model, VOCAB) as chunked:
        completion_logps(model, batch, TEMPERATURE).sum().backward()
    assert chunked.rows == 4 < sum(COMPLETIONS)
    with LargestVocabTensor(model, VOCAB) as full:
        _reference(model, batch).sum().backward()
    assert full.rows == batch["prompt_ids"].numel() + batch["completion_ids"].numel()  # every position's logits


def test_models_that_transform_their_logits_keep_the_full_logits() -> None:
    model = get_delta_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear"))
    model.config.final_logit_softcapping = 30.0  # Llama ignores it; its presence sends the log-probs the long way
    batch = _batch()
    with LargestVocabTensor(model, VOCAB) as full:
        got = completion_logps(model, batch, TEMPERATURE)
    rows, length = batch["completion_ids"].shape
    assert full.rows == rows * (length + 1)
    torch.testing.assert_close(got, _reference(model, batch), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ["sdpa", "eager", "segments"])
def test_padding_free_rows_equal_the_padded_batch_in_value_and_adapter_gradients(attention) -> None:
    """The rows run as one row without padding (positions restarting per row) give every completion token the
    log-prob and the adapter gradient of the padded batch: no row attends to another, whatever the attention."""
    model = get_delta_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    model.base_model.set_attn_implementation("sdpa" if attention == "segments" else attention)
    if attention == "segments":  # what GRPOTrainer switches an sdpa model to
        assert use_segment_attention(model.base_model)
    batch = _batch()
    mask = batch["completion_mask"].bool()
    want = completion_logps(model, batch, TEMPERATURE)
    want_grads = _weighted_sum_grads(want, model, mask)
    got = completion_logps(model, batch, TEMPERATURE, padding_free=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for g, w in zip(_weighted_sum_grads(got, model, mask), want_grads, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-3)  # other shapes, other summation orders


def test_packed_rows_drop_the_padding_and_restart_positions() -> None:
    batch = _batch()
    ids, positions, predicting = packed_rows(batch)
    lengths = [p + c for p, c in zip(PROMPTS, COMPLETIONS)]
    assert ids.shape == positions.shape == (1, sum(lengths)) and predicting.shape == (sum(COMPLETIONS),)
    assert positions[0].tolist() == [i for n in lengths for i in range(n)]
    starts = [sum(lengths[:row]) for row in range(len(lengths))]
    for row, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS)):
        real = batch["completion_ids"][row, :c]
        assert ids[0, starts[row] + p : starts[row] + p + c].tolist() == real.tolist()
    expected = [starts[row] + p - 1 + j for row, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS)) for j in range(c)]
    assert predicting.tolist() == expected
