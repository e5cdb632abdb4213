"""Padding-free rows attended example by example (kernels.segment_attention) against transformers' sdpa."""

from __future__ import annotations

import torch
from tests.test_lm_loss import _examples
from tests.tiny_models import tiny_llama

from deltatune import LoraConfig, get_delta_model
from deltatune.data.collate import collate_causal, collate_padding_free, pack_examples
from deltatune.kernels.segment_attention import NAME, register, use_segment_attention
from deltatune.train.lm_loss import causal_lm_loss


def _loss_and_grads(model, batch):
    result = causal_lm_loss(model, batch)
    (result.total / result.tokens).backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    return result.total.detach(), grads


def test_segments_give_sdpas_loss_and_gradients_on_padding_free_and_packed_rows() -> None:
    model = get_delta_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    model.base_model.set_attn_implementation("sdpa")
    packed = collate_causal(pack_examples(_examples() + _examples(seed=1), 24), 0)  # several rows, padded
    batches = [collate_padding_free(_examples(), 0), packed]
    want = [_loss_and_grads(model, batch) for batch in batches]
    model.base_model.set_attn_implementation(register())
    for batch, (loss, grads) in zip(batches, want):
        got_loss, got_grads = _loss_and_grads(model, batch)
        torch.testing.assert_close(got_loss, loss, atol=1e-5, rtol=1e-5)
        for g, w in zip(got_grads, grads):
            torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-4)


def test_padded_batches_and_generation_take_sdpa_unchanged() -> None:
    reference, model = tiny_llama(), tiny_llama()
    reference.set_attn_implementation("sdpa")
    model.set_attn_implementation(register())
    batch = collate_causal(_examples(), 0)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reference(**inputs).logits)
    prompt = torch.tensor([[5, 6, 7, 8]])
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    assert model.generate(prompt, **settings).tolist() == reference.generate(prompt, **settings).tolist()


def test_only_sdpa_models_switch_and_saved_models_do_not_ask_for_it(tmp_path) -> None:
    eager = tiny_llama()  # built with attn_implementation="eager"
    assert not use_segment_attention(eager) and eager.config._attn_implementation == "eager"
    sdpa = tiny_llama()
    sdpa.set_attn_implementation("sdpa")
    assert use_segment_attention(sdpa) and sdpa.config._attn_implementation == NAME
    sdpa.save_pretrained(tmp_path)
    assert NAME not in (tmp_path / "config.json").read_text()
