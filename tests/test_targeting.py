"""Which modules a config adapts: the pure matching functions, parity with peft, per-architecture defaults."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import transformers as tf
from peft.tuners.lora import LoraLayer as PeftLoraLayer
from peft.utils.constants import (
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS,
)
from torch import nn

from deltatune import LoraConfig, TargetError, get_delta_model
from deltatune.tuners.lora.layer import LoraLayer
from deltatune.tuners.targeting import (
    adaptable_module_names,
    default_target_modules,
    find_targets,
    layer_index,
    name_matches,
    pattern_value,
)
from tiny_models import tiny_gpt2, tiny_llama

# -- pure functions ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "spec", "expected"),
    [
        ("model.layers.0.self_attn.q_proj", ["q_proj"], True),
        ("model.layers.0.self_attn.q_proj", ["self_attn.q_proj"], True),
        ("model.layers.0.self_attn.q_proj", ["model.layers.0.self_attn.q_proj"], True),
        ("model.layers.0.self_attn.q_proj", ["proj"], False),  # a suffix starts at a "."
        ("model.layers.0.self_attn.q_proj", ["attn.q_proj"], False),
        ("model.layers.0.self_attn.q_proj", ["q_proj.weight"], False),
        ("q_proj", ["q_proj"], True),
        ("model.layers.0.self_attn.q_proj", [], False),
        ("model.layers.0.self_attn.q_proj", r".*q_proj", True),
        ("model.layers.0.self_attn.q_proj", r"q_proj", False),  # a regex is fullmatched
        ("model.layers.0.self_attn.q_proj", r".*\.1\..*q_proj", False),
        ("model.layers.10.self_attn.q_proj", r".*\.1\d\..*q_proj", True),
        ("model.layers.0.self_attn.q_proj_extra", r".*q_proj", False),
    ],
)
def test_name_matches(name: str, spec, expected: bool) -> None:
    assert name_matches(name, spec) is expected


@pytest.mark.parametrize(
    ("name", "pattern", "expected"),
    [
        ("model.layers.3.self_attn.q_proj", None, 3),
        ("transformer.h.11.attn.c_attn", None, 11),
        ("model.layers.1.mlp.experts.0.w1", None, 1),  # the first index, not a nested expert index
        ("encoder.block.2.layer.0.SelfAttention.q", None, 2),
        ("lm_head", None, None),
        ("model.layers.3.self_attn.q_proj", "layers", 3),
        ("model.layers.3.self_attn.q_proj", "h", None),
        ("transformer.h.4.attn.c_attn", ["layers", "h"], 4),
        ("encoder.block.2.layer.0.SelfAttention.q", "layer", 0),
        ("layers.5.q", "layers", 5),
    ],
)
def test_layer_index(name: str, pattern, expected: int | None) -> None:
    assert layer_index(name, pattern) == expected


@pytest.mark.parametrize(
    ("name", "patterns", "expected"),
    [
        ("model.layers.0.self_attn.q_proj", {"q_proj": 2}, 2),
        ("model.layers.0.self_attn.q_proj", {"self_attn.q_proj": 2}, 2),
        ("model.layers.0.self_attn.q_proj", {r"layers\.0\.self_attn\.q_proj": 2}, 2),
        ("model.layers.1.self_attn.q_proj", {r"layers\.0\.self_attn\.q_proj": 2}, 8),
        ("model.layers.0.self_attn.q_proj", {"proj": 2}, 8),  # suffix at a "." boundary only
        ("model.layers.0.self_attn.q_proj", {".*proj": 2}, 2),
        ("model.layers.0.self_attn.q_proj", {"v_proj": 2, "q_proj": 4}, 4),
        ("model.layers.0.self_attn.q_proj", {"q_proj": 4, ".*": 2}, 4),  # first matching key wins
    ],
)
def test_pattern_value(name: str, patterns: dict, expected: int) -> None:
    assert pattern_value(name, patterns, 8) == expected


# -- parity with peft -------------------------------------------------------------------------


def _peft_targets(model: nn.Module, **kwargs) -> list[str]:
    """The modules that become LoRA layers in peft for this config (on a copy of ``model``)."""
    wrapped = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, **kwargs))
    return sorted(
        name.removeprefix("base_model.model.")
        for name, module in wrapped.named_modules()
        if isinstance(module, PeftLoraLayer)
    )


def _delta_targets(model: nn.Module, **kwargs) -> list[str]:
    """find_targets' answer, checked against the LoRA layers get_delta_model really injects."""
    selected = sorted(find_targets(model, LoraConfig(r=2, **kwargs)))
    injected = sorted(
        name.removeprefix("base_model.")
        for name, module in get_delta_model(copy.deepcopy(model), LoraConfig(r=2, **kwargs)).named_modules()
        if isinstance(module, LoraLayer)
    )
    assert injected == selected
    return selected


LLAMA_SPECS = [
    {"target_modules": ["q_proj", "v_proj"]},
    {"target_modules": ["self_attn.q_proj", "mlp.up_proj"]},
    {"target_modules": ["model.layers.1.self_attn.k_proj"]},
    {"target_modules": ["embed_tokens", "o_proj"]},
    {"target_modules": r".*\.(q|v)_proj"},
    {"target_modules": r"model\.layers\.1\.mlp\..*_proj"},
    {"target_modules": "all-linear"},
    {"target_modules": "ALL-LINEAR"},
    {"target_modules": "all-linear", "task_type": "CAUSAL_LM"},
    {"target_modules": ["q_proj", "k_proj"], "exclude_modules": ["model.layers.0.self_attn.k_proj"]},
    {"target_modules": ["q_proj", "k_proj", "up_proj"], "exclude_modules": ["k_proj", "mlp.up_proj"]},
    {"target_modules": ["q_proj", "k_proj"], "exclude_modules": r".*\.0\..*"},
    {"target_modules": "all-linear", "exclude_modules": ["mlp.down_proj", "o_proj"]},
    {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1]},
    {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": 0},
    {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [0, 1, 7]},
    {"target_modules": ["q_proj"], "layers_to_transform": []},
    {"target_modules": ["q_proj"], "layers_to_transform": [1], "layers_pattern": "layers"},
    {"target_modules": ["q_proj"], "layers_to_transform": [1], "layers_pattern": ["h", "layers"]},
    {"target_modules": ["model.layers.0.self_attn.q_proj", "v_proj"], "layers_to_transform": [1]},
    {"target_modules": ["lm_head", "q_proj"], "modules_to_save": ["lm_head"]},
    {"target_modules": "all-linear", "modules_to_save": ["mlp.down_proj"]},
    {"target_modules": None},
]
GPT2_SPECS = [
    {"target_modules": None},
    {"target_modules": ["c_attn", "c_proj"]},
    {"target_modules": ["attn.c_proj"]},
    {"target_modules": r"transformer\.h\.\d+\.mlp\.c_fc"},
    {"target_modules": "all-linear"},
    {"target_modules": ["c_attn"], "layers_to_transform": 1, "layers_pattern": "h"},
    {"target_modules": ["c_fc", "c_attn"], "exclude_modules": ["transformer.h.0.mlp.c_fc"]},
    {"target_modules": ["wte", "c_attn"]},
]


@pytest.fixture(scope="module")
def llama() -> nn.Module:
    return tiny_llama()


@pytest.fixture(scope="module")
def gpt2() -> nn.Module:
    return tiny_gpt2()


@pytest.mark.parametrize("kwargs", LLAMA_SPECS, ids=repr)
def test_llama_targets_match_peft(llama: nn.Module, kwargs: dict) -> None:
    ours = _delta_targets(llama, **kwargs)
    assert ours and ours == _peft_targets(llama, **kwargs)


@pytest.mark.parametrize("kwargs", GPT2_SPECS, ids=repr)
def test_gpt2_targets_match_peft(gpt2: nn.Module, kwargs: dict) -> None:
    ours = _delta_targets(gpt2, **kwargs)
    assert ours and ours == _peft_targets(gpt2, **kwargs)


def test_spot_check_of_selected_names(llama: nn.Module) -> None:
    """Not only equal to peft's answer, but the answer one expects by reading the config."""
    config = LoraConfig(target_modules=["q_proj", "v_proj"], layers_to_transform=[1])
    assert find_targets(llama, config) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert "lm_head" not in find_targets(llama, LoraConfig(target_modules="all-linear"))
    assert len(find_targets(llama, LoraConfig(target_modules="all-linear"))) == 2 * 7


@pytest.mark.parametrize("target_modules", [["self_attn"], ["layers.0.mlp"], ["model.layers"], r".*layers\.1\..*"])
def test_container_target_raises_a_clear_error_and_changes_nothing(llama: nn.Module, target_modules) -> None:
    model = copy.deepcopy(llama)
    before = {name: p.clone() for name, p in model.state_dict().items()}
    with pytest.raises(TargetError, match=r"target '.+' is a \w+;.*leaf module") as info:
        get_delta_model(model, LoraConfig(r=2, target_modules=target_modules))
    assert "\n" not in str(info.value)
    assert not any(isinstance(module, LoraLayer) for module in model.modules())
    assert all(torch.equal(before[name], p) for name, p in model.state_dict().items())
    with pytest.raises(ValueError, match="not supported"):  # peft refuses the same configs
        _peft_targets(llama, target_modules=target_modules)


@pytest.mark.parametrize("method", ["IA3Config", "LoHaConfig", "OFTConfig", "VeraConfig"])
def test_a_container_target_is_refused_in_the_methods_own_name(llama: nn.Module, method: str) -> None:
    """Every method's targets go through ``find_targets``; its refusal names the method asked for, not LoRA."""
    import deltatune

    config = getattr(deltatune, method)(target_modules=["self_attn"])
    with pytest.raises(
        TargetError,
        match=rf"'model\.layers\.0\.self_attn' is a LlamaAttention, which "
        rf"{config.peft_type} cannot wrap; name a leaf layer",
    ) as info:
        get_delta_model(copy.deepcopy(llama), config)
    assert "LoRA" not in str(info.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target_modules": ["query", "value"]},
        {"target_modules": ["proj"]},
        {"target_modules": r"q_proj"},
        {"target_modules": ["q_proj"], "layers_to_transform": [5]},
        {"target_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": "h"},
        {"target_modules": ["q_proj"], "exclude_modules": ["q_proj"]},
    ],
    ids=repr,
)
def test_nothing_matched_lists_the_adaptable_module_names(llama: nn.Module, kwargs: dict) -> None:
    with pytest.raises(TargetError) as info:
        find_targets(llama, LoraConfig(**kwargs))
    message = str(info.value)
    assert "\n" not in message and "matched no module" in message and "LlamaForCausalLM" in message
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"):
        assert name in message
    assert "lm_head" in message


def test_adaptable_module_names_hide_lora_internals(llama: nn.Module) -> None:
    model = get_delta_model(copy.deepcopy(llama), LoraConfig(r=2, target_modules=["q_proj"]))
    names = adaptable_module_names(model.base_model)
    assert names == adaptable_module_names(llama)
    assert not any("lora_" in name or "base_layer" in name for name in names)


# -- per-architecture defaults ----------------------------------------------------------------

_DECODER = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
ARCHITECTURES = {
    "llama": (tf.LlamaConfig, tf.AutoModelForCausalLM, {**_DECODER, "num_key_value_heads": 1}),
    "mistral": (tf.MistralConfig, tf.AutoModelForCausalLM, {**_DECODER, "num_key_value_heads": 1}),
    "qwen2": (tf.Qwen2Config, tf.AutoModelForCausalLM, {**_DECODER, "num_key_value_heads": 1}),
    "qwen3": (tf.Qwen3Config, tf.AutoModelForCausalLM, {**_DECODER, "num_key_value_heads": 1, "head_dim": 8}),
    "gemma": (tf.GemmaConfig, tf.AutoModelForCausalLM, {**_DECODER, "num_key_value_heads": 1, "head_dim": 8}),
    "phi3": (
        tf.Phi3Config,
        tf.AutoModelForCausalLM,
        {**_DECODER, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0},
    ),
    "gpt2": (
        tf.GPT2Config,
        tf.AutoModelForCausalLM,
        {"n_embd": 16, "n_layer": 2, "n_head": 2, "n_positions": 32, "bos_token_id": 0, "eos_token_id": 0},
    ),
    "gpt_neox": (tf.GPTNeoXConfig, tf.AutoModelForCausalLM, _DECODER),
    "bert": (tf.BertConfig, tf.AutoModelForSequenceClassification, {**_DECODER, "max_position_embeddings": 32}),
    "roberta": (tf.RobertaConfig, tf.AutoModelForSequenceClassification, {**_DECODER, "max_position_embeddings": 40}),
    "t5": (
        tf.T5Config,
        tf.AutoModelForSeq2SeqLM,
        {"d_model": 16, "d_ff": 32, "d_kv": 8, "num_layers": 2, "num_heads": 2, "decoder_start_token_id": 0},
    ),
}
# What each default adapts, by last name component (and how many per model: 2 layers; t5: encoder + decoder).
EXPECTED_DEFAULTS = {
    "llama": ({"q_proj", "v_proj"}, 4),
    "mistral": ({"q_proj", "v_proj"}, 4),
    "qwen2": ({"q_proj", "v_proj"}, 4),
    "qwen3": ({"q_proj", "v_proj"}, 4),
    "gemma": ({"q_proj", "v_proj"}, 4),
    "phi3": ({"qkv_proj"}, 2),
    "gpt2": ({"c_attn"}, 2),
    "gpt_neox": ({"query_key_value"}, 2),
    "bert": ({"query", "value"}, 4),
    "roberta": ({"query", "value"}, 4),
    "t5": ({"q", "v"}, 12),  # encoder self-attn, decoder self- and cross-attn
}


def _tiny(model_type: str) -> nn.Module:
    config_class, auto_class, kwargs = ARCHITECTURES[model_type]
    torch.manual_seed(0)
    model = auto_class.from_config(config_class(vocab_size=64, **kwargs))
    assert model.config.model_type == model_type
    return model


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_default_targets_per_architecture(model_type: str) -> None:
    model = _tiny(model_type)
    wanted, count = EXPECTED_DEFAULTS[model_type]
    selected = _delta_targets(model)
    assert {name.rsplit(".", 1)[-1] for name in selected} == wanted
    assert len(selected) == count
    if model_type in PEFT_DEFAULTS:  # phi3 has no default in peft; deltatune adds one
        assert default_target_modules(model) == PEFT_DEFAULTS[model_type]
        assert selected == _peft_targets(model)


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_all_linear_per_architecture_matches_peft(model_type: str) -> None:
    model = _tiny(model_type)
    task_type = "SEQ_CLS" if model_type in ("bert", "roberta") else None
    selected = _delta_targets(model, target_modules="all-linear", task_type=task_type)
    assert selected == _peft_targets(model, target_modules="all-linear", task_type=task_type)
    head = model.get_output_embeddings()
    assert not any(model.get_submodule(name) is head for name in selected)
    assert not any(name.startswith(("classifier", "score")) for name in selected)


class _FusedBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query_key_value = nn.Linear(8, 24)
        self.dense = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(self.query_key_value(x)[..., :8])


class _FusedModel(nn.Module):
    """An architecture deltatune has no table entry for, with a fused ``query_key_value``."""

    def __init__(self, model_type: str = "my_custom_arch") -> None:
        super().__init__()
        self.config = tf.PretrainedConfig()
        self.config.model_type = model_type
        self.blocks = nn.ModuleList([_FusedBlock(), _FusedBlock()])
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def test_fused_query_key_value_model_gets_a_default() -> None:
    model = _FusedModel()
    assert default_target_modules(model) == ["query_key_value"]
    assert find_targets(model, LoraConfig()) == ["blocks.0.query_key_value", "blocks.1.query_key_value"]
    x = torch.randn(2, 8)
    before = model(x)
    delta = get_delta_model(model, LoraConfig(r=2, init_lora_weights=False))
    assert not torch.allclose(delta(x), before)  # the fused projections really run the update


def test_unknown_architecture_without_fused_projection_asks_for_target_modules() -> None:
    model = _FusedModel("unknown_arch")
    for block in model.blocks:
        block.qkv = block.query_key_value
        del block.query_key_value
    with pytest.raises(TargetError, match="no default target_modules for model_type='unknown_arch'") as info:
        find_targets(model, LoraConfig())
    assert "dense" in str(info.value) and "qkv" in str(info.value) and "head" in str(info.value)
