"""log π of sampled completion tokens at the sampling temperature, with logits for a chunk of them at a time.

GRPO scores every completion token of its micro-batch. Forming the logits of all of them keeps
[rows, completion tokens, vocab] fp32 logits, their copy divided by the temperature and the log-softmax
for backward: the largest tensors of the step. Only the hidden states are needed::

    [prompt | completion] ──model, its head swapped out (train.head)──▶ hidden [B, L + 1, H]
      positions −L−1 … −2 (each predicts the next completion token) where completion_mask = 1 ──▶ [N, H]
      ──head, log-softmax at T, a chunk of rows at a time (kernels.token_logps)──▶ [N] ──▶ [B, L], 0 at padding

Padding positions get 0 and no gradient: ``policy_loss`` weighs every token by the loss mask (within the
completion mask), and the old and reference log-probs come from here too. Models that transform their
logits after the head (soft-capping, scaling) keep the full logits.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from deltatune.kernels.token_logps import linear_token_logps, module_token_logps
from deltatune.train.head import answer_only_supported, head_input, head_rows


def completion_logps(
    model: nn.Module, batch: Mapping[str, torch.Tensor], temperature: float, unwrapped: nn.Module | None = None
) -> torch.Tensor:
    """log softmax(logits / T)[token] at every completion position: [rows, completion tokens] fp32.

    ``batch`` holds prompt_ids / prompt_mask (left-padded) and completion_ids / completion_mask
    (right-padded). ``unwrapped``: the model inside ``model`` when a wrapper (DDP) runs it.
    """
    owner = model if unwrapped is None else unwrapped
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    targets = batch["completion_ids"]
    length = targets.shape[1]
    inputs = dict(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=length + 1)
    if not answer_only_supported(owner):
        logits = model(**inputs).logits[:, :-1].float() / temperature
        return logits.gather(-1, targets[..., None])[..., 0] - logits.logsumexp(-1)
    with head_input(owner) as (head, captured):
        model(**inputs)
    where = batch["completion_mask"].bool()
    hidden = captured[0][:, -length - 1 : -1][where]
    logps = _head_logps(head, hidden, targets[where], temperature)
    return logps.new_zeros(targets.shape).masked_scatter(where, logps)


def _head_logps(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    rows = head_rows(head)
    if type(head) is nn.Linear:
        return linear_token_logps(hidden, head.weight, head.bias, targets, temperature, rows)
    return module_token_logps(head, hidden, targets, temperature, rows)
