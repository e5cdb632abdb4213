"""The chunked per-token log-probabilities of a head (kernels.token_logps) against the plain formula
log_softmax(logits / T).gather(t): values and gradients for a frozen head, a trainable head and any head
module, fp32 and bf16, chunks smaller than the batch, a temperature other than 1."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tests.tensor_checks import assert_close_rel

from deltatune.kernels.token_logps import linear_token_logps, module_token_logps

N, H, V = 10, 8, 50


def _inputs(bias: bool, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, w = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g)
    b = torch.randn(V, generator=g) if bias else None
    return h, w, b, torch.randint(0, V, (N,), generator=g)


def _formula(h, w, b, t, temperature: float) -> torch.Tensor:
    return F.log_softmax(F.linear(h, w, b).float() / temperature, -1).gather(1, t[:, None])[:, 0]


def _upstream(dtype=torch.float32) -> torch.Tensor:
    """A different gradient for every row: the backward pass must scale each row by its own."""
    return torch.randn(N, generator=torch.Generator().manual_seed(7), dtype=dtype)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("rows", [1, 3, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_a_frozen_head_matches_the_formula_in_value_and_hidden_gradient(rows, bias, temperature) -> None:
    h, w, b, t = _inputs(bias)
    leaf, copy = h.clone().requires_grad_(), h.double().clone().requires_grad_()
    got = linear_token_logps(leaf, w, b, t, temperature, rows)
    ref = _formula(copy, w.double(), None if b is None else b.double(), t, temperature)
    assert got.dtype == torch.float32 and got.shape == (N,)
    assert got.grad_fn.name() == "_LinearTokenLogpsBackward"
    assert_close_rel(got, ref, 1e-6, "log-probs")
    got.backward(_upstream())
    ref.backward(_upstream(torch.float64))
    assert_close_rel(leaf.grad, copy.grad, 1e-5, "gradient of h")


@pytest.mark.parametrize("trainable", [("weight",), ("weight", "bias"), ("bias",)])
def test_a_trainable_head_takes_the_checkpointed_path_with_every_gradient(trainable) -> None:
    h, w, b, t = _inputs(bias=True)
    leaves = {"h": h.clone(), "weight": w.clone(), "bias": b.clone()}
    copies = {name: x.double().clone() for name, x in leaves.items()}
    for name in ("h", *trainable):
        leaves[name].requires_grad_()
        copies[name].requires_grad_()
    got = linear_token_logps(leaves["h"], leaves["weight"], leaves["bias"], t, 0.7, rows=3)
    ref = _formula(copies["h"], copies["weight"], copies["bias"], t, 0.7)
    assert got.grad_fn.name() == "CatBackward0"  # the chunks of the module path
    assert_close_rel(got, ref, 1e-6, "log-probs")
    got.backward(_upstream())
    ref.backward(_upstream(torch.float64))
    for name, leaf in leaves.items():
        assert (leaf.grad is None) == (copies[name].grad is None), name
        if leaf.grad is not None:
            assert_close_rel(leaf.grad, copies[name].grad, 1e-5, f"gradient of {name}")


def test_bf16_hidden_states_keep_their_dtype_and_match_the_formula() -> None:
    h, w, b, t = _inputs(bias=True)
    h, w, b = h.bfloat16(), w.bfloat16(), b.bfloat16()
    leaf, copy = h.clone().requires_grad_(), h.double().clone().requires_grad_()
    got = linear_token_logps(leaf, w, b, t, 0.7, rows=3)
    ref = _formula(copy, w.double(), b.double(), t, 0.7)
    assert got.dtype == torch.float32
    assert_close_rel(got, ref, 2e-2, "log-probs")
    got.backward(_upstream())
    ref.backward(_upstream(torch.float64))
    assert leaf.grad.dtype == torch.bfloat16
    assert_close_rel(leaf.grad, copy.grad, 2e-2, "gradient of h")


def test_without_grad_only_the_values_are_computed() -> None:
    h, w, b, t = _inputs(bias=True)
    h.requires_grad_()
    with torch.no_grad():
        got = linear_token_logps(h, w, b, t, 0.7, rows=3)
    assert got.grad_fn is None
    torch.testing.assert_close(got, _formula(h, w, b, t, 0.7).detach())
    assert linear_token_logps(h.detach(), w, b, t, 0.7, rows=3).grad_fn is None  # nothing wants a gradient


def test_any_head_module_runs_chunk_by_chunk_with_its_gradients() -> None:
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Linear(H, 16), torch.nn.Tanh(), torch.nn.Linear(16, V))
    h, _, _, t = _inputs(bias=False)
    h.requires_grad_()
    got = module_token_logps(head, h, t, 0.7, rows=3)
    got.backward(_upstream())
    grads = [p.grad.clone() for p in (h, *head.parameters())]
    h.grad = None
    head.zero_grad()
    ref = F.log_softmax(head(h) / 0.7, -1).gather(1, t[:, None])[:, 0]
    ref.backward(_upstream())
    torch.testing.assert_close(got, ref)
    for got_grad, p in zip(grads, (h, *head.parameters())):
        torch.testing.assert_close(got_grad, p.grad)
    with torch.no_grad():
        torch.testing.assert_close(module_token_logps(head, h, t, 0.7, rows=3), ref.detach())
