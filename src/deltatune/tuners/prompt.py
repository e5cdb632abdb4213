"""Prompt tuning and P-tuning: n virtual token embeddings P [n, d] in front of the input embeddings.

::

    inputs_embeds  = [P; E(x)]          [batch, n + length, d]
    attention_mask = [1 ... 1; m]       labels = [-100 ... -100; y]

Prompt tuning (Lester et al., 2021, arXiv:2104.08691) trains P itself: n·d parameters. P-tuning
(Liu et al., 2021, arXiv:2103.10385) computes P = f(E) with a prompt encoder f over trainable
inputs E [n, d]: an MLP, or a bidirectional LSTM followed by an MLP (peft's layout); only P is saved.
The model's outputs are cut back to the caller's positions; its loss still counts the first token,
predicted from the last virtual one.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers import AutoTokenizer
from transformers.utils import ModelOutput

from ..config import PromptEncoderConfig, PromptLearningConfig, PromptTuningConfig
from ..errors import ConfigError, InputError, TargetError
from .prompt_learning import PromptEncoder, PromptLayer, PromptLearningTuner, mlp


class VirtualTokenLayer(PromptLayer):
    """Puts the prompt in front of the input embeddings, the labels (-100), token types and positions,
    and cuts it from the sequence outputs again."""

    def __init__(self) -> None:
        super().__init__()
        self._cut: tuple[int, int] | None = None  # (n, n + length) of the call's outputs, set by add_prompt

    def add_prompt(self, model: nn.Module, prompt: torch.Tensor, kwargs: dict[str, Any]) -> None:
        if kwargs.get("return_dict") is False:
            raise InputError("prompt and P-tuning cut the virtual positions from named outputs; drop return_dict=False")
        ids, embeds = kwargs.pop("input_ids", None), kwargs.pop("inputs_embeds", None)
        if embeds is None:
            if ids is None:
                raise InputError("the model got neither input_ids nor inputs_embeds; pass one of them")
            embeds = model.get_input_embeddings()(ids)
        (batch, length), count = embeds.shape[:2], prompt.shape[0]
        kwargs["inputs_embeds"] = torch.cat([prompt.to(embeds.dtype).expand(batch, -1, -1), embeds], dim=1)
        labels = kwargs.get("labels")
        if labels is not None and labels.ndim == 2 and labels.shape[1] == length and not labels.is_floating_point():
            kwargs["labels"] = torch.cat([labels.new_full((batch, count), -100), labels], dim=1)
        if kwargs.get("token_type_ids") is not None:
            types = kwargs["token_type_ids"]
            kwargs["token_type_ids"] = torch.cat([types.new_zeros(types.shape[0], count), types], dim=1)
        if kwargs.get("position_ids") is not None:  # the caller's positions, already shifted by n
            positions = kwargs["position_ids"]
            virtual = torch.arange(count, device=positions.device).expand(positions.shape[0], count)
            kwargs["position_ids"] = torch.cat([virtual, positions], dim=1)
        self._cut = (count, count + length)

    def _after_forward(self, model: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any):
        """Cut the virtual positions from sequence outputs, so they line up with the caller's tokens."""
        cut, self._cut = self._cut, None
        if cut is None or not isinstance(output, ModelOutput):
            return None
        count, length = cut
        for key in ("logits", "last_hidden_state"):
            value = output.get(key)
            if isinstance(value, torch.Tensor) and value.ndim >= 3 and value.shape[1] == length:
                output[key] = value[:, count:]
        if output.get("hidden_states") is not None:
            output["hidden_states"] = tuple(h[:, count:] if h.shape[1] == length else h for h in output["hidden_states"])
        return output


class VirtualTokenTuner(PromptLearningTuner):
    """What prompt tuning and P-tuning share: the virtual tokens are as wide as the token embeddings."""

    layer_class = VirtualTokenLayer

    def describe_model(self, config: PromptLearningConfig, model: nn.Module) -> None:
        super().describe_model(config, model)
        width = word_embeddings(model).embedding_dim
        if config.token_dim != width:
            raise ConfigError(
                f"token_dim={config.token_dim} but the model's token embeddings are {width} wide; "
                f"wrong base model, or leave token_dim unset"
            )


class PromptTuningTuner(VirtualTokenTuner):
    """Prompt tuning: P is the trainable embedding itself."""

    config_class = PromptTuningConfig

    def build_encoder(self, model: nn.Module, config: PromptTuningConfig) -> PromptEncoder:
        count, dim = config.num_virtual_tokens, config.token_dim
        if config.inference_mode or config.prompt_tuning_init == "RANDOM":  # a loaded file replaces it
            return PromptEncoder(nn.Embedding(count, dim))
        table = word_embeddings(model)
        if config.prompt_tuning_init == "SAMPLE_VOCAB":
            ids = torch.randint(0, table.num_embeddings, (count,), device=table.weight.device)
        else:
            ids = torch.tensor(_text_token_ids(config, table.num_embeddings), device=table.weight.device)
        return PromptEncoder(nn.Embedding.from_pretrained(table.weight[ids].detach().float(), freeze=False))


class PTuningTuner(VirtualTokenTuner):
    """P-tuning: P = f(E), f an MLP or LSTM prompt encoder (absent in inference mode, as in peft)."""

    config_class = PromptEncoderConfig

    def describe_model(self, config: PromptEncoderConfig, model: nn.Module) -> None:
        super().describe_model(config, model)
        config.encoder_hidden_size = config.encoder_hidden_size or config.token_dim

    def build_encoder(self, model: nn.Module, config: PromptEncoderConfig) -> PromptEncoder:
        dim, hidden = config.token_dim, config.encoder_hidden_size
        embedding = nn.Embedding(config.num_virtual_tokens, dim)
        if config.inference_mode:
            return PromptEncoder(embedding)
        if config.encoder_reparameterization_type == "LSTM":
            return PromptEncoder(embedding, LstmHead(dim, hidden, config.encoder_num_layers, config.encoder_dropout))
        widths = [dim, *[hidden] * config.encoder_num_layers, dim]
        return PromptEncoder(embedding, mlp(widths, nn.ReLU, config.encoder_dropout))


class LstmHead(nn.Module):
    """peft's LSTM prompt encoder: a bidirectional LSTM d -> 2h, then an MLP 2h -> 2h -> d (ReLU)."""

    def __init__(self, dim: int, hidden: int, layers: int, dropout: float) -> None:
        super().__init__()
        self.lstm_head = nn.LSTM(
            dim, hidden, num_layers=layers, dropout=dropout if layers > 1 else 0.0, bidirectional=True, batch_first=True
        )
        self.mlp_head = mlp([2 * hidden, 2 * hidden, dim], nn.ReLU)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.mlp_head(self.lstm_head(inputs)[0])


def word_embeddings(model: nn.Module) -> nn.Embedding:
    """The model's input embedding table."""
    embeddings = model.get_input_embeddings()
    if not isinstance(embeddings, nn.Embedding):
        raise TargetError(f"{type(model).__name__} has no input embedding table; prompt methods need one")
    return embeddings


def _text_token_ids(config: PromptTuningConfig, vocab_size: int) -> list[int]:
    """The token ids of ``prompt_tuning_init_text``, repeated or cut to n (peft's rule)."""
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
    count = config.num_virtual_tokens
    return (ids * math.ceil(count / len(ids)))[:count]
