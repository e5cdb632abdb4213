"""The prompt methods' configurations: prompt tuning, P-tuning (prompt encoder) and prefix tuning, with peft's
fields."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from deltatune.config import (
    DeltaConfig,
    check_bool,
    check_positive_int,
    check_probability,
    choice,
    modules_to_save_names,
    without_defaults,
)
from deltatune.errors import ConfigError

PROMPT_TUNING_INITS = ("RANDOM", "TEXT", "SAMPLE_VOCAB")


PROMPT_ENCODER_TYPES = ("MLP", "LSTM")


# The start every prompt method takes from real tokens. peft has these fields for prompt tuning only: P-tuning
# and prefix tuning write them to adapter_config.json only when set (peft ignores keys it does not know).
_PROMPT_INIT_KEYS = frozenset(
    {"prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path", "tokenizer_kwargs"}
)


# Prefix and P-tuning start from the frozen model reading this text (not peft's random start, which left the
# embedded model worse than untrained: docs/methods.md#starting-the-prompt-methods-at-the-base-model).
PROMPT_INIT_TEXT = (
    "Answer the user's question helpfully, briefly and correctly, in one or two clear, friendly sentences."
)
TEXT_START = {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": PROMPT_INIT_TEXT}


@dataclass
class PromptLearningConfig(DeltaConfig):
    """What the prompt methods share (peft's ``PromptLearningConfig``): n virtual tokens the model attends to.

    ``num_virtual_tokens`` is the one choice to make. ``token_dim``, ``num_layers``,
    ``num_attention_heads`` and ``num_transformer_submodules`` describe the model: left at None they
    are filled from the model's config when the adapter is injected (as peft does), so a saved
    ``adapter_config.json`` records them. Encoder-decoder models are not supported.

    Every method can start from n real tokens (``prompt_tuning_init``): the tokens of a text, or
    tokens drawn from the vocabulary. What "start from" means is the method's own (see its class);
    the tokens are the text's, repeated or cut to n (peft's rule), or n uniform draws.

    Args:
        num_virtual_tokens: n, the virtual tokens (prompt tuning, P-tuning) or prefix positions per layer.
        token_dim: width of one virtual token: the hidden size (prefix tuning: kv_heads * head_dim).
        num_transformer_submodules: 1 (decoder-only or encoder-only model).
        num_attention_heads: attention heads (prefix tuning: key/value heads).
        num_layers: transformer layers.
        modules_to_save: extra modules trained in full and saved with the adapter (e.g. a new head).
        prompt_tuning_init: "RANDOM" (peft's random start), "TEXT" (the tokens of
            ``prompt_tuning_init_text``) or "SAMPLE_VOCAB" (n tokens drawn uniformly from the vocabulary).
        prompt_tuning_init_text: the text for "TEXT".
        tokenizer_name_or_path: the tokenizer for "TEXT": a local folder (or a hub name already in the
            local cache); it is read with ``local_files_only=True``, never downloaded. P-tuning and
            prefix tuning default to the folder the model was loaded from (prompt tuning requires it, as peft).
        tokenizer_kwargs: extra ``AutoTokenizer.from_pretrained`` arguments for "TEXT"
            (``trust_remote_code`` is dropped).
    """

    # Fields written to adapter_config.json only when they differ from their default.
    optional_keys: ClassVar[frozenset[str]] = _PROMPT_INIT_KEYS
    # Whether "TEXT" needs tokenizer_name_or_path here; else it is the model's folder, filled in at injection.
    text_needs_tokenizer: ClassVar[bool] = False

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = None
    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("num_virtual_tokens", self.num_virtual_tokens)
        for name in ("token_dim", "num_attention_heads", "num_layers", "encoder_hidden_size"):
            if getattr(self, name, None) is not None:
                check_positive_int(name, getattr(self, name))
        if self.num_transformer_submodules not in (None, 1) or self.task_type == "SEQ_2_SEQ_LM":
            raise ConfigError(
                "prompt methods support decoder-only and encoder-only models, not encoder-decoder ones "
                "(task_type SEQ_2_SEQ_LM, num_transformer_submodules=2); use LoRA for those"
            )
        self.modules_to_save = modules_to_save_names(self.modules_to_save)
        self.prompt_tuning_init = choice("prompt_tuning_init", self.prompt_tuning_init, PROMPT_TUNING_INITS)
        if self.prompt_tuning_init == "TEXT" and not self.prompt_tuning_init_text:
            raise ConfigError(
                "prompt_tuning_init='TEXT' needs prompt_tuning_init_text; set it to a text describing the task"
            )
        if self.prompt_tuning_init == "TEXT" and self.text_needs_tokenizer and not self.tokenizer_name_or_path:
            raise ConfigError(
                "prompt_tuning_init='TEXT' needs prompt_tuning_init_text and tokenizer_name_or_path "
                "(a local tokenizer folder); set both"
            )
        if self.tokenizer_kwargs and self.prompt_tuning_init != "TEXT":
            raise ConfigError("tokenizer_kwargs is only used with prompt_tuning_init='TEXT'; remove it")

    def to_dict(self) -> dict[str, Any]:
        """peft's keys, and the ``optional_keys`` that differ from their default."""
        return without_defaults(self, super().to_dict(), self.optional_keys)


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning (Lester et al., 2021, arXiv:2104.08691): inputs_embeds = [P; E(x)], P [n, d] trainable.

    Trains n·d parameters; the base model is untouched. Outputs stay aligned with the caller's
    ``input_ids`` (the n virtual positions are cut from logits and hidden states).

    ``prompt_tuning_init`` (peft's field): "RANDOM" (N(0, 1) entries), "TEXT" or "SAMPLE_VOCAB"
    (P starts as those tokens' embeddings, so the model starts as the base model reading them first).
    """

    peft_type: ClassVar[str] = "PROMPT_TUNING"
    train_defaults: ClassVar[dict[str, Any]] = {"num_virtual_tokens": 40}
    run_defaults: ClassVar[dict[str, Any]] = {"learning_rate": 1e-1}
    optional_keys: ClassVar[frozenset[str]] = frozenset()  # peft's own fields: always written
    text_needs_tokenizer: ClassVar[bool] = True  # peft refuses a "TEXT" config without one


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning (Liu et al., 2021, arXiv:2103.10385): inputs_embeds = [f(E); E(x)], E [n, d] and the encoder f
    trainable.

    f is an MLP d -> h -> ... -> h -> d (ReLU) or a bidirectional LSTM (d -> 2h) followed by an MLP
    2h -> 2h -> d. Like peft, only the prompt f(E) [n, d] is saved: an adapter loaded from a file
    holds those embeddings directly, without the encoder (further training then tunes them directly).

    With ``prompt_tuning_init`` "TEXT" or "SAMPLE_VOCAB" (deltatune's; peft's P-tuning starts at
    random) E starts as those tokens' embeddings and the encoder is residual, P = E + f(E), with
    f's last layer at zero: the model starts as the base model reading those tokens first. The file
    still holds P alone, so peft loads it.

    Args:
        encoder_reparameterization_type: "MLP" or "LSTM".
        encoder_hidden_size: h (default: token_dim).
        encoder_num_layers: hidden layers of the MLP (peft always uses 2, the default) or LSTM layers.
        encoder_dropout: dropout after each hidden layer of the MLP, between LSTM layers.
    """

    peft_type: ClassVar[str] = "P_TUNING"
    train_defaults: ClassVar[dict[str, Any]] = {"num_virtual_tokens": 20, **TEXT_START}
    run_defaults: ClassVar[dict[str, Any]] = {"learning_rate": 1e-2, "warmup_steps": 15}

    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.encoder_reparameterization_type = choice(
            "encoder_reparameterization_type", self.encoder_reparameterization_type, PROMPT_ENCODER_TYPES
        )
        check_positive_int("encoder_num_layers", self.encoder_num_layers)
        check_probability("encoder_dropout", self.encoder_dropout)


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning (Li & Liang, 2021, arXiv:2101.00190): each layer attends over [K_p; K] and [V_p; V].

    K_p, V_p [kv_heads, n, head_dim] per layer are trainable: n · num_layers · 2 · kv_dim parameters
    (kv_dim = kv_heads · head_dim, so grouped-query models get smaller prefixes). With
    ``prefix_projection`` they are the output of an MLP over n embeddings, token_dim -> h (tanh) ->
    num_layers · 2 · kv_dim, the paper's reparameterisation for stabler training; like peft, only
    that output is saved, so an adapter loaded from a file holds the prefix directly.

    With ``prompt_tuning_init`` "TEXT" or "SAMPLE_VOCAB" (deltatune's; Li & Liang's init from real
    words) the prefix starts as the frozen model's own keys and values for those n tokens, so the
    model starts as the base model reading them first. With ``prefix_projection`` the prefix is then
    P0 + MLP(E), P0 those activations held fixed and the MLP's last layer at zero. Files hold P alone.

    Args:
        encoder_hidden_size: h of the projection MLP (default: token_dim).
        prefix_projection: train through the MLP reparameterisation.
        init_weights: None (random prefix) or "zero" (zero prefix, or zero last projection layer);
            only with ``prompt_tuning_init="RANDOM"``.
    """

    peft_type: ClassVar[str] = "PREFIX_TUNING"
    train_defaults: ClassVar[dict[str, Any]] = {"num_virtual_tokens": 20, **TEXT_START}
    run_defaults: ClassVar[dict[str, Any]] = {"learning_rate": 1e-2}

    init_weights: str | None = None
    encoder_hidden_size: int | None = None
    prefix_projection: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bool("prefix_projection", self.prefix_projection)
        if self.init_weights is not None:
            self.init_weights = choice("init_weights", self.init_weights, ("zero",))
            if self.prompt_tuning_init != "RANDOM":
                raise ConfigError(
                    f"init_weights='zero' and prompt_tuning_init={self.prompt_tuning_init!r} are two starts for "
                    f"the prefix; set one of them"
                )
