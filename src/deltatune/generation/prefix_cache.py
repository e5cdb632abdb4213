"""The keys and values of prompt starts that requests share, kept so that a later prompt beginning the same way,
for the same adapter, prefills only the rest (a chat template's system prompt; earlier turns of a conversation)::

    prompt   [<system> You are a helpful ... <user>][question ...<assistant>]
             |<-- cached columns, computed once -->|<-- prefilled anew --->|

What is kept is the longest start a prompt shares with another prompt (one joining with it, or one of the last
``recent`` seen), when it is at least ``min_tokens`` long; what is reused is the longest start a new prompt has in
common with a kept one (so a system prompt kept as part of a longer start serves every question after it). Either is
all but the prompt's last token at most, whose logits the prefill must give. Keys and values depend on every adapted
layer before them, so each entry belongs to one adapter (None: the base model alone). At most ``capacity`` tokens
are kept over all entries, the least recently used leaving first; any change to the model's parameters (an adapter
added or deleted, a weight written in place: ``compat.torch.write_stamps``) empties the cache.
"""

from __future__ import annotations

import bisect
import collections
from collections.abc import Sequence

import torch
from torch import nn

from deltatune.compat.torch import write_stamps

Layers = list[tuple[torch.Tensor, torch.Tensor]]  # each layer's (keys, values) [kv_heads, length, head_dim]


class PrefixCache:
    """Cached prompt starts, per adapter, with their keys and values (see the module's docstring)."""

    def __init__(self, capacity: int, min_tokens: int = 16, recent: int = 64) -> None:
        self.capacity = capacity
        self.min_tokens = min_tokens
        self.tokens = 0  # tokens held over all entries
        self._entries: collections.OrderedDict[tuple[object, tuple[int, ...]], Layers] = collections.OrderedDict()
        self._recent: collections.deque[tuple[int, ...]] = collections.deque(maxlen=recent)
        self._version: int | None = None  # the model's adapters_version when its parameters were listed
        self._parameters: list[torch.Tensor] = []
        self._stamps: list[tuple[int, int]] | None = None

    def check(self, model: nn.Module) -> None:
        """Empty the cache unless ``model``'s parameters are the ones it was filled with, unwritten
        (``write_stamps``; the parameters are listed anew when the adapters change, ``DeltaModel.adapters_version``,
        not at every prefill: a module swapped for another outside an adapter's add or delete, such as resized
        embeddings, needs a new engine)."""
        version = getattr(model, "adapters_version", None)
        if self._stamps is None or version != self._version:
            self._version, self._parameters = version, list(model.parameters())
        stamps = write_stamps(self._parameters)
        if stamps != self._stamps:
            self._entries.clear()
            self.tokens, self._stamps = 0, stamps

    def reusable(self, adapter: object, prompt: Sequence[int]) -> tuple[int, Layers | None]:
        """The longest start of ``prompt`` that a cached entry of ``adapter`` begins with (at least ``min_tokens``,
        all but the prompt's last token at most): (its length, that entry's layers, whose first columns it is), or
        (0, None)."""
        best, found = 0, None
        head = tuple(prompt[: self.min_tokens])
        for key in self._entries:
            name, tokens = key
            if name == adapter and tokens[: self.min_tokens] == head:
                length = min(_common(prompt, tokens), len(prompt) - 1)
                if length > best:
                    best, found = length, key
        if found is None or best < self.min_tokens:
            return 0, None
        self._entries.move_to_end(found)
        return best, self._entries[found]

    def shared(self, prompts: Sequence[tuple[int, ...]]) -> list[int]:
        """For each of ``prompts``, the length of the longest start it shares with another of them or with a
        recent prompt (all but its last token at most), 0 under ``min_tokens``; then remembers them as recent.
        Sorted, a prompt's longest shared start is with a neighbour."""
        pool = sorted([*prompts, *self._recent])
        lengths = []
        for prompt in prompts:
            at = bisect.bisect_left(pool, prompt)  # the prompt itself (or an equal one)
            longest = max((_common(prompt, pool[i]) for i in (at - 1, at + 1) if 0 <= i < len(pool)), default=0)
            longest = min(longest, len(prompt) - 1)
            lengths.append(longest if longest >= self.min_tokens else 0)
        self._recent.extend(prompts)
        return lengths

    def holds(self, adapter: object, tokens: tuple[int, ...]) -> bool:
        return (adapter, tokens) in self._entries

    def store(self, adapter: object, tokens: tuple[int, ...], layers: Layers) -> None:
        """Keep ``tokens``' keys and values for ``adapter``, dropping the least recently used entries over the
        capacity (a start longer than the capacity is not kept)."""
        if len(tokens) > self.capacity or self.holds(adapter, tokens):
            return
        self._entries[(adapter, tokens)] = layers
        self.tokens += len(tokens)
        while self.tokens > self.capacity:
            (_, dropped), _ = self._entries.popitem(last=False)
            self.tokens -= len(dropped)


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    """The length of the longest common start of ``a`` and ``b``."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
