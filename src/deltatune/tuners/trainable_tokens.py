"""trainable_token_indices: train only some rows of an embedding (e.g. the rows of new special tokens).

For token ids t_1..t_n an adapter holds their rows R [n, dim] (``trainable_tokens_delta``, peft's
name, although R holds the rows themselves, not a difference), initialised from the embedding,
and the layer runs as if those rows of the weight E [vocab, dim] were replaced::

    E' = E with row t_i := R[i]        input embedding:        y = E'[x]
                                       output head tied to E:  logits = h E'ᵀ (+ b)

Nothing [vocab, dim] is built per step: the lookup replaces only the positions whose id is some
t_i, and the head recomputes only the n logit columns t_i, so the only gradient is the one of R.
Merging writes R into E's rows (keeping the rows it overwrote for unmerging).

In a tied model (an output head sharing the input embedding's weight, e.g. Llama with
``tie_word_embeddings=True``) the head is wrapped as well and reads the embedding's R, so the two
stay tied while training and after merging, and the head saves nothing of its own (as in peft).
File key: ``base_model.model.<embedding>.token_adapter.trainable_tokens_delta`` [n, dim].
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.errors import ConfigError, MergeError, TargetError
from deltatune.tuners.base import Tuner, master_dtype, replace_module
from deltatune.tuners.targeting import walk_modules


class TokenRows(nn.Module):
    """Per adapter: the token ids and their trained rows ``trainable_tokens_delta[name]`` [n, dim]."""

    def __init__(self) -> None:
        super().__init__()
        self.trainable_tokens_delta = nn.ParameterDict()
        self.token_indices: dict[str, list[int]] = {}


class TrainableTokensLayer(nn.Module):
    """An ``nn.Embedding`` (rows replaced in the lookup) or an output head ``nn.Linear`` (logit columns
    replaced), with per adapter either its own rows (``token_adapter``) or those of the embedding it is
    tied to (``tied``, not registered: they are saved by that embedding)."""

    is_delta_layer = True

    def __init__(self, base_layer: nn.Embedding | nn.Linear) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.token_adapter = TokenRows()
        self.tied: dict[str, TrainableTokensLayer] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self._overwritten: dict[str, torch.Tensor] = {}  # adapter -> the weight rows its merge replaced

    @property
    def weight(self) -> nn.Parameter:
        """The base weight (for dtype, device and shape queries of transformers code)."""
        return self.base_layer.weight

    @property
    def adapter_names(self) -> list[str]:
        return [*self.token_adapter.token_indices, *self.tied]

    def add(self, name: str, token_ids: list[int]) -> None:
        """Own trainable rows for ``token_ids``, starting as the embedding's current rows."""
        weight = self.base_layer.weight
        rows = weight.detach()[torch.tensor(token_ids, device=weight.device)].to(master_dtype(weight.dtype))
        self.token_adapter.trainable_tokens_delta[name] = nn.Parameter(rows.clone())
        self.token_adapter.token_indices[name] = list(token_ids)

    def follow(self, name: str, source: TrainableTokensLayer) -> None:
        """Use ``source``'s rows of adapter ``name`` (a head tied to that embedding)."""
        self.tied[name] = source

    def delete(self, name: str) -> None:
        if name in self.merged_adapters:
            raise MergeError(f"adapter {name!r} is merged into the base weights; unmerge it before deleting it")
        if name in self.token_adapter.token_indices:
            del self.token_adapter.trainable_tokens_delta[name]
            del self.token_adapter.token_indices[name]
        self.tied.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def adapter_parameters(self, name: str) -> Iterator[tuple[str, nn.Parameter]]:
        if name in self.token_adapter.token_indices:
            yield f"token_adapter.trainable_tokens_delta.{name}", self.token_adapter.trainable_tokens_delta[name]

    def rows(self, name: str) -> tuple[list[int], nn.Parameter]:
        """(token ids, their rows [n, dim]) of adapter ``name``, its own or the tied embedding's."""
        owner = self.tied[name].token_adapter if name in self.tied else self.token_adapter
        return owner.token_indices[name], owner.trainable_tokens_delta[name]

    # -- merging ------------------------------------------------------------------------
    def unmerged(self, names: list[str]) -> list[str]:
        return [name for name in names if name in self.adapter_names and name not in self.merged_adapters]

    def writes_weight(self, name: str) -> bool:
        """False for a head whose weight IS the tied embedding's: that embedding's merge writes it."""
        return name not in self.tied or self.tied[name].base_layer.weight is not self.base_layer.weight

    def merge(self, names: list[str]) -> None:
        """E[t_i] := R[i] for each adapter of ``names`` not merged yet (rows of several adapters must not overlap)."""
        todo = self.unmerged(names)
        _check_disjoint([*self.merged_adapters, *todo], self.rows)
        weight = self.base_layer.weight.data
        for name in todo:
            if self.writes_weight(name):
                token_ids, rows = self.rows(name)
                index = torch.tensor(token_ids, device=weight.device)
                self._overwritten[name] = weight[index].clone()
                weight[index] = rows.detach().to(weight.dtype)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Put back the rows each merge overwrote, newest first."""
        weight = self.base_layer.weight.data
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self._overwritten:
                token_ids, _ = self.rows(name)
                weight[torch.tensor(token_ids, device=weight.device)] = self._overwritten.pop(name).to(weight)

    # -- forward ------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        names = [] if self.disabled else self.unmerged(self.active_adapters)
        if not names:
            return result
        _check_disjoint(names, self.rows)
        token_ids = [i for name in names for i in self.rows(name)[0]]
        rows = torch.cat([self.rows(name)[1] for name in names])
        if isinstance(self.base_layer, nn.Embedding):
            return self._replace_lookup(x, result, token_ids, rows)
        return self._replace_columns(x, result, token_ids, rows)

    def _replace_lookup(
        self, x: torch.Tensor, result: torch.Tensor, token_ids: list[int], rows: torch.Tensor
    ) -> torch.Tensor:
        """``result`` with the positions of x holding t_i replaced by R[i] (the lookup's options kept)."""
        base = self.base_layer
        n = len(token_ids)
        slot = torch.full((base.num_embeddings,), n, dtype=torch.long, device=x.device)  # n: "not trained"
        slot[torch.tensor(token_ids, device=x.device)] = torch.arange(n, device=x.device)
        slots = slot[x]
        table = torch.cat([rows, rows.new_zeros(1, rows.shape[1])])
        replaced = F.embedding(
            slots,
            table,
            padding_idx=token_ids.index(base.padding_idx) if base.padding_idx in token_ids else None,
            max_norm=base.max_norm,
            norm_type=base.norm_type,
            scale_grad_by_freq=base.scale_grad_by_freq,
        )
        scale = getattr(base, "embed_scale", None)  # scaled embeddings (Gemma) multiply in their forward
        if scale is not None:
            replaced = replaced * torch.as_tensor(scale, device=replaced.device, dtype=replaced.dtype)
        return torch.where((slots < n).unsqueeze(-1), replaced.to(result.dtype), result)

    def _replace_columns(
        self, x: torch.Tensor, result: torch.Tensor, token_ids: list[int], rows: torch.Tensor
    ) -> torch.Tensor:
        """``result`` (logits) with columns t_i recomputed as h R[i]ᵀ (+ b[t_i])."""
        index = torch.tensor(token_ids, device=result.device)
        bias = self.base_layer.bias
        columns = F.linear(x, rows.to(x.dtype), None if bias is None else bias[index].to(x.dtype))
        # in place: the base layer's backward needs its inputs, not its output (autograd checks this)
        return result.index_copy_(-1, index, columns.to(result.dtype))

    def extra_repr(self) -> str:
        return ", ".join(
            f"{name}: {len(self.rows(name)[0])} tokens" + (" (tied)" if name in self.tied else "")
            for name in self.adapter_names
        )


class TrainableTokensTuner(Tuner):
    """Wraps the embeddings named by ``config.trainable_token_indices`` (and the heads tied to them)."""

    layer_class = TrainableTokensLayer

    def inject(self, model: nn.Module, config, adapter_name: str) -> None:
        """Validate everything first, then wrap: a refused config leaves ``model`` untouched."""
        wanted = getattr(config, "trainable_token_indices", None)
        if not wanted:
            return
        targets = _targets(model, wanted)
        ties = _ties(model, config, targets)
        for name, token_ids in targets.items():
            if name not in ties:
                _layer_at(model, name).add(adapter_name, token_ids)
        for head, embedding in ties.items():
            _layer_at(model, head).follow(adapter_name, model.get_submodule(embedding))

    def merge(self, model: nn.Module, adapter_names: list[str], safe_merge: bool = False) -> None:
        layers = [layer for _, layer in self.layers(model)]
        if safe_merge:
            for layer in layers:
                for name in layer.unmerged(adapter_names):
                    if not torch.isfinite(layer.rows(name)[1]).all():
                        raise MergeError(f"adapter {name!r}'s trainable token rows hold NaN/Inf; nothing was changed")
        for layer in layers:
            layer.merge(adapter_names)


def _check_disjoint(names: list[str], rows) -> None:
    seen: set[int] = set()
    for name in names:
        token_ids = set(rows(name)[0])
        if seen & token_ids:
            raise ConfigError(
                f"adapter {name!r} trains token ids {sorted(seen & token_ids)} that another active or merged adapter "
                f"trains too; activate or merge adapters whose trainable_token_indices do not overlap"
            )
        seen |= token_ids


def _targets(model: nn.Module, wanted: list[int] | dict[str, list[int]]) -> dict[str, list[int]]:
    """Full module name -> token ids, checked: an embedding (or the output head), ids inside its vocabulary."""
    if isinstance(wanted, dict):
        named = {}
        for entry, token_ids in wanted.items():
            matches = [name for name, _ in walk_modules(model) if name == entry or name.endswith("." + entry)]
            if not matches:
                raise TargetError(
                    f"trainable_token_indices names {entry!r}, which matches no module of this model; "
                    f"give the embedding's name (e.g. 'embed_tokens')"
                )
            named.update(dict.fromkeys(matches, token_ids))
    else:
        embedding = _input_embedding_name(model)
        named = {embedding: wanted}
    head = _base(model.get_output_embeddings()) if hasattr(model, "get_output_embeddings") else None
    for name, token_ids in named.items():
        module = model.get_submodule(name)
        base = _base(module)
        if not isinstance(base, nn.Embedding) and not (isinstance(base, nn.Linear) and base is head):
            raise ConfigError(
                f"trainable_token_indices names {name}, a {type(base).__name__}, not an embedding; name an "
                f"nn.Embedding (e.g. 'embed_tokens') or the model's output head"
            )
        if not isinstance(module, TrainableTokensLayer) and getattr(module, "is_delta_layer", False):
            raise ConfigError(
                f"{name} is already adapted ({type(module).__name__}: a LoRA target or in modules_to_save) and cannot "
                f"also have trainable_token_indices (peft refuses this too); drop it from one of the two"
            )
        vocab = base.weight.shape[0]
        outside = [i for i in token_ids if i >= vocab]
        if outside:
            raise ConfigError(
                f"trainable_token_indices {outside} lie outside {name}'s vocabulary of {vocab} rows; "
                f"resize the embeddings first (model.resize_token_embeddings) or fix the ids"
            )
    return named


def _ties(model: nn.Module, config, targets: dict[str, list[int]]) -> dict[str, str]:
    """Head name -> embedding name, for the heads that must follow the input embedding's rows (as peft ties them).

    A head sharing the input embedding's weight follows it, unless the head has trainable tokens of
    its own with other ids (then both train apart; refused under ``ensure_weight_tying``).
    """
    name = _input_embedding_name(model, required=False)
    if name not in targets:
        return {}
    weight = _base(model.get_submodule(name)).weight
    heads = [head for head, module in walk_modules(model) if head != name and getattr(module, "weight", None) is weight]
    if config.ensure_weight_tying and not heads:
        warnings.warn(
            f"ensure_weight_tying=True but nothing in this model shares {name}'s weight; nothing to tie", stacklevel=4
        )
    ties = {}
    for head in heads:
        if head in targets and targets[head] != targets[name]:
            if config.ensure_weight_tying:
                raise ConfigError(
                    f"ensure_weight_tying=True but the tied {name} and {head} have different trainable_token_indices "
                    f"({targets[name]} and {targets[head]}); give both the same ids or set ensure_weight_tying=False"
                )
            continue
        if getattr(model.get_submodule(head), "is_delta_layer", False) and head not in targets:
            if not isinstance(model.get_submodule(head), TrainableTokensLayer):
                raise ConfigError(
                    f"{head} shares {name}'s weight (tied embeddings) and is already adapted (a LoRA target or in "
                    f"modules_to_save), so it cannot follow {name}'s trainable tokens; drop {head} from the adapter"
                )
        ties[head] = name
    return ties


def _layer_at(model: nn.Module, name: str) -> TrainableTokensLayer:
    module = model.get_submodule(name)
    if isinstance(module, TrainableTokensLayer):
        return module
    return replace_module(model, name, TrainableTokensLayer(module))


def _input_embedding_name(model: nn.Module, required: bool = True) -> str | None:
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    name = next((name for name, module in model.named_modules() if embedding is not None and module is embedding), None)
    if name is None and required:
        raise ConfigError(
            f"{type(model).__name__} has no input embedding (get_input_embeddings); give trainable_token_indices "
            f"as {{embedding module name: token ids}}"
        )
    return name


def _base(module: nn.Module | None) -> nn.Module | None:
    """The module as the user's model had it (any delta layer's base)."""
    return module.base_layer if getattr(module, "is_delta_layer", False) else module
