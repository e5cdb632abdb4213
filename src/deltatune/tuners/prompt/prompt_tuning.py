"""Prompt tuning and P-tuning: n virtual token embeddings P [n, d] in front of the input embeddings.

::

    inputs_embeds  = [P; E(x)]          [batch, n + length, d]
    attention_mask = [1 ... 1; m]       labels = [-100 ... -100; y]

Prompt tuning (Lester et al., 2021, arXiv:2104.08691) trains P itself: n·d parameters. P-tuning
(Liu et al., 2021, arXiv:2103.10385) computes P = f(E) with a prompt encoder f over trainable
inputs E [n, d]: an MLP, or a bidirectional LSTM followed by an MLP (peft's layout); only P is saved.
Started from real tokens (``prompt_tuning_init`` "TEXT" / "SAMPLE_VOCAB"), P or E is those tokens'
embeddings, and P-tuning's encoder is residual, P = E + f(E) with f's last layer at zero: either
way the untrained model is the base model reading those tokens first.
The model's outputs are cut back to the caller's positions; its loss still counts the first token,
predicted from the last virtual one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.utils import ModelOutput

from deltatune.errors import ConfigError, InputError
from deltatune.tuners.prompt.config import (
    PromptEncoderConfig,
    PromptLearningConfig,
    PromptTuningConfig,
)
from deltatune.tuners.prompt.learning import (
    PromptEncoder,
    PromptLayer,
    PromptLearningTuner,
    init_token_ids,
    mlp,
    starts_from_tokens,
    word_embeddings,
    zero_last_layer,
)


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
            output["hidden_states"] = tuple(
                h[:, count:] if h.shape[1] == length else h for h in output["hidden_states"]
            )
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
        return PromptEncoder(token_embedding(model, config))


class PTuningTuner(VirtualTokenTuner):
    """P-tuning: P = f(E), f an MLP or LSTM prompt encoder (absent in inference mode, as in peft)."""

    config_class = PromptEncoderConfig

    def describe_model(self, config: PromptEncoderConfig, model: nn.Module) -> None:
        super().describe_model(config, model)
        config.encoder_hidden_size = config.encoder_hidden_size or config.token_dim

    def build_encoder(self, model: nn.Module, config: PromptEncoderConfig) -> PromptEncoder:
        """peft's encoder over a random E; started from tokens, a residual one with its last layer at zero."""
        embedding = token_embedding(model, config)
        if config.inference_mode:
            return PromptEncoder(embedding)
        dim, hidden = config.token_dim, config.encoder_hidden_size
        if config.encoder_reparameterization_type == "LSTM":
            head = LstmHead(dim, hidden, config.encoder_num_layers, config.encoder_dropout)
        else:
            head = mlp([dim, *[hidden] * config.encoder_num_layers, dim], nn.ReLU, config.encoder_dropout)
        residual = starts_from_tokens(config)
        if residual:
            zero_last_layer(head)
        return PromptEncoder(embedding, head, residual=residual)


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


def token_embedding(model: nn.Module, config: PromptLearningConfig) -> nn.Embedding:
    """Trainable virtual tokens [n, d]: the embeddings of ``init_token_ids`` when the adapter starts from
    tokens, else N(0, 1) draws (peft's random start; a loaded file replaces them)."""
    if not starts_from_tokens(config):
        return nn.Embedding(config.num_virtual_tokens, config.token_dim)
    rows = word_embeddings(model).weight[init_token_ids(model, config)]
    return nn.Embedding.from_pretrained(rows.detach().float(), freeze=False)
