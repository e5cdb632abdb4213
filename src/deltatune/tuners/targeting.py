"""Which modules a config adapts. Pure functions over module names, plus one walk of the model.

Matching follows peft exactly, so a config means the same thing in both libraries:

- a list entry matches a module whose full name equals it or ends with "." + entry;
- a string is a regex that must ``re.fullmatch`` the full module name;
- ``"all-linear"`` (any case) means every ``nn.Linear`` / ``Conv1D`` except the output head (and
  the classifier of a sequence-classification model);
- ``layers_to_transform`` keeps the suffix matches inside the listed layers (None or [] keeps all);
- ``rank_pattern`` / ``alpha_pattern`` keys are regexes matched as a suffix of the module name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear
from transformers.pytorch_utils import Conv1D

from deltatune.errors import TargetError

ALL_LINEAR = "all-linear"

# Classes a LoRA layer can wrap.
ADAPTABLE_TYPES = (nn.Linear, Conv1D, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention)
LINEAR_TYPES = (nn.Linear, Conv1D)

# Classification heads: excluded from "all-linear" for SEQ_CLS models, and trained in full
# (``modules_to_save``) by classification adapters, as in peft.
CLASSIFIER_TASKS = ("SEQ_CLS", "TOKEN_CLS")
CLASSIFIER_HEADS = ("classifier", "score")

# Per-architecture defaults (config.model_type -> target_modules): the attention projections
# the LoRA paper adapts (query and value), named as each architecture names them.
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen2_moe": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "qwen3_moe": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "phi3": ["qkv_proj"],
    "olmo": ["q_proj", "v_proj"],
    "olmo2": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neo": ["q_proj", "v_proj"],
    "bart": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gpt_bigcode": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "bloom": ["query_key_value"],
    "falcon": ["query_key_value"],
    "codegen": ["qkv_proj"],
    "mpt": ["Wqkv"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "deberta-v2": ["query_proj", "value_proj"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
}


def name_matches(name: str, spec: Sequence[str] | str) -> bool:
    """True when module ``name`` is selected by ``spec`` (a list of names/suffixes, or a regex)."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == entry or name.endswith("." + entry) for entry in spec)


def layer_index(name: str, layers_pattern: Sequence[str] | str | None) -> int | None:
    """The index of the block a module lives in, e.g. 3 for ``model.layers.3.self_attn.q_proj``.

    Without ``layers_pattern`` the first ``<word>.<number>.`` segment is taken (peft's rule);
    with it, the number after the first listed pattern that occurs in the name.
    """
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern or [])
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
        return int(match["idx"]) if match else None
    for pattern in patterns:
        match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
        if match:
            return int(match["idx"])
    return None


V = TypeVar("V")


def pattern_value(name: str, patterns: Mapping[str, V], default: V) -> V:
    """The value of the first pattern key that matches a suffix of ``name``, else ``default``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def shares_weight(model: nn.Module, name: str) -> bool:
    """Whether module ``name``'s weight is also another module's (tied input and output embeddings)."""
    module = model.get_submodule(name)
    weight = getattr(module, "weight", None)
    return weight is not None and any(
        other is not module and getattr(other, "weight", None) is weight for _, other in walk_modules(model)
    )


def stores_fan_in_fan_out(model: nn.Module, targets: Iterable[str]) -> bool:
    """Whether one of ``targets`` (wrapped already or not) is a GPT-2 ``Conv1D``, whose weight is stored [in, out]:
    the ``fan_in_fan_out`` that peft records in the config of an adapter on these modules."""
    wanted = set(targets)
    return any(isinstance(module, Conv1D) for name, module in walk_modules(model) if name in wanted)


def walk_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """``named_modules()`` as the user's model had it: an injected delta layer shows as its base module.

    Modules inside a delta layer (its ``base_layer``, ``lora_A``, ...) are not listed, so a second
    adapter targets the same names as the first.
    """
    for child_name, child in model.named_children():
        name = f"{prefix}.{child_name}" if prefix else child_name
        if getattr(child, "is_delta_layer", False):
            if child.base_layer is not None:  # None: a module deltatune added (prompt encoders), not a wrapper
                yield name, child.base_layer
            continue
        yield name, child
        yield from walk_modules(child, name)


def adaptable_module_names(model: nn.Module) -> list[str]:
    """Full names of every module a LoRA layer can wrap (for error messages and ``inspect``)."""
    return [name for name, module in walk_modules(model) if isinstance(module, ADAPTABLE_TYPES)]


def short_names(names: Iterable[str]) -> list[str]:
    """The distinct last components of module names, e.g. ``["k_proj", "q_proj"]``."""
    return sorted({name.rsplit(".", 1)[-1] for name in names})


def default_target_modules(model: nn.Module) -> list[str]:
    """The per-architecture default ``target_modules`` for ``model`` (by ``config.model_type``)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGET_MODULES:
        return list(DEFAULT_TARGET_MODULES[model_type])
    fused = [name for name in ("query_key_value", "qkv_proj", "c_attn", "Wqkv") if _has_suffix(model, name)]
    if fused:
        return fused[:1]
    raise TargetError(
        f"no default target_modules for model_type={model_type!r}; pass target_modules "
        f"(e.g. 'all-linear' or some of: {', '.join(short_names(adaptable_module_names(model))[:12])})"
    )


def all_linear_names(model: nn.Module, task_type: str | None) -> list[str]:
    """Every linear / Conv1D module except the LM output head and a classifier head."""
    excluded = set()
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    if head is None and task_type == "SEQ_CLS":
        head = next((getattr(model, attr) for attr in CLASSIFIER_HEADS if hasattr(model, attr)), None)
    if head is not None:
        excluded = {name for name, module in walk_modules(model) if module is head}
    return [
        name
        for name, module in walk_modules(model)
        if isinstance(module, LINEAR_TYPES)
        and not isinstance(module, NonDynamicallyQuantizableLinear)  # an attention's out_proj: LoRA its attention
        and not any(name == e or name.startswith(e + ".") for e in excluded)
    ]


def _unwrappable(name: str, module: nn.Module, method: str) -> str:
    """The one line refusing target ``name``, a module no layer of ``method`` (a ``peft_type``) can wrap."""
    kind = type(module).__name__
    if method == "LORA":
        return (
            f"target {name!r} is a {kind}; LoRA adapts nn.Linear, Conv1D, nn.Embedding, nn.Conv1d/2d/3d and "
            f"nn.MultiheadAttention; name a leaf module (or an attention) instead"
        )
    return f"target {name!r} is a {kind}, which {method} cannot wrap; name a leaf layer (an nn.Linear, say) instead"


def find_targets(model: nn.Module, config: Any) -> list[str]:
    """Full names of the modules ``config`` adapts in ``model``, in model order.

    Raises ``TargetError`` naming the model's adaptable modules when nothing matches, and when a
    selected module (by name or by regex, as in peft) has a type no method can wrap (the method's own layers
    refuse the types they cannot).
    """
    spec = config.target_modules
    if spec is None:
        spec = default_target_modules(model)
    elif isinstance(spec, str) and spec.lower() == ALL_LINEAR:
        spec = all_linear_names(model, config.task_type)
    saved = config.modules_to_save or []
    selected = []
    for name, module in walk_modules(model):
        if not name_matches(name, spec):
            continue
        excluded = getattr(config, "exclude_modules", None)  # a field some methods' configs lack (VeRA's)
        if excluded and name_matches(name, excluded):
            continue
        if any(re.match(rf"(^|.*\.){entry}($|\..*)", name) for entry in saved):
            continue
        exact = not isinstance(spec, str) and name in spec  # peft applies no layer filter to a full name
        if not exact and not _in_layers(name, config):
            continue
        if not isinstance(module, ADAPTABLE_TYPES):
            raise TargetError(_unwrappable(name, module, getattr(config, "peft_type", "")))
        selected.append(name)
    if not selected:
        names = short_names(adaptable_module_names(model))
        raise TargetError(
            f"target_modules={config.target_modules!r} matched no module of this "
            f"{type(model).__name__}; adaptable module names are: {', '.join(names)}"
        )
    return selected


def _in_layers(name: str, config: Any) -> bool:
    """True when ``name`` is in one of ``layers_to_transform`` (None or [] means every layer, as in peft; a config
    without the field, such as IA3's, adapts every layer)."""
    wanted = getattr(config, "layers_to_transform", None)
    if wanted is None or wanted == []:
        return True
    index = layer_index(name, config.layers_pattern)
    return index is not None and (index == wanted if isinstance(wanted, int) else index in wanted)


def _has_suffix(model: nn.Module, suffix: str) -> bool:
    return any(name.endswith("." + suffix) for name, _ in walk_modules(model))
