"""log π of sampled completion tokens at the sampling temperature, with logits for a chunk of them at a time.

GRPO scores every completion token of its micro-batch. Forming the logits of all of them keeps
[rows, completion tokens, vocab] fp32 logits, their copy divided by the temperature and the log-softmax
for backward: the largest tensors of the step. Only the hidden states are needed::

    [prompt | completion] ──model, its head swapped out (train.head)──▶ hidden [B, L + 1, H]
      positions −L−1 … −2 (each predicts the next completion token) where completion_mask = 1 ──▶ [N, H]
      ──head, log-softmax at T, a chunk of rows at a time (kernels.token_logps)──▶ [N] ──▶ [B, L], 0 at padding

Padding-free (the default, as SFT's): the rows run as one row, each prompt and completion without its
padding, positions restarting per row, so no compute goes to padding (``packed_rows``)::

    [. . p p p | c c . .]  [p p p p | c . . .]   ──▶   [p p p c c p p p p c]   positions 0 1 2 3 4 0 1 2 3 4

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
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    temperature: float,
    unwrapped: nn.Module | None = None,
    padding_free: bool = False,
) -> torch.Tensor:
    """log softmax(logits / T)[token] at every completion position: [rows, completion tokens] fp32.

    ``batch`` holds prompt_ids / prompt_mask (left-padded) and completion_ids / completion_mask
    (right-padded). ``unwrapped``: the model inside ``model`` when a wrapper (DDP) runs it.
    ``padding_free``: run the rows as one row without their padding (module docstring).
    """
    owner = model if unwrapped is None else unwrapped
    targets, where = batch["completion_ids"], batch["completion_mask"].bool()
    length = targets.shape[1]
    if not answer_only_supported(owner):
        logits = model(**_padded_inputs(batch)).logits[:, :-1].float() / temperature
        return logits.gather(-1, targets[..., None])[..., 0] - logits.logsumexp(-1)
    if padding_free:
        ids, positions, predicting = packed_rows(batch)
        inputs = dict(input_ids=ids, position_ids=positions, use_cache=False)  # restarts keep each row apart

        def predictors(hidden: torch.Tensor) -> torch.Tensor:
            return hidden[0, predicting]
    else:
        inputs = _padded_inputs(batch)

        def predictors(hidden: torch.Tensor) -> torch.Tensor:
            return hidden[:, -length - 1 : -1][where]

    with head_input(owner) as (head, captured):
        model(**inputs)
    logps = _head_logps(head, predictors(captured[0]), targets[where], temperature)
    return logps.new_zeros(targets.shape).masked_scatter(where, logps)


def _padded_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor | int]:
    """The left-padded prompts and right-padded completions side by side, with the head kept to the positions
    that predict completion tokens (and the last)."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return dict(
        input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=batch["completion_ids"].shape[1] + 1
    )


def _head_logps(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    rows = head_rows(head)
    if type(head) is nn.Linear:
        return linear_token_logps(hidden, head.weight, head.bias, targets, temperature, rows)
    return module_token_logps(head, hidden, targets, temperature, rows)


def packed_rows(batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids [1, T], position ids [1, T], the positions that predict each completion token [N], row by row)
    of the batch's rows back to back without padding: row i is its p_i prompt tokens then its c_i completion
    tokens, at positions 0 … p_i + c_i − 1, and position p_i − 1 + j (from the row's start) predicts token j."""
    prompt_lengths = batch["prompt_mask"].sum(1).tolist()
    completion_lengths = batch["completion_mask"].sum(1).tolist()
    width = batch["prompt_ids"].shape[1]
    pieces, positions, predicting, start = [], [], [], 0
    for row, (p, c) in enumerate(zip(prompt_lengths, completion_lengths)):
        pieces += [batch["prompt_ids"][row, width - p :], batch["completion_ids"][row, :c]]
        positions.append(torch.arange(p + c))
        predicting.append(torch.arange(start + p - 1, start + p + c - 1))
        start += p + c
    device = batch["prompt_ids"].device
    return torch.cat(pieces)[None], torch.cat(positions)[None].to(device), torch.cat(predicting).to(device)
