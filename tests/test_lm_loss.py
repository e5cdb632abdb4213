"""The answer-only causal-LM loss (train.lm_loss) and its chunked head cross-entropy, against plain formulas
and the model's own loss: values and gradients, every head kind, padding-free rows, and no full logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tests.tensor_checks import LargestVocabTensor, assert_close_rel
from tests.tiny_models import VOCAB, tiny_llama

from deltatune import LoraConfig, PromptTuningConfig, get_delta_model
from deltatune.data.collate import collate_causal, collate_padding_free
from deltatune.kernels import linear_cross_entropy as lce
from deltatune.train.lm_loss import answer_only_supported, causal_lm_loss


def _examples(seed: int = 0) -> list[dict[str, list[int]]]:
    """Rows of different lengths whose labels cover their second half (a prompt, then an answer)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in (9, 14, 5, 11):
        ids = torch.randint(3, VOCAB, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2 :]})
    return rows


@pytest.mark.parametrize("rows", [1, 3, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_cross_entropy_matches_the_formula_in_value_and_every_gradient(rows: int, bias: bool) -> None:
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(10, 8, generator=g), torch.randn(50, 8, generator=g)
    b = torch.randn(50, generator=g) if bias else None
    t = torch.randint(0, 50, (10,), generator=g)
    leaves = [x.clone().requires_grad_() for x in (h, w, *([b] if bias else []))]
    copies = [x.double().clone().requires_grad_() for x in (h, w, *([b] if bias else []))]
    got = lce.linear_cross_entropy(leaves[0], leaves[1], leaves[2] if bias else None, t, rows)
    ref = F.cross_entropy(F.linear(*copies), t, reduction="sum")
    assert_close_rel(got, ref, 1e-6, "loss")
    (2.5 * got).backward()  # the backward scales what forward kept by the incoming gradient
    (2.5 * ref).backward()
    for leaf, copy in zip(leaves, copies):
        assert_close_rel(leaf.grad, copy.grad, 1e-5, "gradient")


def test_linear_cross_entropy_skips_gradients_of_frozen_inputs_and_runs_without_grad() -> None:
    h, w = torch.randn(6, 4, requires_grad=True), torch.randn(20, 4)
    t = torch.randint(0, 20, (6,))
    loss = lce.linear_cross_entropy(h, w, None, t, 2)
    loss.backward()
    assert w.grad is None and h.grad is not None
    with torch.no_grad():
        assert lce.linear_cross_entropy(h, w, None, t, 2).grad_fn is None
    torch.testing.assert_close(loss.detach(), F.cross_entropy(h @ w.T, t, reduction="sum").detach())


def test_module_cross_entropy_checkpoints_any_head() -> None:
    head = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 30))
    h = torch.randn(7, 8, requires_grad=True)
    t = torch.randint(0, 30, (7,))
    got = lce.module_cross_entropy(head, h, t, rows=3)
    got.backward()
    grads = [p.grad.clone() for p in (h, *head.parameters())]
    h.grad = None
    head.zero_grad()
    ref = F.cross_entropy(head(h), t, reduction="sum")
    ref.backward()
    torch.testing.assert_close(got, ref)
    for got_grad, p in zip(grads, (h, *head.parameters())):
        torch.testing.assert_close(got_grad, p.grad)


def _model_loss_and_grads(model, batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    loss = model(**batch).loss
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    return loss.detach(), grads


def _answer_loss_and_grads(model, batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    result = causal_lm_loss(model, batch)
    loss = result.total / result.tokens
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    return loss.detach(), grads


@pytest.mark.parametrize(
    "config",
    [
        LoraConfig(r=4, target_modules="all-linear"),
        LoraConfig(r=4, target_modules=["q_proj", "lm_head"]),  # a LoRA head: the module path
        LoraConfig(r=4, target_modules=["v_proj"], modules_to_save=["lm_head"]),  # a trainable plain head
        LoraConfig(r=4, target_modules=["v_proj"], trainable_token_indices={"embed_tokens": [5, 9]}),
    ],
    ids=["all-linear", "lora-head", "saved-head", "trainable-tokens"],
)
def test_answer_only_loss_equals_the_models_own_loss_and_gradients(config) -> None:
    model = get_delta_model(tiny_llama(), config)
    batch = collate_causal(_examples(), pad_token_id=0)
    want, want_grads = _model_loss_and_grads(model, batch)
    got, got_grads = _answer_loss_and_grads(model, batch)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert len(got_grads) == len(want_grads) > 0
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-4)
    assert isinstance(model.get_output_embeddings(), torch.nn.Module)  # the head is back in place


def test_padding_free_rows_give_the_padded_batchs_loss_and_gradients() -> None:
    model = get_delta_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear"))
    padded, free = collate_causal(_examples(), 0), collate_padding_free(_examples(), 0)
    assert free["input_ids"].shape == (1, sum(len(e["input_ids"]) for e in _examples()))
    assert "attention_mask" not in free
    want, want_grads = _answer_loss_and_grads(model, padded)
    got, got_grads = _answer_loss_and_grads(model, free)
    assert causal_lm_loss(model, free).tokens == causal_lm_loss(model, padded).tokens
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-4)


def test_virtual_tokens_are_left_out_of_the_scored_positions() -> None:
    model = get_delta_model(tiny_llama(), PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    batch = collate_causal(_examples(), 0)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"]
    ref = F.cross_entropy(logits[:, -labels.shape[1] : -1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")
    got = causal_lm_loss(model, batch)
    torch.testing.assert_close(got.total, ref, atol=1e-5, rtol=1e-5)


def test_logits_exist_only_for_a_chunk_of_labelled_positions(monkeypatch) -> None:
    monkeypatch.setattr(lce, "CHUNK_BYTES", 4 * VOCAB * 4)  # chunks of 4 rows
    model = get_delta_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear"))
    batch = collate_causal(_examples(), 0)
    with LargestVocabTensor(model, VOCAB) as chunked:
        result = causal_lm_loss(model, batch)
        result.total.backward()
    assert result.tokens == 21 and chunked.rows == 4
    with LargestVocabTensor(model, VOCAB) as full:
        model(**batch).loss.backward()
    assert full.rows == batch["input_ids"].numel()  # what the model's own loss forms


def test_models_that_transform_their_logits_keep_their_own_loss() -> None:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        final_logit_softcapping=5.0,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = get_delta_model(Gemma2ForCausalLM(config).eval(), LoraConfig(r=4, target_modules="all-linear"))
    assert not answer_only_supported(model) and answer_only_supported(tiny_llama())
    batch = collate_causal(_examples(), 0)
    want, _ = _model_loss_and_grads(model, batch)
    got, _ = _answer_loss_and_grads(model, batch)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("collate", [collate_causal, collate_padding_free])
def test_sft_trainer_accumulation_gives_the_full_batch_step(tmp_path, collate) -> None:
    """Micro-batches divide by the labelled tokens of the whole step, so 2x4 examples step like 8."""
    from transformers import TrainingArguments

    from deltatune.train.stages import SFTTrainer

    examples = _examples() + _examples(seed=1)
    steps = []
    for batch_size, accumulation in ((8, 1), (4, 2)):
        torch.manual_seed(0)  # the same random B in both runs
        model = get_delta_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
        args = TrainingArguments(
            output_dir=str(tmp_path),
            max_steps=1,
            logging_steps=1,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            max_grad_norm=1e9,
            report_to=[],
            use_cpu=True,
            remove_unused_columns=False,
            train_sampling_strategy="sequential",
        )
        trainer = SFTTrainer(model=model, args=args, train_dataset=examples, data_collator=lambda b: collate(b, 0))
        trainer.train()
        steps.append((trainer.state.log_history[0]["loss"], trainer.state.log_history[0]["grad_norm"]))
    assert steps[1] == pytest.approx(steps[0], rel=1e-5)
