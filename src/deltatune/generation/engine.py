"""One batched generator with a KV cache: rows that finish leave, rows that arrive join.

The running batch is left-padded: every row's cache ends at the same column, pads are masked out, and
each row keeps its own next position (so RoPE sees 0, 1, 2, ... whatever its padding)::

    cache columns ->      . . a a a a a      row 0: prompt of 5, decoding
                          b b b b b b b      row 1: prompt of 7
    a new row c (3) is prefilled alone, left-padded to the batch's length and joined:
                          . . . . c c c

Each ``step()`` decodes one token for every running row in one forward, then prefills the waiting rows
(up to ``max_batch``) in one forward and joins them. A row leaves when it emits a stop token or reaches
``max_new_tokens``; the columns no remaining row needs are dropped. GRPO's rollouts, ``generate`` and the
server all drive this one class (``generate()`` for a fixed set of prompts, ``add``/``step`` for streams).
With ``packed_weights`` (``kernels.packed_linear``) the model's linear layers run on oneDNN-packed weights
during the engine's forwards, for long-lived or many-step engines on a CPU (the server, GRPO's rollouts).
A Llama-family model (``compat.transformers.lean_decoder``, checked with each plan: hooks may come) prefills and
decodes through its layers (``lean_forward``), without its forward's per-call machinery; on packed weights its
layers that read the same input (q, k, v; gate, up) then run as one product each, with the batch's LoRA terms
added into it (``tuners/lora/joined.py``).
A row may name its own adapter (``add(..., adapter="support")``, None for the bare base model): rows of
different LoRA/DoRA adapters then share every forward (``DeltaModel.adapter_rows``), and the engine keeps each
adapter's rows together so that its block of rows in the adapted layers is a slice of the batch.
With a ``prefix_cache``, the start a prompt shares with other prompts (a chat template's system prompt) is kept
per adapter with its keys and values, and a later prompt that begins with it prefills only the rest.
Prompt-learning adapters (which add virtual tokens to every row's cache) are not supported here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn
from transformers import PreTrainedModel

from deltatune.compat.torch import has_hooks, hook_registrations
from deltatune.compat.transformers import (
    CACHE,
    Project,
    buffered_cache,
    cache_tensors,
    empty_cache,
    last_logits_only,
    lean_decoder,
    lean_forward,
    projections,
)
from deltatune.errors import ConfigError
from deltatune.generation.prefix_cache import Layers, PrefixCache
from deltatune.generation.sampling import SamplingParams, choose
from deltatune.kernels.packed_linear import PackedWeights, Patch
from deltatune.tuners.lora.joined import JoinedProjections

AS_SET = object()  # a row that runs with the model's adapters as they are set (the default)
ROOM = 64  # cache columns reserved past the used ones when the batch's cache is made: regrown once per 64 steps


@dataclasses.dataclass
class Row:
    """One request: its prompt, what it has generated so far and why it stopped (None while running)."""

    request_id: object
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None = None
    output_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None  # "stop" (a stop token) or "length" (max_new_tokens)
    adapter: str | None | object = None  # the row's adapter, None for the base alone, or AS_SET


@dataclasses.dataclass
class _Plan:
    """What a forward runs, worked out before it: each row's adapter (None: the rows run the model as set), whether
    it goes through the model's layers (``lean_forward``), its ``project`` (``JoinedProjections``, on packed weights)
    and the packed forwards of the other linear layers (``PackedWeights.patches``). ``key``: what it was made for."""

    key: tuple
    names: tuple[str | None, ...] | None
    lean: bool
    project: JoinedProjections | None
    patches: list[Patch]


@dataclasses.dataclass
class Event:
    """What one ``step()`` produced for a row: its new token, and its finish reason if it just ended."""

    row: Row
    token_id: int
    finished: bool


class GenerationEngine:
    """Continuous batching over a causal LM (a transformers model, or a ``DeltaModel`` over one).

    ``stop_token_ids`` (the model's end-of-sequence tokens) end every row; a request's own
    ``SamplingParams.stop_token_ids`` add to them. ``seed`` seeds the generator shared by rows without a
    seed of their own. ``packed_weights``: run the model's linear layers on oneDNN-packed weights (CPU).
    ``static_weights``: nothing writes the model's weights in place while this engine has rows (a server's
    model, which only loads and deletes adapters): a mixed batch's stacked adapters are then checked against
    their tensors when rows join, not at every decoding step (``DeltaModel.adapter_rows``' ``check_weights``), and
    what a decoding step runs (``_Plan``: the layers' packed forwards, their joined products with their adapters'
    stacked factors) is kept from step to step while the rows' adapters, the model's adapters, mode and hooks stay
    the same (a module swapped, or a forward replaced by assignment, by hand needs a new engine).
    ``prefix_cache``: keep the keys and values of up to this many tokens of prompt starts that requests share
    (``generation/prefix_cache.py``), for rows that name their adapter (or None) on a Llama-family model; 0: none.
    """

    def __init__(
        self,
        model: nn.Module,
        stop_token_ids: Iterable[int] = (),
        max_batch: int = 64,
        seed: int = 0,
        packed_weights: PackedWeights | None = None,
        static_weights: bool = False,
        prefix_cache: int = 0,
    ) -> None:
        if max_batch < 1:
            raise ConfigError(f"max_batch={max_batch} must be at least 1")
        if prefix_cache < 0:
            raise ConfigError(f"prefix_cache={prefix_cache} must be a number of tokens, 0 (none) or more")
        self.model = model
        self._last_only = last_logits_only(model)  # the head runs on each row's last position only
        self._causal_lm = _causal_lm(model)
        self.stop_token_ids = frozenset(stop_token_ids)
        self.max_batch = max_batch
        self.packed_weights = packed_weights
        self.static_weights = static_weights
        self.prefixes = PrefixCache(prefix_cache) if prefix_cache > 0 else None
        self.device = next(model.parameters()).device
        self.generator = torch.Generator(self.device).manual_seed(seed)
        self.waiting: list[Row] = []
        self.running: list[Row] = []
        self._cache: list[tuple[torch.Tensor, torch.Tensor]] = []  # each layer's (keys, values), with room to grow
        self._mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)  # [rows, columns]: 1 = a real token
        self._positions = torch.zeros(0, dtype=torch.long, device=self.device)  # each row's next position
        self._last = torch.zeros(0, dtype=torch.long, device=self.device)  # each row's last token, fed next
        self._ids = itertools.count()
        self._kept: _Plan | None = None  # the decoding steps' plan, under ``static_weights``

    # -- requests -------------------------------------------------------------------------------
    def add(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        request_id: object = None,
        adapter: str | None | object = AS_SET,
    ) -> Row:
        """Queue a request; it joins the running batch at the next ``step()`` with room. ``adapter``: the adapter
        this row runs with (None: the base model alone); left out, the model's adapters as they are set."""
        if not prompt_ids:
            raise ConfigError("a prompt needs at least one token")
        if adapter is not AS_SET and adapter is not None:
            check_mixable = getattr(self.model, "check_mixable", None)
            if check_mixable is None:
                raise ConfigError(f"adapter={adapter!r} needs a DeltaModel holding it; this model has no adapters")
            check_mixable(adapter)  # refused now, not in the middle of a batch it would stop
        generator = None
        if params.seed is not None:
            generator = torch.Generator(self.device).manual_seed(params.seed)
        row = Row(next(self._ids) if request_id is None else request_id, list(prompt_ids), params, generator)
        row.adapter = adapter
        self.waiting.append(row)
        return row

    def cancel(self, row: Row) -> None:
        """Drop ``row`` now, waiting or running (a client that went away); it ends with reason "cancelled"."""
        if row in self.waiting:
            self.waiting.remove(row)
        elif row in self.running:
            self._keep([i for i, other in enumerate(self.running) if other is not row])
        row.finish_reason = row.finish_reason or "cancelled"

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[Row]:
        """Answer every prompt (one ``SamplingParams`` for all, or one each); rows in the prompts' order."""
        each = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(each) != len(prompts):
            raise ConfigError(f"{len(prompts)} prompts but {len(each)} sampling settings")
        rows = [self.add(prompt, p) for prompt, p in zip(prompts, each)]
        while self.has_work:
            self.step()
        return rows

    # -- one step ---------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[Event]:
        """Decode one token for every running row, then prefill and join waiting rows; returns the tokens."""
        events = self._decode() if self.running else []
        room = self.max_batch - len(self.running)
        if self.waiting and room > 0:
            joining, self.waiting = self.waiting[:room], self.waiting[room:]
            events += self._prefill(joining)
        return events

    def _decode(self) -> list[Event]:
        columns = self._mask.shape[1]
        if self._cache[0][0].shape[2] == columns:  # no room left for this step's column
            room = self._room()
            self._cache = [
                (_in_buffer([k[:, :, :columns]], columns, room), _in_buffer([v[:, :, :columns]], columns, room))
                for k, v in self._cache
            ]
        mask = torch.cat([self._mask, torch.ones_like(self._mask[:, :1])], dim=1)
        ids, positions = self._last[:, None], self._positions[:, None]
        plan = self._plan(self.running, keep=self.static_weights)
        # the new column is written into the room; every row's adapter was checked when the row joined
        with self._running(plan, check_weights=not self.static_weights) as project:
            if plan.lean:
                logits = lean_forward(self._causal_lm, ids, positions, mask, self._cache, columns, project)
            else:
                cache = buffered_cache(self._cache, columns)
                inputs = dict(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
                logits = self.model(**inputs, **{CACHE: cache}, **self._last_only).logits[:, -1]
        self._mask, self._positions = mask, self._positions + 1
        return self._sample(logits, self.running)

    def _prefill(self, rows: list[Row]) -> list[Event]:
        """Prefill the joining rows and join them: with a ``prefix_cache``, the rows whose prompt starts with a
        cached prefix in one forward from there on, then the others in one forward from their first token."""
        lean = self._lean()
        reused, shared = self._reused(rows, lean)
        events = []
        for group in ([r for r in rows if _key(r) in reused], [r for r in rows if _key(r) not in reused]):
            if group:
                events += self._prefill_group(group, reused, shared, lean)
        self._group_by_adapter()
        return events

    def _prefill_group(
        self, rows: list[Row], reused: dict[tuple, tuple[int, Layers]], shared: dict[tuple, int], lean: bool
    ) -> list[Event]:
        """Prefill ``rows``, each distinct (prompt, adapter) once: rows that share one (GRPO's group of completions
        per prompt, or the ``n`` choices of a request) share its cache and its first logits. A row with a cached
        prefix (``reused``) attends to its keys and values, placed before its new tokens::

            columns:   . . p p p | . . n n      row with a cached prefix of 3 and 2 new tokens
                       p p p p p | n n n n      (left-padded on both sides of the cached columns)
        """
        distinct: dict[tuple, int] = {}
        source = [distinct.setdefault(_key(row), len(distinct)) for row in rows]
        firsts = [rows[source.index(i)] for i in range(len(distinct))]
        starts = [reused[_key(row)][0] if _key(row) in reused else 0 for row in firsts]
        cached = max(starts)
        length = max(len(row.prompt_ids) - start for row, start in zip(firsts, starts))
        ids = torch.zeros(len(firsts), length, dtype=torch.long, device=self.device)
        mask = torch.zeros(len(firsts), cached + length, dtype=torch.long, device=self.device)
        for i, (row, start) in enumerate(zip(firsts, starts)):
            new = row.prompt_ids[start:]
            ids[i, length - len(new) :] = torch.tensor(new, device=self.device)
            mask[i, cached - start : cached] = 1
            mask[i, cached + length - len(new) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, cached:]
        with self._running(self._plan(firsts, lean=lean)) as project:
            if lean:
                cache = empty_cache(self._causal_lm, len(firsts), cached + length)
                if cached:
                    _place_prefixes(cache, [reused.get(_key(row)) for row in firsts], cached)
                logits = lean_forward(self._causal_lm, ids, positions, mask, cache, cached, project)
            else:  # nothing is reused (``_reused``): the prompts start at column 0
                inputs = dict(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
                output = self.model(**inputs, **self._last_only)
                cache, logits = cache_tensors(getattr(output, CACHE)), output.logits[:, -1]
        if shared:
            self._keep_prefixes(firsts, starts, shared, cache, mask)
        if len(firsts) < len(rows):
            index = torch.tensor(source, device=self.device)
            cache = [(k.index_select(0, index), v.index_select(0, index)) for k, v in cache]
            mask, positions, logits = mask[index], positions[index], logits[index]
        self.running += rows
        self._join(cache, mask, positions[:, -1] + 1)
        self._last = torch.cat([self._last, torch.zeros(len(rows), dtype=torch.long, device=self.device)])
        return self._sample(logits, rows, offset=len(self.running) - len(rows))

    def _reused(self, rows: list[Row], lean: bool) -> tuple[dict[tuple, tuple[int, Layers]], dict[tuple, int]]:
        """The cached prefix each joining row's prompt starts with, by (prompt, adapter), and the length of the
        start each prompt shares with others (``PrefixCache.shared``): for rows that name their adapter (or None),
        on a lean forward, with a ``prefix_cache`` (emptied first if the model changed); else nothing."""
        if self.prefixes is None or not lean:
            return {}, {}
        self.prefixes.check(self.model)
        prompts = list(dict.fromkeys(tuple(row.prompt_ids) for row in rows if row.adapter is not AS_SET))
        shared = dict(zip(prompts, self.prefixes.shared(prompts)))
        found = {}
        for row in rows:
            if row.adapter is not AS_SET and _key(row) not in found:
                start, layers = self.prefixes.reusable(row.adapter, row.prompt_ids)
                if start:
                    found[_key(row)] = (start, layers)
        return found, shared

    def _keep_prefixes(
        self, rows: list[Row], starts: list[int], shared: dict[tuple, int], cache: Layers, mask: torch.Tensor
    ) -> None:
        """Cache the start each prompt shares with others (``shared``) when it is longer than the prefix it
        reused: its first real columns of every layer."""
        for i, (row, start) in enumerate(zip(rows, starts)):
            length = shared.get(tuple(row.prompt_ids), 0) if row.adapter is not AS_SET else 0
            tokens = tuple(row.prompt_ids[:length])
            if length > start and not self.prefixes.holds(row.adapter, tokens):
                columns = mask[i].nonzero()[:length, 0]
                layers = [(k[i].index_select(1, columns), v[i].index_select(1, columns)) for k, v in cache]
                self.prefixes.store(row.adapter, tokens, layers)

    def _lean(self) -> bool:
        """Whether this forward runs through the model's layers (``lean_forward``): a Llama-family model, no hooks."""
        return self._causal_lm is not None and lean_decoder(self._causal_lm) and not has_hooks(self.model)

    def _plan(self, rows: list[Row], keep: bool = False, lean: bool | None = None) -> _Plan:
        """What a forward over ``rows`` runs (``_Plan``; ``lean``: ``_lean()`` when the caller just found it). With
        ``keep`` (decoding steps under ``static_weights``) the last kept plan is taken again while its key holds:
        the same adapter for each row, and no change to the model's adapters (``DeltaModel.adapters_version``),
        mode or hooks (``compat.torch.hook_registrations``)."""
        names = None
        if any(row.adapter is not AS_SET for row in rows) and hasattr(self.model, "adapter_rows"):
            names = tuple(self._adapter_of(row) for row in rows)
        key = (names, getattr(self.model, "adapters_version", None), hook_registrations(), self.model.training)
        if keep and self._kept is not None and self._kept.key == key:
            return self._kept
        lean, project, patches = self._lean() if lean is None else lean, None, []
        if self.packed_weights:
            if lean:
                project = JoinedProjections(projections(self._causal_lm), self.packed_weights)
            patches = self.packed_weights.patches(project.groups if project else ())
        plan = _Plan(key, names, lean, project, patches)
        if keep:
            self._kept = plan
        return plan

    @contextlib.contextmanager
    def _running(self, plan: _Plan, check_weights: bool = True) -> Iterator[Project | None]:
        """The block of a forward as ``plan`` says: each row with its own adapter when any row names one (a model
        without adapters runs as it is: every row is the base; ``check_weights`` as ``adapter_rows``), on packed
        weights when the engine has them. Yields a ``lean`` forward's ``project`` on packed weights: the model's
        linear layers as few products as possible (``tuners/lora/joined.py``)."""
        with contextlib.ExitStack() as stack:
            if self.packed_weights:
                groups = plan.project.groups if plan.project else ()
                stack.enter_context(self.packed_weights.applied(groups, plan.patches))
            if plan.names is not None:
                stack.enter_context(self.model.adapter_rows(plan.names, check_weights))
            yield plan.project

    def _adapter_of(self, row: Row) -> str | None:
        """The adapter a row runs with in a mixed batch: its own, or the model's one active adapter."""
        if row.adapter is not AS_SET:
            return row.adapter
        active = self.model.active_adapters
        if len(active) > 1:
            raise ConfigError(
                f"a row without an adapter of its own shares a batch with others, but {active} are active"
            )
        return active[0] if active else None

    def _sample(self, logits: torch.Tensor, rows: list[Row], offset: int = 0) -> list[Event]:
        """Choose each row's next token, record it, and let finished rows leave."""
        tokens, logprobs = choose(logits, [r.params for r in rows], [r.generator for r in rows], self.generator)
        self._last[offset : offset + len(rows)] = tokens
        events = []
        for row, token, logprob in zip(rows, tokens.tolist(), logprobs.tolist()):
            row.output_ids.append(token)
            row.logprobs.append(logprob)
            if token in self.stop_token_ids or token in row.params.stop_token_ids:
                row.finish_reason = "stop"
            elif len(row.output_ids) >= row.params.max_new_tokens:
                row.finish_reason = "length"
            events.append(Event(row, token, row.finish_reason is not None))
        if any(event.finished for event in events):
            self._keep([i for i, row in enumerate(self.running) if row.finish_reason is None])
        return events

    # -- the batch's cache ------------------------------------------------------------------------
    def _room(self) -> int:
        """Columns to reserve past the used ones: ``ROOM``, or fewer when no running row may generate that many."""
        left = max(row.params.max_new_tokens - len(row.output_ids) for row in self.running)
        return max(1, min(ROOM, left))

    def _join(self, cache: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor, positions: torch.Tensor):
        """Append rows (their cache, mask and next positions; already in ``running``) to the batch, left-padding
        the shorter side, in buffers with room for the next steps."""
        columns = self._mask.shape[1]
        width = max(columns, mask.shape[1])
        room = self._room()
        if not self._cache:  # no rows yet
            self._cache = [(k[:0], v[:0]) for k, v in cache]
        self._cache = [
            (_in_buffer([ok[:, :, :columns], nk], width, room), _in_buffer([ov[:, :, :columns], nv], width, room))
            for (ok, ov), (nk, nv) in zip(self._cache, cache)
        ]
        self._mask = torch.cat([_left_pad(self._mask, width, 1), _left_pad(mask, width, 1)])
        self._positions = torch.cat([self._positions, positions])

    def _keep(self, keep: list[int]) -> None:
        """Keep only rows ``keep`` of the batch, and drop the leading columns that no kept row uses."""
        self._take(keep)
        if not self.running:
            self._kept = None  # the next batch plans anew (the layers keep their own stacks: ``rows.adapter_stack``)
        used = self._mask.any(0).nonzero()
        start = int(used[0]) if len(used) else self._mask.shape[1]
        self._mask = self._mask[:, start:]
        self._cache = [(k[:, :, start:], v[:, :, start:]) for k, v in self._cache]

    def _group_by_adapter(self) -> None:
        """Order the rows by adapter (the model's order; the base model's rows last), so that each adapter's rows
        are consecutive: in the adapted layers its block of rows is then a slice of the batch, not a gather
        (``tuners/lora/rows.py``). Rows that all run the model's adapters as set stay as they joined."""
        if all(row.adapter is AS_SET for row in self.running) or not hasattr(self.model, "peft_config"):
            return
        rank = {name: i for i, name in enumerate(self.model.peft_config)}
        keys = [rank.get(self._adapter_of(row), len(rank)) for row in self.running]
        order = sorted(range(len(keys)), key=keys.__getitem__)
        if order != list(range(len(order))):
            self._take(order)

    def _take(self, rows: list[int]) -> None:
        """The batch's rows ``rows``, in that order."""
        self.running = [self.running[i] for i in rows]
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        self._cache = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self._cache]
        self._mask, self._positions, self._last = self._mask[index], self._positions[index], self._last[index]


def _causal_lm(model: nn.Module) -> nn.Module | None:
    """The transformers causal LM that ``model`` runs: itself, or the one a ``DeltaModel`` wraps (whose forward is
    its model's); None for anything else (its forward may do more)."""
    from deltatune.model import DeltaModel

    if type(model) is DeltaModel:
        return model.base_model
    return model if isinstance(model, PreTrainedModel) else None


def _key(row: Row) -> tuple:
    """What a row's prefill depends on: its prompt and its adapter."""
    return tuple(row.prompt_ids), row.adapter


def _place_prefixes(cache: Layers, prefixes: list[tuple[int, Layers] | None], columns: int) -> None:
    """Write each row's cached prefix (its length, the first columns of an entry's layers) right-aligned into the
    first ``columns`` columns of each layer's (keys, values) buffers, zeros before it (masked out, but a masked NaN
    would still poison the sum)."""
    for layer, (keys, values) in enumerate(cache):
        keys[:, :, :columns].zero_()
        values[:, :, :columns].zero_()
        for row, prefix in enumerate(prefixes):
            if prefix is not None:
                start, layers = prefix
                keys[row, :, columns - start : columns].copy_(layers[layer][0][:, :start])
                values[row, :, columns - start : columns].copy_(layers[layer][1][:, :start])


def _in_buffer(parts: list[torch.Tensor], width: int, room: int) -> torch.Tensor:
    """``parts`` stacked along rows (dim 0), each right-aligned to ``width`` columns (dim 2, zeros before its
    own), in one new buffer with ``room`` unused columns after them: one copy of each part."""
    first = parts[0]
    buffer = first.new_empty(sum(part.shape[0] for part in parts), first.shape[1], width + room, first.shape[3])
    start = 0
    for part in parts:
        end, pad = start + part.shape[0], width - part.shape[2]
        buffer[start:end, :, :pad].zero_()
        buffer[start:end, :, pad:width].copy_(part)
        start = end
    return buffer


def _left_pad(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """``tensor`` with zeros before its columns along ``dim`` up to ``width``."""
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
