"""Attention over the examples of a padding-free row, each example alone: ``sdpa_segments``.

A padding-free row holds several examples back to back, their position ids restarting at each
(``data.collate``). torch's attention kernels take the row's block-diagonal causal mask as a whole
T x T matrix, so attention costs T² however short the examples are. Here the row's examples are
gathered into a batch of their own, [segments, heads, longest, dim], and attend with a plain causal
mask, costing Σ longest² instead (measured: 12.2 -> 6.7 ms per layer, forward and backward, for
eight chatterbot examples of SmolLM2's attention shape on 2 CPU cores)::

    row:      [a a a b b c c c c]        positions 0 1 2 0 1 0 1 2 3
    segments: [a a a . ]  [b b . . ]  [c c c c]      (. never attended: it comes after every real token)

Every other call (padded batches, generation with a cache, rows without restarts, sliding windows,
soft-capping) is transformers' own sdpa attention, which also builds the masks (``register`` registers both
under one name).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

NAME = "sdpa_segments"


def register() -> str:
    """Register the attention (and sdpa's mask builder) with transformers under ``NAME``; return it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, sdpa_segments)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


def use_segment_attention(model: nn.Module) -> bool:
    """Switch a model that attends with transformers' sdpa to ``sdpa_segments``; others (eager, flash
    kernels) are left as they are. Returns whether it switched."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    model.set_attn_implementation(register())
    return True


def sdpa_segments(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention signature: query [B, H, T, D], key/value [B, KV, T, D] -> ([B, T, H, D], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    index = _segment_index(kwargs.get("position_ids"), query.shape[2], key.shape[2])
    special = any(kwargs.get(key) for key in ("output_attentions", "sliding_window", "softcap"))
    if index is None or special:  # windows and soft-capping live in sdpa's mask and kernel choice
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    batch, heads, length, dim = query.shape
    out = F.scaled_dot_product_attention(
        *(_gather(x, index) for x in (query, key, value)),
        dropout_p=dropout,
        is_causal=True,
        scale=scaling,
        enable_gqa=key.shape[1] != heads,
    )  # [segments, heads, longest, dim]
    rows = out.transpose(1, 2).flatten(0, 1)  # [segments * longest, heads, dim]
    real = index.flatten() >= 0
    flat = rows.new_empty(batch * length, heads, dim)
    flat[index.flatten()[real]] = rows[real]
    return flat.view(batch, length, heads, dim), None


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[B, H, T, D] -> [segments, H, longest, D]. Positions past a segment's end repeat token 0: as keys
    they come after every real query (causal: never attended), as queries their outputs are dropped."""
    return x.transpose(1, 2).flatten(0, 1)[index.clamp(min=0)].transpose(1, 2)


def _segment_index(position_ids: torch.Tensor | None, q_length: int, kv_length: int) -> torch.Tensor | None:
    """[segments, longest] indices into the flattened [B * T] tokens (-1: past a segment's end), or None
    when the rows hold one sequence each (or a cache makes keys longer than queries)."""
    if position_ids is None or q_length != kv_length or position_ids.shape[-1] != q_length:
        return None
    seen, version, index = _LAST
    if seen() is not position_ids or version != position_ids._version:  # each layer asks with the same tensor
        index = _build_index(position_ids)
        _LAST[:] = [weakref.ref(position_ids), position_ids._version, index]
    return index


_LAST: list = [lambda: None, 0, None]  # a weak reference to the last position ids seen, their version, their index


def _build_index(position_ids: torch.Tensor) -> torch.Tensor | None:
    """A new sequence starts where a position id is not its predecessor's plus one (as transformers reads it)."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    first = starts.flatten().nonzero().flatten().tolist()
    if len(first) == starts.shape[0]:
        return None
    bounds = list(zip(first, first[1:] + [starts.numel()]))
    index = torch.full((len(bounds), max(end - start for start, end in bounds)), -1, dtype=torch.long)
    for row, (start, end) in enumerate(bounds):
        index[row, : end - start] = torch.arange(start, end)
    return index.to(position_ids.device)
