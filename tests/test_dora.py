"""DoRA: the fused function equals the formula, the rank-r weight norm equals the direct one, and merging,
unmerging, several adapters and training behave as in peft (file/logit/gradient parity for every layer
type is in test_peft_parity.py's ``dora_*`` scenarios).

The reference formula, in float64 with plain autograd, applies the adapters in order as peft does: a
plain LoRA adapter adds s_i (x ⊙ M_i / q_i) A_iᵀ B_iᵀ, a DoRA adapter (g_i = m_i / n_i, n_i a constant)
replaces y by y + (g_i − 1) ⊙ (y − b) + g_i ⊙ s_i (x ⊙ M_i / q_i) A_iᵀ B_iᵀ.
"""

from __future__ import annotations

import peft
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune
from deltatune import LoraConfig, MergeError, get_delta_model
from deltatune.kernels import LoraFactors
from deltatune.kernels.dora_linear import fused_dora_linear, weight_norm
from deltatune.kernels.lora_linear import draw_seed, dropout_mask, quantized_dropout
from deltatune.kernels.lora_mlp import Projection, fused_lora_mlp
from deltatune.tuners.lora.layer import LoraLinear
from tensor_checks import assert_matches_reference, saved_bytes
from tiny_models import (
    LLAMA_LINEAR,
    build,
    inputs_for,
    output_tensor,
    perturb_trainable,
    tiny_llama,
    token_inputs,
)

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

DORA_NODE = "_DoraLinearFunctionBackward"
MLP_NODE = "_LoraMlpFunctionBackward"
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
IN, OUT = 24, 20


def make_case(dtype, shape, fan_in_fan_out=False, bias=True, kinds=("dora",), dropouts=None, seed=0):
    """x, frozen W, b in ``dtype``; per adapter fp32 A [4, IN], B [OUT, 4], and for DoRA m [OUT] and n [OUT]."""
    gen = torch.Generator().manual_seed(seed)

    def leaf(*size, dtype=dtype, scale=1.0, offset=0.0):
        return (torch.randn(*size, generator=gen) * scale + offset).to(dtype).requires_grad_()

    x = leaf(*shape)
    weight = leaf(*((IN, OUT) if fan_in_fan_out else (OUT, IN)), scale=0.2).detach()
    b = leaf(OUT) if bias else None
    dropouts = dropouts or [0.0] * len(kinds)
    factors = []
    for kind, scaling, p in zip(kinds, (2.0, 0.5, 1.5), dropouts):
        a, b_factor = leaf(4, IN, dtype=torch.float32, scale=0.3), leaf(OUT, 4, dtype=torch.float32, scale=0.3)
        magnitude = norm = None
        if kind == "dora":
            norm = weight_norm(weight, a, b_factor, scaling, fan_in_fan_out)
            magnitude = (norm * (1 + 0.2 * torch.randn(OUT, generator=gen))).detach().requires_grad_()
        factors.append(LoraFactors(a, b_factor, scaling, p, magnitude, norm))
    return x, weight, b, factors


def leaves_of(x, bias, factors) -> dict[str, torch.Tensor | None]:
    leaves = {"x": x, "bias": bias}
    for i, f in enumerate(factors):
        leaves.update({f"a{i}": f.a, f"b{i}": f.b, f"m{i}": f.magnitude})
    return leaves


def reference(x, weight, bias, factors, fan_in_fan_out, masks):
    """The module docstring's formula in float64 on detached copies; returns (y, dict of leaf copies)."""
    ref = {
        k: None if v is None else v.detach().double().requires_grad_() for k, v in leaves_of(x, bias, factors).items()
    }
    w = weight.double()
    base = ref["x"] @ (w if fan_in_fan_out else w.t())
    y = base if bias is None else base + ref["bias"]
    for i, (f, mask) in enumerate(zip(factors, masks)):
        adapter_in = ref["x"] if mask is None else ref["x"] * mask.double() / (1 - quantized_dropout(f.dropout))
        lora = f.scaling * (adapter_in @ ref[f"a{i}"].t()) @ ref[f"b{i}"].t()
        if f.magnitude is None:
            y = y + lora
        else:  # peft's order: each DoRA adapter rescales what the adapters before it made
            gain = ref[f"m{i}"] / f.norm.double()
            y = y + (gain - 1) * (y if bias is None else y - ref["bias"]) + gain * lora
    return y, ref


def check_against_reference(x, weight, bias, factors, fan_in_fan_out=False, seed=1234):
    torch.manual_seed(seed)
    y = fused_dora_linear(x, weight, bias, factors, fan_in_fan_out)
    torch.manual_seed(seed)
    masks = [None if f.dropout == 0 else dropout_mask(x.shape, f.dropout, draw_seed(), x.device) for f in factors]
    ref_y, ref = reference(x, weight, bias, factors, fan_in_fan_out, masks)
    assert y.dtype == x.dtype
    assert_matches_reference(y, ref_y, leaves_of(x, bias, factors), ref, TOLERANCE[x.dtype], DORA_NODE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fan_in_fan_out", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_fused_dora_equals_formula(dtype, fan_in_fan_out, bias):
    check_against_reference(*make_case(dtype, (2, 3, IN), fan_in_fan_out, bias), fan_in_fan_out=fan_in_fan_out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kinds", [("dora", "dora"), ("lora", "dora", "dora"), ("dora", "lora")])
def test_fused_dora_equals_formula_with_several_adapters_and_dropout(dtype, kinds):
    dropouts = [0.3, 0.0, 0.1][: len(kinds)]
    check_against_reference(*make_case(dtype, (3, 5, IN), kinds=kinds, dropouts=dropouts))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fan_in_fan_out", [False, True], ids=["linear", "conv1d"])
def test_rank_r_weight_norm_equals_the_direct_norm(dtype, fan_in_fan_out):
    """||W + s·BA|| per output row from W Aᵀ and A Aᵀ: nothing [out, in] is formed beyond W itself."""
    torch.manual_seed(0)
    weight = torch.randn((IN, OUT) if fan_in_fan_out else (OUT, IN), dtype=dtype)
    a, b = torch.randn(4, IN), torch.randn(OUT, 4)
    dense = weight.double().t() if fan_in_fan_out else weight.double()
    direct = torch.linalg.vector_norm(dense + 0.7 * (b.double() @ a.double()), dim=1)
    got = weight_norm(weight, a, b, 0.7, fan_in_fan_out)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), direct, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=0)


def test_fused_dora_saves_x_z_and_rank_r_products_only():
    """Saved for backward: x, z = x Wᵀ, h (rank r) and n [out]; the plain (peft-like) graph keeps more."""
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(32, 16).requires_grad_(False))
    layer.add("default", 4, 8, LoraConfig(r=4, use_dora=True, init_lora_weights=False))
    layer.active_adapters = ["default"]
    for _, param in layer.adapter_parameters("default"):
        param.requires_grad_(True)
    x = torch.randn(4, 5, 32, requires_grad=True)
    weights = list(layer.parameters())
    fused = saved_bytes(lambda: layer(x), weights)
    assert fused == {"torch.float32": 4 * 5 * (32 + 16 + 4) * 4 + 16 * 4}  # x, z, h; and the norm n [out]
    layer.fused = False
    plain = saved_bytes(lambda: layer(x), weights)
    assert sum(plain.values()) > sum(fused.values())


def _dora_pair(targets, seed=0, **kwargs):
    """(peft model, deltatune model) with the same random DoRA adapter (magnitudes perturbed too)."""
    config = {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": targets,
        "use_dora": True,
        "init_lora_weights": False,
        **kwargs,
    }
    torch.manual_seed(seed)
    peft_side = peft.get_peft_model(build("llama"), peft.LoraConfig(**config))
    perturb_trainable(peft_side)
    delta_side = get_delta_model(build("llama"), LoraConfig(**config))
    state = peft.get_peft_model_state_dict(peft_side, save_embedding_layers=False)
    files = {deltatune.io.to_file_key(name, "default"): p for name, p in delta_side.adapter_state("default").items()}
    assert sorted(files) == sorted(state)
    with torch.no_grad():
        for key, param in files.items():
            param.copy_(state[key])
    return peft_side, delta_side


def test_merge_and_unmerge_match_peft_and_restore_the_base():
    peft_side, delta_side = _dora_pair([*LLAMA_LINEAR, "embed_tokens"])
    inputs = inputs_for("llama")
    base_weights = {k: v.clone() for k, v in build("llama").state_dict().items()}
    with torch.no_grad():
        unmerged = output_tensor(delta_side(**inputs))
        torch.testing.assert_close(unmerged, output_tensor(peft_side(**inputs)), atol=1e-5, rtol=0)
        delta_side.merge_adapter()
        peft_side.merge_adapter()
        merged = output_tensor(delta_side(**inputs))
        torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=0)
        torch.testing.assert_close(merged, output_tensor(peft_side(**inputs)), atol=1e-4, rtol=0)
        delta_side.unmerge_adapter()
        torch.testing.assert_close(output_tensor(delta_side(**inputs)), unmerged, atol=1e-5, rtol=0)
        restored = delta_side.unload().state_dict()
    for key, value in base_weights.items():
        torch.testing.assert_close(restored[key], value, atol=1e-5, rtol=0, msg=key)  # fp32 rounding of ÷ then ×


def test_merge_and_unload_gives_a_plain_model_with_peft_merged_weights():
    peft_side, delta_side = _dora_pair(["q_proj", "down_proj"])
    merged_delta = delta_side.merge_and_unload().state_dict()
    merged_peft = peft_side.merge_and_unload().state_dict()
    assert merged_delta.keys() == merged_peft.keys()
    for key in merged_peft:
        torch.testing.assert_close(merged_delta[key], merged_peft[key], atol=1e-5, rtol=0, msg=key)


def test_safe_merge_refuses_a_nan_magnitude_and_changes_nothing():
    _, delta_side = _dora_pair(["q_proj", "v_proj"])
    before = {k: v.clone() for k, v in delta_side.state_dict().items()}
    with torch.no_grad():
        delta_side.base_model.model.layers[1].self_attn.v_proj.lora_magnitude_vector["default"][3] = float("nan")
    with pytest.raises(MergeError, match="v_proj"):
        delta_side.merge_adapter(safe_merge=True)
    assert not delta_side.merged_adapters
    for key, value in delta_side.state_dict().items():
        if "lora_magnitude_vector" not in key:
            torch.testing.assert_close(value, before[key], atol=0, rtol=0)


def test_two_dora_adapters_active_together_match_peft():
    targets = ["q_proj", "v_proj", "up_proj", "embed_tokens"]
    peft_side, delta_side = _dora_pair(targets)
    other = {
        "r": 2,
        "lora_alpha": 6,
        "target_modules": ["q_proj", "down_proj"],
        "use_dora": True,
        "init_lora_weights": False,
    }
    torch.manual_seed(3)
    peft_side.add_adapter("other", peft.LoraConfig(**other))
    delta_side.add_adapter("other", LoraConfig(**other))
    state = peft.get_peft_model_state_dict(peft_side, adapter_name="other")
    with torch.no_grad():
        for name, param in delta_side.adapter_state("other").items():
            param.copy_(state[deltatune.io.to_file_key(name, "other")] + 0.05)
            peft_param = state[deltatune.io.to_file_key(name, "other")]
            peft_param.add_(0.05)
    peft_side.base_model.set_adapter(["default", "other"])
    delta_side.set_adapter(["default", "other"])
    inputs = inputs_for("llama")
    with torch.no_grad():
        torch.testing.assert_close(
            output_tensor(delta_side(**inputs)), output_tensor(peft_side(**inputs)), atol=1e-5, rtol=0
        )
        delta_side.merge_adapter()
        peft_side.merge_adapter()
        torch.testing.assert_close(
            output_tensor(delta_side(**inputs)), output_tensor(peft_side(**inputs)), atol=1e-4, rtol=0
        )


def test_a_training_step_moves_the_magnitudes_and_only_the_adapter():
    model = get_delta_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", use_dora=True, lora_dropout=0.1))
    model.train()
    frozen = {name: p.clone() for name, p in model.named_parameters() if not p.requires_grad}
    magnitudes = {name: p.clone() for name, p in model.named_parameters() if "lora_magnitude_vector" in name}
    assert magnitudes and all(p.requires_grad for n, p in model.named_parameters() if "lora_magnitude_vector" in n)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = token_inputs()
    for _ in range(2):
        optimizer.zero_grad()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
    params = dict(model.named_parameters())
    assert all(not torch.equal(params[name], value) for name, value in magnitudes.items())
    assert all(torch.equal(params[name], value) for name, value in frozen.items())


def test_dora_starts_at_the_base_model():
    """m = ||W0 + s·BA|| at creation and B = 0: the model computes exactly what the base computes."""
    base = tiny_llama()
    inputs = token_inputs()
    with torch.no_grad():
        expected = base(**inputs).logits
        model = get_delta_model(base, LoraConfig(r=4, target_modules=[*LLAMA_LINEAR, "embed_tokens"], use_dora=True))
        torch.testing.assert_close(model(**inputs).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("make_base", [lambda: nn.Linear(12, 10), lambda: Conv1D(10, 12)], ids=["linear", "conv1d"])
def test_fused_and_plain_paths_agree_with_dropout_in_eval_and_train_without(make_base):
    torch.manual_seed(0)
    layer = LoraLinear(make_base().requires_grad_(False))
    layer.add("default", 3, 6, LoraConfig(r=3, lora_alpha=6, use_dora=True, init_lora_weights=False))
    layer.active_adapters = ["default"]
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].mul_(1.3)
    for _, param in layer.adapter_parameters("default"):
        param.requires_grad_(True)
    x = torch.randn(2, 4, 12)
    results = {}
    for fused in (True, False):
        layer.fused = fused
        layer.zero_grad(set_to_none=True)
        y = layer(x)
        y.square().sum().backward()
        results[fused] = (
            y.grad_fn.name(),
            y.detach(),
            {n: p.grad.clone() for n, p in layer.named_parameters() if p.requires_grad},
        )
    assert results[True][0] == DORA_NODE != results[False][0]
    torch.testing.assert_close(results[True][1], results[False][1], rtol=1e-5, atol=1e-6)
    for name, grad in results[True][2].items():
        torch.testing.assert_close(grad, results[False][2][name], rtol=1e-5, atol=1e-6, msg=name)


# -- DoRA inside the fused gated MLP ------------------------------------------------------------
MLP_HIDDEN, MLP_INTER = 16, 40


def make_dora_mlp_case(dtype, kinds, bias=True, dropout=0.0, seed=0):
    """x and gate/up/down projections whose adapters are ``kinds[i]`` ("dora" or "lora" each): frozen W/b in
    ``dtype``, fp32 factors and magnitudes (m = 1.2 · n ± noise, so the gain is not 1)."""
    gen = torch.Generator().manual_seed(seed)

    def leaf(*size, dtype=dtype, scale=0.3):
        return (torch.randn(*size, generator=gen) * scale).to(dtype).requires_grad_()

    def projection(out_features, in_features, adapter_kinds):
        weight = leaf(out_features, in_features).detach()
        adapters = []
        for j, kind in enumerate(adapter_kinds):
            a, b = leaf(4, in_features, dtype=torch.float32), leaf(out_features, 4, dtype=torch.float32)
            scaling, p = (2.0, 0.5)[j % 2], dropout if j == 0 else 0.0
            magnitude = norm = None
            if kind == "dora":
                norm = weight_norm(weight, a, b, scaling, False)
                magnitude = (norm * (1.2 + 0.1 * torch.randn(out_features, generator=gen))).detach().requires_grad_()
            adapters.append(LoraFactors(a, b, scaling, p, magnitude, norm))
        return Projection(weight, leaf(out_features) if bias else None, adapters)

    x = leaf(2, 3, MLP_HIDDEN, scale=1.0)
    return (
        x,
        projection(MLP_INTER, MLP_HIDDEN, kinds[0]),
        projection(MLP_INTER, MLP_HIDDEN, kinds[1]),
        projection(MLP_HIDDEN, MLP_INTER, kinds[2]),
    )


def check_dora_mlp(x, gate, up, down, seed=1234):
    projections = (gate, up, down)
    torch.manual_seed(seed)
    y = fused_lora_mlp(x, gate, up, down, "silu")
    leaves = [x] + [p.bias for p in projections if p.bias is not None]
    leaves += [t for p in projections for f in p.adapters for t in (f.a, f.b, f.magnitude) if t is not None]
    copies = {id(t): t.detach().double().requires_grad_() for t in leaves}
    torch.manual_seed(seed)

    def linear(inputs, projection):  # peft's order, as in ``reference`` above
        bias = None if projection.bias is None else copies[id(projection.bias)]
        out = inputs @ projection.weight.double().t()
        out = out if bias is None else out + bias
        for f in projection.adapters:
            kept = inputs
            if f.dropout > 0:
                mask = dropout_mask(inputs.shape, f.dropout, draw_seed(), inputs.device)
                kept = inputs * mask.double() / (1 - quantized_dropout(f.dropout))
            lora = f.scaling * (kept @ copies[id(f.a)].t()) @ copies[id(f.b)].t()
            if f.magnitude is None:
                out = out + lora
            else:
                gain = copies[id(f.magnitude)] / f.norm.double()
                out = out + (gain - 1) * (out if bias is None else out - bias) + gain * lora
        return out

    x64 = copies[id(x)]
    ref = linear(F.silu(linear(x64, gate)) * linear(x64, up), down)
    named = {f"leaf {i}": t for i, t in enumerate(leaves)}
    assert_matches_reference(y, ref, named, {k: copies[id(t)] for k, t in named.items()}, TOLERANCE[x.dtype], MLP_NODE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "kinds",
    [
        (("dora",), ("dora",), ("dora",)),
        (("dora", "lora"), (), ("lora", "dora")),
        (("lora",), ("dora", "dora"), ()),
    ],
    ids=["all-dora", "mixed", "up-only-two"],
)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_fused_mlp_with_dora_equals_formula(dtype, kinds, bias):
    """gate/up read Σ dy ⊙ z from their saved outputs; down keeps z; with dropout on the first adapters."""
    check_dora_mlp(*make_dora_mlp_case(dtype, kinds, bias, dropout=0.2))


def test_fused_mlp_with_dora_saves_only_down_z_beyond_lora():
    """Beyond a LoRA MLP's x, g, u and rank-r products: the norms [out] and z_d = h W_dᵀ [N, hidden]."""
    x, gate, up, down = make_dora_mlp_case(torch.float32, (("dora",), ("dora",), ("dora",)))
    parameters = [t for p in (gate, up, down) for t in (p.weight, p.bias)]
    parameters += [t for p in (gate, up, down) for f in p.adapters for t in (f.a, f.b, f.magnitude)]
    rows = 2 * 3
    lora = rows * (MLP_HIDDEN + 2 * MLP_INTER) * 4 + rows * 3 * 4 * 4
    extra = rows * MLP_HIDDEN * 4 + (2 * MLP_INTER + MLP_HIDDEN) * 4
    assert saved_bytes(lambda: fused_lora_mlp(x, gate, up, down, "silu"), parameters) == {"torch.float32": lora + extra}
