"""LoRA on ``nn.MultiheadAttention`` (in_proj_weight plus out_proj), checked against peft and against the
attention module itself run on W + s·BA.

peft 0.21's forward (and merge) add the out_proj update twice (huggingface/peft#3774); deltatune adds it
once. ``test_peft_adds_the_out_proj_update_twice`` pins that difference; the parity tests halve peft's
out_proj scaling, which makes peft compute exactly W + s·BA, so its outputs and gradients are the oracle
(its out_proj gradients doubled: ``peft_out_proj_grad_scale``).
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from peft.tuners.lora.layer import MultiheadAttention as PeftAttention
from torch import nn
from torch.func import functional_call

import deltatune
from deltatune.errors import ConfigError
from deltatune.tuners.lora.layer import LoraLinear
from deltatune.tuners.lora.mha import LoraMultiheadAttention
from test_lora_conv import (
    DIRECTIONS,
    MERGE_ATOL,
    assert_same_model,
    first,
    save_and_load,
)
from tiny_models import _seeded, perturb_trainable

LORA = {"target_modules": ["attn"], "r": 2, "lora_alpha": 6}  # scaling 3
VARIANTS = {"batch_first": {"batch_first": True}, "sequence_first_no_bias": {"bias": False}}


class AttentionNet(nn.Module):
    """Self-attention over 8 dims with 2 heads, then a linear head."""

    def __init__(self, **attention: object) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, **attention)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x, x, x, need_weights=False)[0])

    def example(self) -> torch.Tensor:
        return torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))


def maker(variant: str):
    return lambda: _seeded(lambda: AttentionNet(**VARIANTS[variant]))


def fix_peft_out_proj(peft_side: nn.Module) -> None:
    """Halve peft's out_proj scaling: its forward adds that update twice, so it then adds s·BA once."""
    for module in peft_side.modules():
        if isinstance(module, PeftAttention):
            for name in module.base_layer.out_proj.scaling:
                module.base_layer.out_proj.scaling[name] /= 2


def reference(make, model: deltatune.DeltaModel, out_proj_times: int = 1) -> nn.Module:
    """The plain model with W + s·BA written into in_proj_weight and out_proj.weight (``out_proj_times`` times)."""
    plain = make()
    layer = model.base_model.attn
    with torch.no_grad():
        plain.attn.in_proj_weight += layer.delta_weight("default")
        plain.attn.out_proj.weight += out_proj_times * layer.out_proj.delta_weight("default")
    return plain


def random_model(make) -> deltatune.DeltaModel:
    model = _seeded(lambda: deltatune.get_delta_model(make(), deltatune.LoraConfig(**LORA, init_lora_weights=False)))
    perturb_trainable(model)
    return model


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_attention_adapter_matches_peft_both_ways(variant, direction, tmp_path):
    make = maker(variant)
    peft_side, delta_side = save_and_load(make, LORA, direction, tmp_path)
    assert set(peft.get_peft_model_state_dict(peft_side)) == {
        "base_model.model.attn.lora_A.weight",
        "base_model.model.attn.lora_B.weight",
        "base_model.model.attn.base_layer.out_proj.lora_A.weight",
        "base_model.model.attn.base_layer.out_proj.lora_B.weight",
    }
    fix_peft_out_proj(peft_side)
    assert_same_model(peft_side, delta_side, make, (make().example(),), peft_out_proj_grad_scale)


def peft_out_proj_grad_scale(key: str) -> float:
    """peft's second out_proj addition is an in-place ``.data +=``, off the autograd graph: with the halved
    scaling its out_proj factors get half the gradient of W + s·B'A'."""
    return 2.0 if ".out_proj." in key else 1.0


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_is_the_attention_module_on_adapted_weights(variant):
    make = maker(variant)
    model = random_model(make)
    x = make().example()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(make, model)(x), atol=1e-5, rtol=0)
        assert (model(x) - make()(x)).abs().max() > 1e-3


def test_gradients_are_those_of_the_adapted_weights():
    """Independent of peft: autograd through the plain module on W + s·BA built from copies of the factors."""
    make = maker("batch_first")
    model = random_model(make)
    x, plain = make().example(), make()
    layers = {"in_proj_weight": model.base_model.attn, "out_proj.weight": model.base_model.attn.out_proj}
    copies = {
        name: [
            layer.lora_B["default"].weight.detach().clone().requires_grad_(),
            layer.lora_A["default"].weight.detach().clone().requires_grad_(),
        ]
        for name, layer in layers.items()
    }
    weights = {
        f"attn.{name}": plain.get_parameter(f"attn.{name}").detach() + layers[name].scaling["default"] * (b @ a)
        for name, (b, a) in copies.items()
    }
    functional_call(plain, weights, (x,)).square().mean().backward()
    model(x).square().mean().backward()
    for name, layer in layers.items():
        torch.testing.assert_close(layer.lora_B["default"].weight.grad, copies[name][0].grad, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(layer.lora_A["default"].weight.grad, copies[name][1].grad, atol=1e-6, rtol=1e-5)
        assert copies[name][1].grad.abs().max() > 0


def test_peft_adds_the_out_proj_update_twice(tmp_path):
    """Why the parity tests halve peft's out_proj scaling: unpatched peft equals W_out + 2·s·B'A'."""
    make = maker("batch_first")
    peft_side, delta_side = save_and_load(make, LORA, "deltatune_to_peft", tmp_path)
    x = make().example()
    with torch.no_grad():
        torch.testing.assert_close(peft_side(x), reference(make, delta_side, out_proj_times=2)(x), atol=1e-5, rtol=0)
        assert (peft_side(x) - delta_side(x)).abs().max() > 1e-3


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_merge_matches_and_unmerge_restores(variant):
    make = maker(variant)
    model = random_model(make)
    x, before = make().example(), copy.deepcopy(make().state_dict())
    with torch.no_grad():
        unmerged = model(x)
        model.merge_adapter(safe_merge=True)
        torch.testing.assert_close(model(x), unmerged, atol=MERGE_ATOL, rtol=0)
        merged_weight = model.base_model.attn.base_layer.in_proj_weight.clone()
        model.unmerge_adapter()
        torch.testing.assert_close(model(x), unmerged, atol=1e-6, rtol=0)
    attn = model.base_model.attn.base_layer
    assert (merged_weight - before["attn.in_proj_weight"]).abs().max() > 1e-3
    torch.testing.assert_close(attn.in_proj_weight, before["attn.in_proj_weight"], atol=1e-6, rtol=0)
    torch.testing.assert_close(attn.out_proj.base_layer.weight, before["attn.out_proj.weight"], atol=1e-6, rtol=0)


def test_merge_and_unload_gives_the_plain_module_with_merged_weights():
    make = maker("batch_first")
    model = random_model(make)
    x, expected = make().example(), reference(make, model)
    merged = model.merge_and_unload()
    assert type(merged.attn) is nn.MultiheadAttention and type(merged.attn.out_proj) is not LoraLinear
    assert merged.state_dict().keys() == make().state_dict().keys()
    with torch.no_grad():
        torch.testing.assert_close(merged(x), expected(x), atol=MERGE_ATOL, rtol=0)


@pytest.mark.parametrize("removal", ["unload", "delete_adapter"])
def test_removing_the_adapter_restores_the_module_exactly(removal):
    make = maker("batch_first")
    model = random_model(make)
    if removal == "unload":
        plain = model.unload()
    else:
        model.add_adapter("other", deltatune.LoraConfig(**LORA))
        model.delete_adapter("default")
        assert isinstance(model.base_model.attn, LoraMultiheadAttention)
        model.delete_adapter("other")
        plain = model.base_model
    assert [type(m) for m in plain.modules()] == [type(m) for m in make().modules()]
    for name, tensor in make().state_dict().items():
        torch.testing.assert_close(plain.state_dict()[name], tensor, atol=0, rtol=0, msg=name)


def test_two_adapters_switch_and_disable():
    make = maker("batch_first")
    model = random_model(make)
    model.add_adapter("other", deltatune.LoraConfig(**{**LORA, "r": 4}, init_lora_weights=False))
    perturb_trainable(model)
    x = make().example()
    with torch.no_grad():
        first_output = model(x)
        model.set_adapter("other")
        layer = model.base_model.attn
        assert layer.active_adapters == layer.out_proj.active_adapters == ["other"]
        assert (model(x) - first_output).abs().max() > 1e-3
        with model.disable_adapter():
            torch.testing.assert_close(model(x), make()(x), atol=1e-6, rtol=0)


def test_only_the_adapter_trains():
    model = random_model(maker("batch_first"))
    first(model(model.base_model.example())).square().mean().backward()
    trained = {name for name, p in model.named_parameters() if p.grad is not None}
    assert trained == {name for name, p in model.named_parameters() if p.requires_grad} and len(trained) == 4
    assert all(".lora_" in name for name in trained)


# refusal -> (model, LoraConfig overrides, message)
REFUSALS = {
    "use_dora": (AttentionNet, {"use_dora": True}, r"use_dora=True does not work on MultiheadAttention attn"),
    "lora_bias": (AttentionNet, {"lora_bias": True}, r"lora_bias=True does not work on MultiheadAttention attn"),
    "separate_kv_dims": (lambda: AttentionNet(kdim=4, vdim=4), {}, r"MultiheadAttention attn needs kdim = vdim"),
    "out_proj_alone": (AttentionNet, {"target_modules": ["attn.out_proj"]}, r"attn.out_proj is a MultiheadAttention's"),
    "pissa": (AttentionNet, {"init_lora_weights": "pissa"}, r"init_lora_weights='pissa'.*MultiheadAttention attn"),
}


@pytest.mark.parametrize("refusal", list(REFUSALS))
def test_refusals_name_the_module_and_leave_the_model_alone(refusal):
    make, lora, message = REFUSALS[refusal]
    model = _seeded(make)
    with pytest.raises(ConfigError, match=message):
        deltatune.get_delta_model(model, deltatune.LoraConfig(**{**LORA, **lora}))
    assert type(model.attn) is nn.MultiheadAttention and type(model.attn.out_proj) is not LoraLinear


def test_all_linear_leaves_an_attention_out_proj_to_the_attention():
    """ "all-linear" skips nn.MultiheadAttention's out_proj (the attention never calls it as a module)."""
    model = nn.Sequential(nn.Linear(8, 8), nn.MultiheadAttention(8, 2))
    delta = deltatune.get_delta_model(model, deltatune.LoraConfig(r=2, target_modules="all-linear"))
    adapted = {name for name, m in delta.base_model.named_modules() if getattr(m, "is_delta_layer", False)}
    assert adapted == {"0"}
