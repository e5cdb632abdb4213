"""LoRA on raw parameters (``target_parameters``) against peft 0.21: fused MoE experts and plain 2-D parameters.

Models: a tiny Qwen3-MoE and a tiny Mixtral (transformers 5 keeps each layer's experts in two 3-D
parameters [E, out, in]) and a toy module with a plain 2-D parameter and ``is_transposed`` experts
[E, in, out]. Each case is compared with peft in both file directions (logits within 1e-5), merged
(within 1e-4) and by the gradients of every LoRA factor.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable

import peft
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from transformers import (
    MixtralConfig,
    MixtralForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from deltatune import ConfigError, DeltaModel, LoraConfig, MergeError, get_delta_model
from deltatune.tuners.lora.layer import LoraLayer
from deltatune.tuners.lora.param import LoraParameter
from tiny_models import output_tensor, perturb_trainable

pytestmark = [
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning:peft"),
    # peft checks rank_pattern against module targets only, but applies it to parameter targets too (shapes below).
    pytest.mark.filterwarnings("ignore:The following rank_pattern keys did not match:RuntimeWarning"),
]

VOCAB = 128
QWEN_EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


def _seeded(make: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make().eval()


def tiny_qwen3_moe() -> Qwen3MoeForCausalLM:
    """Qwen3-MoE: hidden 16, 2 layers, 4 experts (top 2) of width 8; experts fused in [4, 16, 16] and [4, 16, 8]."""
    config = Qwen3MoeConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        intermediate_size=32,
        moe_intermediate_size=8,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    return _seeded(lambda: Qwen3MoeForCausalLM(config))


def tiny_mixtral() -> MixtralForCausalLM:
    """Mixtral: hidden 16, 2 layers, 4 experts (top 2) of width 12."""
    config = MixtralConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        intermediate_size=12,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    return _seeded(lambda: MixtralForCausalLM(config))


class Mixer(nn.Module):
    """A plain 2-D parameter [out, in] (no nn.Linear): y = x Mᵀ + b."""

    def __init__(self) -> None:
        super().__init__()
        self.matrix = nn.Parameter(torch.randn(8, 6) / 3)
        self.bias = nn.Parameter(torch.randn(8) / 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.matrix, self.bias)


class TransposedExperts(nn.Module):
    """Three experts stored [E, in, out] (``is_transposed``, as gpt-oss stores them), outputs summed."""

    is_transposed = True

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 8, 5) / 3)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bi,eio->bo", h, self.weight)


class ToyParamNet(nn.Module):
    """6 -> 8 (``mixer.matrix``) -> tanh -> 5 (``experts.weight``)."""

    def __init__(self) -> None:
        super().__init__()
        self.mixer = Mixer()
        self.experts = TransposedExperts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.experts(torch.tanh(self.mixer(x)))


def toy() -> ToyParamNet:
    return _seeded(ToyParamNet)


# case -> (model factory, LoraConfig kwargs meaning the same in peft and deltatune)
CASES: dict[str, tuple[Callable[[], nn.Module], dict]] = {
    "qwen3_moe": (tiny_qwen3_moe, {"target_parameters": QWEN_EXPERTS, "r": 2, "lora_alpha": 3}),
    "mixtral_with_modules": (
        tiny_mixtral,
        {
            "target_modules": ["q_proj"],
            "target_parameters": ["mlp.experts.down_proj"],
            "r": 3,
            "lora_alpha": 6,
            "use_rslora": True,
            "rank_pattern": {r"layers\.1\.mlp\.experts\.down_proj": 2},
        },
    ),
    # as in peft, layers_to_transform filters the module targets only: both layers' experts are adapted
    "qwen3_moe_layers_to_transform": (
        tiny_qwen3_moe,
        {"target_modules": ["q_proj"], "layers_to_transform": [0], "target_parameters": ["experts.down_proj"]},
    ),
    "toy_2d_and_transposed": (toy, {"target_parameters": ["mixer.matrix", "experts.weight"], "r": 2, "lora_alpha": 5}),
}


def inputs(case: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    if case.startswith("toy"):
        return {"x": torch.randn(4, 6, generator=generator)}
    return {"input_ids": torch.randint(0, VOCAB, (2, 7), generator=generator)}


def run(model: nn.Module, case: str) -> torch.Tensor:
    return output_tensor(model(**inputs(case)))


def peft_lora(case: str) -> peft.PeftModel:
    """peft's model with random (non-zero) A and B."""
    make, kwargs = CASES[case]
    config = peft.LoraConfig(**copy.deepcopy(kwargs), init_lora_weights=False)
    return _seeded(lambda: peft.get_peft_model(make(), config), seed=5)


def delta_lora(case: str, **overrides) -> DeltaModel:
    make, kwargs = CASES[case]
    return _seeded(lambda: get_delta_model(make(), LoraConfig(**copy.deepcopy(kwargs), **overrides)), seed=5)


def assert_close(got: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    assert (got - ref).abs().max().item() <= tol


@pytest.mark.parametrize("case", list(CASES))
def test_peft_file_loads_in_deltatune(case, tmp_path):
    theirs = peft_lora(case)
    theirs.save_pretrained(tmp_path)
    ours = DeltaModel.from_pretrained(CASES[case][0](), tmp_path)
    with torch.no_grad():
        reference, got, base = run(theirs, case), run(ours, case), run(CASES[case][0](), case)
    assert (reference - base).abs().max() > 1e-3, "the adapter must change the outputs"
    assert_close(got, reference, 1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_deltatune_file_loads_in_peft(case, tmp_path):
    ours = delta_lora(case)
    perturb_trainable(ours)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(CASES[case][0](), tmp_path)
    with torch.no_grad():
        reference, got, base = run(ours, case), run(theirs, case), run(CASES[case][0](), case)
    assert (reference - base).abs().max() > 1e-3, "the adapter must change the outputs"
    assert_close(got, reference, 1e-5)


def tensor_shapes(directory) -> dict[str, tuple[int, ...]]:
    with safe_open(str(directory / "adapter_model.safetensors"), framework="pt") as handle:
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}


@pytest.mark.parametrize("case", list(CASES))
def test_file_keys_shapes_and_config_match_peft(case, tmp_path):
    peft_lora(case).save_pretrained(tmp_path / "peft")
    delta_lora(case).save_pretrained(tmp_path / "delta")
    assert tensor_shapes(tmp_path / "delta") == tensor_shapes(tmp_path / "peft")
    ours, theirs = (json.loads((tmp_path / side / "adapter_config.json").read_text()) for side in ("delta", "peft"))
    for key in ("target_modules", "target_parameters"):
        assert sorted(ours[key] or []) == sorted(theirs[key] or []), key  # peft may write no modules as null


def test_expert_layout_is_peft_s():
    """A [E·r, in] is expert-major, B [out, r·E] expert-minor: expert e's update is B[:, e::E] @ A[e·r:(e+1)·r]."""
    ours = delta_lora("qwen3_moe", init_lora_weights=False)
    layer = ours.base_model.model.layers[0].mlp.experts.base_layer  # the inner wrapper: gate_up_proj
    assert isinstance(layer, LoraParameter) and layer.parameter_name == "gate_up_proj"
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert a.shape == (4 * 2, 16) and b.shape == (16, 2 * 4)
    scaling = 3 / 2
    expected = torch.stack([b[:, e::4] @ a[e * 2 : (e + 1) * 2] * scaling for e in range(4)])
    assert_close(layer.delta_weight("default"), expected, 1e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_merged_outputs_match(case, tmp_path):
    theirs = peft_lora(case)
    theirs.save_pretrained(tmp_path)
    with torch.no_grad():
        reference = run(theirs, case)
        ours = DeltaModel.from_pretrained(CASES[case][0](), tmp_path)
        ours.merge_adapter(safe_merge=True)
        assert_close(run(ours, case), reference, 1e-4)
        ours.unmerge_adapter()
        assert_close(run(ours, case), reference, 1e-5)
        plain = ours.merge_and_unload()
        assert not any(isinstance(m, LoraLayer) for m in plain.modules())
        assert_close(run(plain, case), run(theirs.merge_and_unload(), case), 1e-4)


@pytest.mark.parametrize("case", list(CASES))
def test_gradients_match_peft(case, tmp_path):
    peft_lora(case).save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(CASES[case][0](), tmp_path, is_trainable=True)
    ours = DeltaModel.from_pretrained(CASES[case][0](), tmp_path, is_trainable=True)
    grads = {}
    for side, model, prefix in ((0, theirs, "base_model.model."), (1, ours, "base_model.")):
        run(model, case).pow(2).mean().backward()
        named = {n.removeprefix(prefix): p.grad for n, p in model.named_parameters() if p.requires_grad}
        grads[side] = named
    assert grads[1].keys() == grads[0].keys()
    assert any(".base_layer.lora_" in name or "experts.lora_" in name for name in grads[1])
    for name, reference in grads[0].items():
        assert reference.abs().max() > 0, name
        assert_close(grads[1][name], reference, 1e-5 * max(1.0, reference.abs().max().item()))


@pytest.mark.parametrize("case", list(CASES))
def test_training_step_changes_only_the_adapter(case):
    ours = delta_lora(case, init_lora_weights=False)
    before = {name: p.detach().clone() for name, p in ours.named_parameters()}
    trainable = {name for name, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    optimizer = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    run(ours, case).pow(2).mean().backward()
    optimizer.step()
    for name, param in ours.named_parameters():
        changed = not torch.equal(param, before[name])
        assert changed == (name in trainable), name


def test_second_adapter_shares_the_wrappers_and_removal_restores_the_model():
    ours = delta_lora("qwen3_moe", init_lora_weights=False)
    ours.add_adapter("other", LoraConfig(target_parameters=list(QWEN_EXPERTS), r=4, init_lora_weights=False))
    experts = ours.base_model.model.layers[1].mlp.experts
    assert isinstance(experts, LoraParameter) and isinstance(experts.base_layer, LoraParameter)
    assert not isinstance(experts.base_layer.base_layer, LoraParameter)  # one wrapper per parameter, not per adapter
    assert experts.adapter_names == experts.base_layer.adapter_names == ["default", "other"]
    with torch.no_grad():
        base = run(tiny_qwen3_moe(), "qwen3_moe")
        default = run(ours, "qwen3_moe")
        ours.set_adapter("other")
        other = run(ours, "qwen3_moe")
        ours.set_adapter(["default", "other"])
        both = run(ours, "qwen3_moe")
        ours.merge_adapter()
        assert_close(run(ours, "qwen3_moe"), both, 1e-4)
        ours.unmerge_adapter()
        with ours.disable_adapter():
            assert_close(run(ours, "qwen3_moe"), base, 1e-6)
        assert (default - other).abs().max() > 1e-3 and (both - default).abs().max() > 1e-3
        ours.delete_adapter("default")
        assert_close(run(ours, "qwen3_moe"), other, 1e-6)
        plain = ours.unload()
        assert type(plain.model.layers[1].mlp.experts).__name__ == "Qwen3MoeExperts"
        assert_close(run(plain, "qwen3_moe"), base, 1e-6)


def test_half_precision_base_keeps_fp32_factors_and_matches_peft(tmp_path):
    peft_lora("qwen3_moe").save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_qwen3_moe().to(torch.bfloat16), tmp_path)
    ours = DeltaModel.from_pretrained(tiny_qwen3_moe().to(torch.bfloat16), tmp_path, is_trainable=True)
    assert all(p.dtype == torch.float32 for p in ours.adapter_state("default").values())
    with torch.no_grad():
        assert_close(run(ours, "qwen3_moe").float(), run(theirs, "qwen3_moe").float(), 1e-2)
    run(ours, "qwen3_moe").float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in ours.adapter_state("default").values())


def test_safe_merge_refuses_non_finite_and_changes_nothing():
    ours = delta_lora("qwen3_moe", init_lora_weights=False)
    layer = ours.base_model.model.layers[0].mlp.experts
    before = layer.base_weight.detach().clone()
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = math.inf
    with pytest.raises(MergeError, match="NaN/Inf"):
        ours.merge_adapter(safe_merge=True)
    assert torch.equal(layer.base_weight, before) and not ours.merged_adapters


def no_lora(model: nn.Module) -> bool:
    return not any(isinstance(m, LoraLayer) for m in model.modules())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target_parameters": ["experts.up_proj"]}, "'experts.up_proj' matches no parameter"),
        ({"target_parameters": ["experts.gate_up_proj", "experts.nope"]}, "'experts.nope' matches no parameter"),
        ({"target_parameters": ["input_layernorm.weight"]}, "2-D"),
        ({"target_modules": ["q_proj"], "target_parameters": ["q_proj.weight"]}, "not both"),
        (
            {"target_modules": ["k_proj"], "target_parameters": ["experts.gate_up_proj"], "lora_dropout": 0.1},
            "lora_dropout",
        ),
        ({"target_parameters": QWEN_EXPERTS, "use_dora": True}, "use_dora"),
        ({"target_parameters": QWEN_EXPERTS, "lora_bias": True}, "lora_bias"),
        ({"target_parameters": QWEN_EXPERTS, "init_lora_weights": "olora"}, "init_lora_weights"),
    ],
)
def test_bad_targets_are_config_errors_and_leave_the_model_untouched(kwargs, message):
    model = tiny_qwen3_moe()
    with pytest.raises(ConfigError, match=message):
        get_delta_model(model, LoraConfig(**kwargs))
    assert no_lora(model)


def test_parameter_of_the_top_level_module_is_refused():
    model = nn.Linear(4, 4)
    with pytest.raises(ConfigError, match="top-level"):
        get_delta_model(model, LoraConfig(target_parameters=["weight"]))
    assert type(model) is nn.Linear


def test_adapters_must_target_the_same_parameters():
    ours = delta_lora("qwen3_moe")
    with pytest.raises(ConfigError, match="same ones"):
        ours.add_adapter("other", LoraConfig(target_parameters=["experts.down_proj"]))
    assert ours.base_model.model.layers[0].mlp.experts.adapter_names == ["default"]


def test_a_module_and_its_parameter_are_not_both_adapted_across_adapters():
    ours = get_delta_model(tiny_qwen3_moe(), LoraConfig(target_parameters=["self_attn.q_proj.weight"]))
    with pytest.raises(ConfigError, match="not both"):
        ours.add_adapter("other", LoraConfig(target_modules=["q_proj"]))
    ours = get_delta_model(tiny_qwen3_moe(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="not both"):
        ours.add_adapter("other", LoraConfig(target_parameters=["q_proj.weight"]))
    assert list(ours.peft_config) == ["default"]
