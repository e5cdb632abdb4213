"""Adapter configurations: dataclasses with peft's field names, validated at construction.

A config is pure data. It round-trips through ``adapter_config.json`` in peft's layout
(indent 2, sorted keys, only keys peft knows), so files written here load in peft and vLLM,
and files written by peft load here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import ConfigError

CONFIG_NAME = "adapter_config.json"

TASK_TYPES = (
    "CAUSAL_LM",
    "SEQ_CLS",
    "SEQ_2_SEQ_LM",
    "TOKEN_CLS",
    "QUESTION_ANS",
    "FEATURE_EXTRACTION",
)

# Keys peft writes for its own bookkeeping; they carry no meaning for the adapter itself.
_INFORMATIONAL_KEYS = frozenset({"peft_version", "auto_mapping"})


@dataclass
class DeltaConfig:
    """Fields shared by every method (peft's ``PeftConfig``)."""

    peft_type: ClassVar[str] = ""

    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False

    def __post_init__(self) -> None:
        _check_bool("inference_mode", self.inference_mode)
        if self.task_type is not None:
            self.task_type = str(self.task_type).upper()
            if self.task_type not in TASK_TYPES:
                raise ConfigError(
                    f"task_type={self.task_type!r} is unknown; use one of {', '.join(TASK_TYPES)} or None"
                )

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready dict peft writes: every field plus ``peft_type``."""
        data = {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        data["peft_type"] = self.peft_type
        return data

    def save(self, directory: str | os.PathLike) -> None:
        """Write ``adapter_config.json`` into ``directory`` (which must exist)."""
        with open(os.path.join(directory, CONFIG_NAME), "w", encoding="utf-8") as handle:
            handle.write(self.to_json())

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeltaConfig:
        """Build the config a dict describes, accepting peft's extra keys when they are unset.

        peft writes dozens of keys for features deltatune does not have (``use_dora``,
        ``loftq_config``, ...). A key left at its neutral value (None, False, {}, [], "") is
        ignored; a key that turns an unsupported feature on is an error, never silently dropped.
        """
        data = dict(data)
        peft_type = data.pop("peft_type", cls.peft_type)
        config_cls = config_class_for(peft_type) if cls is DeltaConfig else cls
        if peft_type != config_cls.peft_type:
            raise ConfigError(f"adapter config has peft_type={peft_type!r}, expected {config_cls.peft_type!r}")
        known = {f.name for f in dataclasses.fields(config_cls)}
        kwargs = {key: value for key, value in data.items() if key in known}
        for key, value in data.items():
            if key in known or key in _INFORMATIONAL_KEYS or value in (None, False, {}, [], ""):
                continue
            raise ConfigError(
                f"adapter config sets {key}={value!r}, a peft feature deltatune does not support; "
                f"remove the key or use peft for this adapter"
            )
        return config_cls(**kwargs)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> DeltaConfig:
        """Read ``adapter_config.json`` from ``directory``."""
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise ConfigError(f"no {CONFIG_NAME} in {directory}; is this an adapter directory?")
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a JSON object, got {type(data).__name__}")
        return cls.from_dict(data)


# peft LoraConfig fields deltatune refuses when they are set, each with the reason (README's options table
# is generated from this and ``LORA_INIT_REFUSALS``). A field at its neutral value (None, False, {}) is fine.
LORA_REFUSALS: dict[str, str] = {
    "megatron_config": "Megatron-LM tensor-parallel layers are not supported; train with peft on Megatron, or "
    "convert the model to transformers first",
    "velora_config": "VeLoRA (compressed activations) is not supported; deltatune's fused path already keeps "
    "only x and the rank-r products for backward",
    "monteclora_config": "MonteCLoRA (Monte Carlo sampled adapters) is not supported",
    "kasa_config": "KaSA (singular-value adaptation of the base weight) is not supported",
    "use_bdlora": "BD-LoRA (block-diagonal factors for sharded serving) is not supported",
    "arrow_config": "Arrow routing between several LoRA experts is not supported",
    "alora_invocation_tokens": "activated LoRA (aLoRA: the adapter switched on after invocation tokens) is not "
    "supported",
    "use_qalora": "QA-LoRA (group-pooled inputs for GPTQ bases) is not supported",
    "layer_replication": "layer replication (stacking shared copies of decoder layers) is not supported",
    "runtime_config": "ephemeral_gpu_offload is not supported; keep the model on one device",
}

# init_lora_weights values deltatune refuses, each with the reason.
LORA_INIT_REFUSALS: dict[str, str] = {
    "mica": "MiCA changes the forward pass (minor singular components, frozen B) and is not supported",
    "loftq": "LoftQ needs a quantised base model and its NF4 quantiser (bitsandbytes), which deltatune does not "
    "have; run peft's LoftQ and load the result, or use init_lora_weights='pissa' on the unquantised model",
    "eva": "EVA needs a data-driven initialisation pass over a dataloader, which deltatune does not have; use "
    "init_lora_weights=True",
    "corda": "CorDA needs a data pass collecting each layer's input covariance, which deltatune does not have; use "
    "init_lora_weights='pissa'",
    "lora_ga": "LoRA-GA needs a pass estimating full-weight gradients over a dataloader, which deltatune does not "
    "have; use init_lora_weights=True",
}

# peft's neutral values of the fields above; any other value turns the feature on.
_NEUTRAL = (None, False, {}, [], "", {"ephemeral_gpu_offload": False})


@dataclass
class LoraConfig(DeltaConfig):
    """LoRA (Hu et al., 2021): ``W = W0 + (alpha / r) * B @ A``, A: [r, in], B: [out, r], B = 0 at start.

    Args:
        r: rank of the update; the paper finds r in 1..8 often enough for attention weights.
        lora_alpha: scale numerator; the update is multiplied by ``lora_alpha / r``
            (``lora_alpha / sqrt(r)`` with ``use_rslora``), so changing r keeps the step size.
        lora_dropout: dropout probability on the adapter's input path only.
        target_modules: module names (exact full name or "."-suffix), a regex string fullmatched
            against the full module name, or ``"all-linear"``; None picks per-architecture defaults.
        exclude_modules: same matching rules as ``target_modules``, removed from the targets.
        bias: "none", "all" (train every bias of the model) or "lora_only" (biases of adapted layers).
        fan_in_fan_out: the base weight is stored [in, out] (GPT-2 ``Conv1D``); set automatically.
        modules_to_save: extra modules trained in full and saved with the adapter (e.g. a new head).
        init_lora_weights: True (Kaiming-uniform A, zero B), "gaussian" (normal A, std 1/r), False
            (random A and B: the model changes at once; for tests), or, on Linear/Conv1D layers only:
            "pissa" / "pissa_niter_<n>" (top-r singular vectors of W0, full or randomised SVD) and
            "olora" (QR of W0), both of which also replace W0 by the residual W0 - s·BA (the output at
            step 0 is the base model's; save/ship that residual base with the adapter, or convert the
            trained adapter to a plain rank-2r LoRA for the original base with
            ``save_pretrained(..., convert_to_lora_from=<initial adapter dir>)``), or "orthogonal"
            (nonzero A and B with BA = 0; even r). Numerics match peft 0.21 (``tuners/lora_init.py``).
            As in peft, a saved file keeps the method's name, and loading it re-runs the method on
            the base given: set ``init_lora_weights=True`` before saving an adapter meant to be
            loaded onto its residual base. "loftq", "eva", "corda", "lora_ga" and "mica" are refused
            (``LORA_INIT_REFUSALS`` says why), and so are their ``*_config`` fields.
        use_rslora: rank-stabilised scaling ``alpha / sqrt(r)``.
        layers_to_transform: adapt only these layer indices.
        layers_pattern: name of the layer list (e.g. "layers", "h") used to find the layer index.
        rank_pattern / alpha_pattern: per-module overrides, keys are regexes matched as suffixes.
        use_dora: DoRA (Liu et al., 2024, arXiv:2402.09353): ``W = m ⊙ (W0 + s·BA) / ||W0 + s·BA||``
            with a trainable magnitude m per output row (the norm is a constant for the gradient).
        lora_bias: B gets a trainable bias (merged into the base layer's bias).
        trainable_token_indices: train only these rows of the input embedding (a list of token ids, or
            {embedding module name: ids}); the rows are saved with the adapter.
        target_parameters: LoRA on raw ``nn.Parameter``s by name (e.g. the fused expert weights of a
            mixture-of-experts layer), where there is no ``nn.Linear`` to wrap.
        ensure_weight_tying: keep tied input/output embeddings tied for ``modules_to_save`` and
            ``trainable_token_indices``.

    Every other peft field is accepted by name; one that turns on a feature deltatune does not have
    raises a ``ConfigError`` naming it (``LORA_REFUSALS``).
    """

    peft_type: ClassVar[str] = "LORA"

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    bias: str = "none"
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    use_rslora: bool = False
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    # Fields below are written to adapter_config.json only when set, so files stay loadable by older peft.
    use_dora: bool = False
    lora_bias: bool = False
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    target_parameters: list[str] | None = None
    ensure_weight_tying: bool = False
    loftq_config: dict[str, Any] = field(default_factory=dict)
    eva_config: dict[str, Any] | None = None
    corda_config: dict[str, Any] | None = None
    lora_ga_config: dict[str, Any] | None = None
    megatron_config: dict[str, Any] | None = None
    megatron_core: str | None = "megatron.core"
    velora_config: dict[str, Any] | None = None
    monteclora_config: dict[str, Any] | None = None
    kasa_config: dict[str, Any] | None = None
    use_bdlora: dict[str, Any] | None = None
    arrow_config: dict[str, Any] | None = None
    alora_invocation_tokens: list[int] | None = None
    use_qalora: bool = False
    qalora_group_size: int = 16
    layer_replication: list[list[int]] | None = None
    runtime_config: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive_int("r", self.r)
        _check_positive_number("lora_alpha", self.lora_alpha)
        for name in ("fan_in_fan_out", "use_rslora", "use_dora", "lora_bias", "ensure_weight_tying"):
            _check_bool(name, getattr(self, name))
        _check_probability("lora_dropout", self.lora_dropout)
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"bias={self.bias!r} is unknown; use 'none', 'all' or 'lora_only'")
        for name, reason in LORA_REFUSALS.items():
            value = _jsonable(getattr(self, name))
            if value not in _NEUTRAL:
                raise ConfigError(f"{name}={value!r} is not supported by deltatune: {reason}")
        self.init_lora_weights = _lora_init(self.init_lora_weights)
        for method in ("loftq", "eva", "corda", "lora_ga"):  # each refused method's own options field
            name = f"{method}_config"
            value = _jsonable(getattr(self, name))
            if value not in _NEUTRAL:
                raise ConfigError(
                    f"{name}={value!r} is not supported by deltatune (it configures init_lora_weights={method!r}): "
                    f"{LORA_INIT_REFUSALS[method]}"
                )
        if self.lora_bias and self.init_lora_weights not in (True, False):
            raise ConfigError(
                f"lora_bias=True needs init_lora_weights=True or False (got {self.init_lora_weights!r}), as in peft"
            )
        if self.lora_bias and self.use_dora:
            raise ConfigError("lora_bias=True does not combine with use_dora=True (as in peft); set one of them")
        self.target_modules = _module_names("target_modules", self.target_modules)
        self.exclude_modules = _module_names("exclude_modules", self.exclude_modules)
        self.modules_to_save = _modules_to_save(self.modules_to_save)
        self.trainable_token_indices = _token_indices(self.trainable_token_indices)
        self.target_parameters = _parameter_names(self.target_parameters)
        self.layers_to_transform = _layer_indices(self.layers_to_transform)
        if self.layers_to_transform is not None and isinstance(self.target_modules, str):
            raise ConfigError("layers_to_transform cannot be used with a regex target_modules; put the layers in the regex")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("layers_pattern is only used with layers_to_transform; set both or neither")
        self.rank_pattern = _pattern("rank_pattern", self.rank_pattern)
        self.alpha_pattern = _pattern("alpha_pattern", self.alpha_pattern)
        for key, value in self.rank_pattern.items():
            _check_regex("rank_pattern key", key)
            _check_positive_int(f"rank_pattern[{key!r}]", value)
        for key, value in self.alpha_pattern.items():
            _check_regex("alpha_pattern key", key)
            _check_positive_number(f"alpha_pattern[{key!r}]", value)

    def to_dict(self) -> dict[str, Any]:
        """peft's keys; the ones after ``alpha_pattern`` only when they differ from their default."""
        data = super().to_dict()
        optional = [f for f in dataclasses.fields(self) if f.name in _OPTIONAL_LORA_KEYS]
        for f in optional:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if data[f.name] == _jsonable(default):
                del data[f.name]
        return data

    def scaling(self, rank: int, alpha: float) -> float:
        """The factor in front of B @ A: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


BOTTLENECK_PLACEMENTS = ("houlsby", "pfeiffer")
# Activation names, looked up in transformers' ACT2FN as AdapterHub does (parameter-free ones only).
NON_LINEARITIES = ("relu", "gelu", "gelu_new", "silu", "swish", "tanh", "sigmoid", "leaky_relu", "mish")
BOTTLENECK_INITS = ("kaiming", "normal")


@dataclass
class BottleneckConfig(DeltaConfig):
    """Bottleneck adapters (Houlsby et al., 2019, arXiv:1902.00751): ``y + s * up(act(down(y)))``.

    y is the output of a sub-block (attention or MLP) of width d; down: d -> m, up: m -> d, both
    with biases, m << d, so each adapted site trains 2·d·m + d + m parameters. ``up`` starts at
    zero, so the adapted model computes exactly what the base model does until training moves it.
    Field names follow AdapterHub; peft has no bottleneck adapters, so the files are deltatune's own
    format (docs/formats.md). An adapter adds a non-linearity and cannot be merged into the weights.

    Args:
        reduction_factor: m = d // reduction_factor (AdapterHub's default 16).
        bottleneck_size: an explicit m for every site; overrides ``reduction_factor``.
        placement: "houlsby" (after the attention block and after the MLP of every layer) or
            "pfeiffer" (after the MLP only; Pfeiffer et al., 2021, arXiv:2005.00247).
        non_linearity: the activation between down and up, a transformers ``ACT2FN`` name
            ("relu", "gelu", "silu"/"swish", "tanh", ...).
        dropout: dropout probability on the adapter's output, before the residual sum.
        scaling: s, a constant factor on the adapter's output.
        init_weights: the down-projection's start: "kaiming" (Kaiming-uniform, as ``nn.Linear``) or
            "normal" (N(0, 0.01²) truncated at ±0.02, the paper's near-identity init); biases and
            the up-projection start at zero either way.
        layers_to_transform: adapt only these layer indices.
        modules_to_save: extra modules trained in full and saved with the adapter (e.g. a new head).
    """

    peft_type: ClassVar[str] = "BOTTLENECK"

    reduction_factor: float = 16
    bottleneck_size: int | None = None
    placement: str = "houlsby"
    non_linearity: str = "relu"
    dropout: float = 0.0
    scaling: float = 1.0
    init_weights: str = "kaiming"
    layers_to_transform: list[int] | int | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive_number("reduction_factor", self.reduction_factor)
        if self.bottleneck_size is not None:
            _check_positive_int("bottleneck_size", self.bottleneck_size)
        self.placement = _choice("placement", self.placement, BOTTLENECK_PLACEMENTS)
        self.non_linearity = _choice("non_linearity", self.non_linearity, NON_LINEARITIES)
        self.init_weights = _choice("init_weights", self.init_weights, BOTTLENECK_INITS)
        _check_probability("dropout", self.dropout)
        _check_positive_number("scaling", self.scaling)
        self.layers_to_transform = _layer_indices(self.layers_to_transform)
        self.modules_to_save = _modules_to_save(self.modules_to_save)

    def bottleneck_width(self, features: int) -> int:
        """m for a site of width d: ``bottleneck_size``, else ``d // reduction_factor``."""
        width = self.bottleneck_size or int(features // self.reduction_factor)
        if width < 1:
            raise ConfigError(
                f"reduction_factor={self.reduction_factor!r} leaves no bottleneck units for width {features}; "
                f"use a reduction_factor <= {features} or set bottleneck_size"
            )
        return width


PROMPT_TUNING_INITS = ("RANDOM", "TEXT", "SAMPLE_VOCAB")
PROMPT_ENCODER_TYPES = ("MLP", "LSTM")
# The start every prompt method takes from real tokens. peft has these fields for prompt tuning only: P-tuning
# and prefix tuning write them to adapter_config.json only when set (peft ignores keys it does not know).
_PROMPT_INIT_KEYS = frozenset(
    {"prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path", "tokenizer_kwargs"}
)


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
        _check_positive_int("num_virtual_tokens", self.num_virtual_tokens)
        for name in ("token_dim", "num_attention_heads", "num_layers", "encoder_hidden_size"):
            if getattr(self, name, None) is not None:
                _check_positive_int(name, getattr(self, name))
        if self.num_transformer_submodules not in (None, 1) or self.task_type == "SEQ_2_SEQ_LM":
            raise ConfigError(
                "prompt methods support decoder-only and encoder-only models, not encoder-decoder ones "
                "(task_type SEQ_2_SEQ_LM, num_transformer_submodules=2); use LoRA for those"
            )
        self.modules_to_save = _modules_to_save(self.modules_to_save)
        self.prompt_tuning_init = _choice("prompt_tuning_init", self.prompt_tuning_init, PROMPT_TUNING_INITS)
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
        return _without_defaults(self, super().to_dict(), self.optional_keys)


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning (Lester et al., 2021, arXiv:2104.08691): inputs_embeds = [P; E(x)], P [n, d] trainable.

    Trains n·d parameters; the base model is untouched. Outputs stay aligned with the caller's
    ``input_ids`` (the n virtual positions are cut from logits and hidden states).

    ``prompt_tuning_init`` (peft's field): "RANDOM" (N(0, 1) entries), "TEXT" or "SAMPLE_VOCAB"
    (P starts as those tokens' embeddings, so the model starts as the base model reading them first).
    """

    peft_type: ClassVar[str] = "PROMPT_TUNING"
    optional_keys: ClassVar[frozenset[str]] = frozenset()  # peft's own fields: always written
    text_needs_tokenizer: ClassVar[bool] = True  # peft refuses a "TEXT" config without one


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning (Liu et al., 2021, arXiv:2103.10385): inputs_embeds = [f(E); E(x)], E [n, d] and the encoder f trainable.

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

    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.encoder_reparameterization_type = _choice(
            "encoder_reparameterization_type", self.encoder_reparameterization_type, PROMPT_ENCODER_TYPES
        )
        _check_positive_int("encoder_num_layers", self.encoder_num_layers)
        _check_probability("encoder_dropout", self.encoder_dropout)


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

    init_weights: str | None = None
    encoder_hidden_size: int | None = None
    prefix_projection: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_bool("prefix_projection", self.prefix_projection)
        if self.init_weights is not None:
            self.init_weights = _choice("init_weights", self.init_weights, ("zero",))
            if self.prompt_tuning_init != "RANDOM":
                raise ConfigError(
                    f"init_weights='zero' and prompt_tuning_init={self.prompt_tuning_init!r} are two starts for "
                    f"the prefix; set one of them"
                )


def config_class_for(peft_type: str) -> type[DeltaConfig]:
    """The config class for a ``peft_type`` string read from a file."""
    classes = {cls.peft_type: cls for cls in _config_classes()}
    if peft_type not in classes:
        raise ConfigError(
            f"peft_type={peft_type!r} is not supported by deltatune; supported: {', '.join(sorted(classes))}"
        )
    return classes[peft_type]


def _config_classes() -> list[type[DeltaConfig]]:
    found, pending = [], list(DeltaConfig.__subclasses__())
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return [cls for cls in found if cls.peft_type]


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name}={value!r} must be a positive integer")


def _check_positive_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ConfigError(f"{name}={value!r} must be a positive finite number")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name}={value!r} must be true or false")


def _check_probability(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ConfigError(f"{name}={value!r} must be a number in [0, 1)")


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """The entry of ``choices`` that ``value`` spells, ignoring case; a ConfigError listing them otherwise."""
    spelled = {choice.lower(): choice for choice in choices}
    if isinstance(value, str) and value.lower() in spelled:
        return spelled[value.lower()]
    raise ConfigError(f"{name}={value!r} is unknown; use one of {', '.join(choices)}")


def _modules_to_save(value: Any) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(m, str) and m for m in value):
        raise ConfigError(f"modules_to_save={value!r} must be a list of module names")
    return list(value)


def _check_regex(name: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except (re.error, TypeError) as exc:
        raise ConfigError(f"{name} {pattern!r} is not a valid regex ({exc})") from None


def _module_names(name: str, value: Any) -> list[str] | str | None:
    """Normalise a target spec: None, a regex/"all-linear" string, or a sorted list of names."""
    if value is None:
        return value
    if isinstance(value, str):
        _check_regex(name, value)
        return value
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(item, str) and item for item in value):
        return sorted(set(value))
    raise ConfigError(f"{name}={value!r} must be a list of module names or a regex string")


def _pattern(name: str, value: Any) -> dict[str, Any]:
    """A per-module override mapping (regex -> value); None, as some files write it, is an empty one."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{name}={value!r} must be a mapping of module regex -> value")
    return dict(value)


def _layer_indices(value: Any) -> list[int] | int | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
        return list(value)
    raise ConfigError(f"layers_to_transform={value!r} must be a non-negative int or a list of them")


def _without_defaults(config: DeltaConfig, data: dict[str, Any], names: frozenset[str]) -> dict[str, Any]:
    """``data`` (``config.to_dict()``) without the fields in ``names`` that are at their default."""
    for f in dataclasses.fields(config):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if f.name in names and data[f.name] == _jsonable(default):
            del data[f.name]
    return data


_OPTIONAL_LORA_KEYS = frozenset(
    {
        "use_dora", "lora_bias", "trainable_token_indices", "target_parameters", "ensure_weight_tying",
        "loftq_config", "eva_config", "corda_config", "lora_ga_config", "megatron_config", "megatron_core",
        "velora_config", "monteclora_config", "kasa_config", "use_bdlora", "arrow_config",
        "alora_invocation_tokens", "use_qalora", "qalora_group_size", "layer_replication", "runtime_config",
    }
)  # fmt: skip

# init_lora_weights strings deltatune implements (``pissa_niter_<n>`` is spelled out by ``_lora_init``).
LORA_INITS = ("gaussian", "pissa", "olora", "orthogonal")


def _lora_init(value: Any) -> bool | str:
    """``init_lora_weights`` normalised: True, False, or one of ``LORA_INITS`` / ``pissa_niter_<n>`` (lower case)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        spelled = value.lower()
        if spelled in LORA_INITS or re.fullmatch(r"pissa_niter_[1-9][0-9]*", spelled):
            return spelled
        if spelled in LORA_INIT_REFUSALS:
            raise ConfigError(f"init_lora_weights={value!r} is not supported by deltatune: {LORA_INIT_REFUSALS[spelled]}")
    raise ConfigError(
        f"init_lora_weights={value!r} is not supported; use True, False, "
        f"{', '.join(repr(i) for i in LORA_INITS)} or 'pissa_niter_<n>'"
    )


def _token_indices(value: Any) -> list[int] | dict[str, list[int]] | None:
    """``trainable_token_indices``: None, a list of token ids, or {embedding module name: token ids}.

    The order is kept: the saved rows [n, dim] follow it, as in peft's files.
    """

    def ids(item: Any) -> bool:
        return isinstance(item, (list, tuple)) and bool(item) and all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in item
        )

    def unique(item: Any) -> list[int]:
        if len(set(item)) != len(item):
            raise ConfigError(f"trainable_token_indices={value!r} repeats a token id; list each token once")
        return list(item)

    if value is None:
        return None
    if ids(value):
        return unique(value)
    if isinstance(value, dict) and value and all(isinstance(k, str) and k and ids(v) for k, v in value.items()):
        return {key: unique(v) for key, v in value.items()}
    raise ConfigError(
        f"trainable_token_indices={value!r} must be a non-empty list of token ids, or a mapping of "
        f"embedding module name -> token ids"
    )


def _parameter_names(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple, set)) and value and all(isinstance(item, str) and item for item in value):
        return sorted(set(value))
    raise ConfigError(f"target_parameters={value!r} must be a non-empty list of parameter names (e.g. 'experts.gate_up_proj')")
