"""What prompt tuning, P-tuning and prefix tuning share: n virtual tokens the model attends to first.

::

    E [n, in] ──► head f (training only, optional) ──► prompt P [n, D] ──┬─► [P; E(x)] as inputs_embeds  (prompt.py)
                                                                          └─► K_p, V_p of every layer    (prefix.py)

The ``PromptEncoder`` of every adapter lives in one ``PromptLayer`` attached to the base model as
``prompt_encoder``, and a forward pre-hook on the base model rewrites the keyword arguments of each
call while an adapter is active. Because the hook sits on the base model itself, ``generate()``
needs nothing of its own: every forward call it makes passes the hook, which puts the prompt in on
the first call (no cache, or an empty one) and, once the prompt is in the cache, only extends the
attention mask and shifts the positions. As in peft, the virtual tokens take positions 0..n-1 and
the caller's tokens count from n; several active adapters are concatenated in activation order.

Files hold one tensor, ``prompt_embeddings`` = P, as peft writes it; an adapter trained through a
head is saved as its output and loads as those embeddings, without the head.

Starting from real tokens (``prompt_tuning_init`` "TEXT" / "SAMPLE_VOCAB"): ``init_token_ids`` gives
the n token ids; each method turns them into a start near the base model (prompt.py, prefix.py).
A head can then be residual, P = E + f(E), or sit on a fixed offset, P = P0 + f(E), its last layer
at zero (``zero_last_layer``), so that P starts at E or at P0.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoTokenizer

from deltatune.compat.transformers import CACHE
from deltatune.errors import ConfigError, InputError, TargetError
from deltatune.io import file_key_map
from deltatune.tuners.base import Tuner
from deltatune.tuners.prompt.config import PromptLearningConfig

ATTRIBUTE = "prompt_encoder"
PROMPT_KEY = "prompt_embeddings"
FILE_PREFIX = "base_model."  # peft's prompt-learning wrapper holds the model itself, not a tuner around it


def mlp(widths: Sequence[int], activation: type[nn.Module], dropout: float = 0.0) -> nn.Sequential:
    """Linear layers widths[0] -> widths[1] -> ... with ``activation`` (then dropout) between them."""
    layers: list[nn.Module] = []
    for index, (fan_in, fan_out) in enumerate(zip(widths, widths[1:])):
        if index:
            layers += [activation(), nn.Dropout(dropout)] if dropout else [activation()]
        layers.append(nn.Linear(fan_in, fan_out))
    return nn.Sequential(*layers)


class PromptEncoder(nn.Module):
    """One adapter's prompt P = f(E) [n, D] from trainable inputs E = ``embedding.weight`` [n, in].

    ``head`` f is the reparameterisation used in training (P-tuning's MLP/LSTM, prefix tuning's
    projection), or None when P is E itself. ``residual`` makes it P = E + f(E); ``offset`` P0 [n, D]
    (fixed, not trained) makes it P = P0 + f(E). P is computed on every call (f is small next to the model).
    """

    def __init__(
        self,
        embedding: nn.Embedding,
        head: nn.Module | None = None,
        residual: bool = False,
        offset: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.embedding = embedding
        self.head = head
        self.residual = residual
        self.register_buffer("offset", offset, persistent=False)

    def forward(self) -> torch.Tensor:
        # Computed on every call, never cached: a fused optimizer updates the weights in place without
        # bumping their version counters, so a cache keyed on them served a stale P after training steps.
        if self.head is None:
            return self.embedding.weight
        inputs = self.embedding.weight
        prompt = self.head(inputs[None])[0]
        if self.residual:
            prompt = prompt + inputs
        return prompt if self.offset is None else prompt + self.offset

    def value(self) -> torch.Tensor:
        """P as inference computes it (eval mode, no gradient): what a file stores."""
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                return self().detach().clone()
        finally:
            self.train(was_training)

    def drop_head(self) -> None:
        """Make P itself the embedding and drop the head: the form a saved file describes."""
        if self.head is not None:
            trainable = self.embedding.weight.requires_grad
            self.embedding = nn.Embedding.from_pretrained(self.value(), freeze=not trainable)
            self.head, self.residual, self.offset = None, False, None


def zero_last_layer(head: nn.Module) -> None:
    """Zero the weight and bias of ``head``'s last ``nn.Linear``, so that it outputs zeros."""
    last = [module for module in head.modules() if isinstance(module, nn.Linear)][-1]
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)


def starts_from_tokens(config: PromptLearningConfig) -> bool:
    """Whether a new (trainable) adapter of ``config`` starts from real tokens; a loaded file replaces any start."""
    return not config.inference_mode and config.prompt_tuning_init != "RANDOM"


def init_token_ids(model: nn.Module, config: PromptLearningConfig) -> torch.Tensor:
    """The n token ids ``config.prompt_tuning_init`` names, on the model's device: the text's tokens
    repeated or cut to n ("TEXT", peft's rule), or n uniform draws from the vocabulary ("SAMPLE_VOCAB")."""
    table = word_embeddings(model)
    count, device = config.num_virtual_tokens, table.weight.device
    if config.prompt_tuning_init == "SAMPLE_VOCAB":
        return torch.randint(0, table.num_embeddings, (count,), device=device)
    ids = _text_token_ids(config, table.num_embeddings)
    return torch.tensor((ids * math.ceil(count / len(ids)))[:count], device=device)


def _model_folder(model: nn.Module) -> str:
    """The local folder ``model`` was loaded from, where its tokenizer is expected."""
    folder = getattr(model, "name_or_path", "") or ""
    if not os.path.isdir(folder):
        raise ConfigError(
            "prompt_tuning_init='TEXT' needs tokenizer_name_or_path: the model was not loaded from a local folder; "
            "set it to the model's tokenizer folder"
        )
    return folder


def word_embeddings(model: nn.Module) -> nn.Embedding:
    """The model's input embedding table."""
    embeddings = model.get_input_embeddings()
    if not isinstance(embeddings, nn.Embedding):
        raise TargetError(f"{type(model).__name__} has no input embedding table; prompt methods need one")
    return embeddings


def _text_token_ids(config: PromptLearningConfig, vocab_size: int) -> list[int]:
    """The token ids of ``prompt_tuning_init_text``, read with the local tokenizer the config names."""
    options = {k: v for k, v in (config.tokenizer_kwargs or {}).items() if k != "trust_remote_code"}
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, local_files_only=True, **options)
    except (OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(
            f"tokenizer_name_or_path={config.tokenizer_name_or_path!r} cannot be read from local files ({reason}); "
            f"point it at a local tokenizer folder"
        ) from None
    ids = list(tokenizer(config.prompt_tuning_init_text)["input_ids"])
    if not ids:
        raise ConfigError("prompt_tuning_init_text gives no tokens; use a non-empty text")
    if max(ids) >= vocab_size:
        raise ConfigError(
            f"the tokenizer gives token id {max(ids)} but the model has {vocab_size} tokens; "
            f"use the model's own tokenizer"
        )
    return ids


class PromptLayer(nn.ModuleDict):
    """adapter name -> ``PromptEncoder``; hooked onto the base model, it adds the active prompts to every call.

    Subclasses say how a prompt enters a call (``add_prompt``) when it is not in the cache yet.
    """

    is_delta_layer = True
    base_layer = None  # an added module: it wraps nothing of the user's model

    def __init__(self) -> None:
        super().__init__()
        self.configs: dict[str, PromptLearningConfig] = {}
        self.active_adapters: list[str] = []
        self.disabled = False
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def adapter_names(self) -> list[str]:
        return list(self.keys())

    def add(self, name: str, config: PromptLearningConfig, encoder: PromptEncoder) -> None:
        self[name] = encoder
        self.configs[name] = config

    def delete(self, name: str) -> None:
        if name in self:
            del self[name]
            del self.configs[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def adapter_parameters(self, name: str):
        if name in self:
            for pname, param in self[name].named_parameters():
                yield f"{name}.{pname}", param

    def attach(self, model: nn.Module) -> None:
        """Start rewriting ``model``'s forward calls."""
        self._handles = [
            model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            model.register_forward_hook(self._after_forward, with_kwargs=True),
        ]

    def detach(self, model: nn.Module) -> None:
        """Stop rewriting ``model``'s forward calls."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def prompt(self) -> torch.Tensor | None:
        """The active adapters' prompts, concatenated [n, D]; None when none is active or all are disabled."""
        names = [] if self.disabled else self.active_adapters
        return torch.cat([self[name]() for name in names]) if names else None

    def add_prompt(self, model: nn.Module, prompt: torch.Tensor, kwargs: dict[str, Any]) -> None:
        """Put ``prompt`` into the call ``kwargs`` (in place); mask and positions are extended already."""
        raise NotImplementedError

    def _before_forward(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]):
        prompt = self.prompt()
        if prompt is None:
            return None
        kwargs = _by_name(model, args, kwargs)
        if "past_key_values" in kwargs:
            kwargs[CACHE] = kwargs.pop("past_key_values")
        count = prompt.shape[0]
        mask = kwargs.get("attention_mask")
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.ndim != 2:
                raise InputError("prompt methods need a 2-D attention_mask [batch, length] (1 = token, 0 = padding)")
            kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], count), mask], dim=1)
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + count
        cache = kwargs.get(CACHE)
        if cache is None or cache.get_seq_length() == 0:  # else the prompt is in the cache already
            self.add_prompt(model, prompt, kwargs)
        return (), kwargs

    def _after_forward(self, model: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any):
        """Tidy up after a call (subclasses); None keeps the output as it is."""
        return None


class PromptLearningTuner(Tuner):
    """Injects one ``PromptEncoder`` per adapter into the model's ``PromptLayer``; subclasses build the encoder."""

    config_class = PromptLearningConfig
    layer_class = PromptLayer

    def build_encoder(self, model: nn.Module, config: PromptLearningConfig) -> PromptEncoder:
        """The new adapter's encoder, for a config whose model fields are filled in."""
        raise NotImplementedError

    def describe_model(self, config: PromptLearningConfig, model: nn.Module) -> None:
        """Fill the config's model fields left at None from the model's config (as peft does) and check them."""
        shape = attention_shape(model)
        config.num_layers = config.num_layers or shape.layers
        config.token_dim = config.token_dim or shape.hidden
        config.num_attention_heads = config.num_attention_heads or shape.heads
        config.num_transformer_submodules = config.num_transformer_submodules or 1
        if config.prompt_tuning_init == "TEXT" and not config.tokenizer_name_or_path:
            config.tokenizer_name_or_path = _model_folder(model)

    def inject(self, model: nn.Module, config: PromptLearningConfig, adapter_name: str) -> None:
        if getattr(model.config, "is_encoder_decoder", False):
            raise ConfigError(
                f"{type(model).__name__} is an encoder-decoder model; prompt methods support decoder-only "
                f"and encoder-only models (use LoRA for this one)"
            )
        self.describe_model(config, model)
        encoder = self.build_encoder(model, config).to(model.get_input_embeddings().weight.device)
        layer = getattr(model, ATTRIBUTE, None)
        if layer is None:
            layer = self.layer_class()
            setattr(model, ATTRIBUTE, layer)
            layer.attach(model)
        elif not isinstance(layer, self.layer_class):
            raise TargetError(f"the model already has a module named {ATTRIBUTE!r}; prompt methods need that name")
        layer.add(adapter_name, config, encoder)

    def delete(self, model: nn.Module, adapter_name: str) -> None:
        layer = getattr(model, ATTRIBUTE)
        layer.delete(adapter_name)
        if not layer.adapter_names:
            self.unload(model)

    def unload(self, model: nn.Module) -> None:
        getattr(model, ATTRIBUTE).detach(model)
        delattr(model, ATTRIBUTE)

    def file_tensors(
        self, model: nn.Module, adapter_name: str, state: dict[str, nn.Parameter]
    ) -> dict[str, torch.Tensor]:
        """``prompt_embeddings`` = the adapter's prompt P (a head's output, never the head), plus the
        other saved modules (e.g. a classifier head) under peft's prompt-learning keys."""
        return {PROMPT_KEY: getattr(model, ATTRIBUTE)[adapter_name].value(), **_other_tensors(state, adapter_name)}

    def file_targets(
        self, model: nn.Module, adapter_name: str, state: dict[str, nn.Parameter]
    ) -> dict[str, nn.Parameter]:
        """Drops the adapter's head (a file holds P only), then maps ``prompt_embeddings`` to P's parameter."""
        encoder = getattr(model, ATTRIBUTE)[adapter_name]
        encoder.drop_head()
        return {PROMPT_KEY: encoder.embedding.weight, **_other_tensors(state, adapter_name)}


def _other_tensors(state: dict[str, nn.Parameter], adapter_name: str) -> dict[str, nn.Parameter]:
    """File key -> parameter for what an adapter saves besides its prompt encoder."""
    others = {name: param for name, param in state.items() if not name.startswith(ATTRIBUTE + ".")}
    return {key: others[name] for key, name in file_key_map(others, adapter_name, FILE_PREFIX).items()}


def _by_name(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A forward call's arguments as keywords (positional ones named after ``model.forward``'s parameters)."""
    if not args:
        return dict(kwargs)
    names = list(inspect.signature(model.forward).parameters)
    return {**dict(zip(names, args)), **kwargs}


@dataclass(frozen=True)
class AttentionShape:
    """The sizes of a model's attention that the prompt methods depend on."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int


def attention_shape(model: nn.Module) -> AttentionShape:
    """Layers, hidden size, (key/value) heads and head size from the model's (text) config."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = _first_attribute(text, "hidden_size", "n_embd", "d_model")
    heads = _first_attribute(text, "num_attention_heads", "n_head", "num_heads")
    return AttentionShape(
        layers=_first_attribute(text, "num_hidden_layers", "num_layers", "n_layer"),
        hidden=hidden,
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or hidden // heads,
    )


def _first_attribute(config: Any, *names: str) -> int:
    for name in names:
        if getattr(config, name, None) is not None:
            return getattr(config, name)
    raise ConfigError(f"the model config has none of {', '.join(names)}; set the field in the adapter config")
