"""The fused LoRA path equals the plain formula, saves only x and rank-r tensors, and composes with
activation checkpointing and ``torch.compile``.

The reference is the LoRA formula written out in float64 with plain autograd,
``y = x Wᵀ + b + Σ s (x ⊙ M / (1 - p)) Aᵀ Bᵀ``, on the very same values (and dropout masks).
Errors are measured against the reference's largest magnitude: ``max|got - ref| <= tol * max|ref|``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

import deltatune
from deltatune.kernels import LoraFactors, fused_lora_linear
from deltatune.kernels.lora_linear import draw_seed, dropout_mask, quantized_dropout
from deltatune.tuners.lora.layer import LoraLinear
from tensor_checks import DEVICES, assert_matches_reference, saved_bytes
from tiny_models import LLAMA_LINEAR, tiny_gpt2, tiny_llama, token_inputs

FUSED_NODE = "_LoraLinearFunctionBackward"
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
IN, OUT, ROWS = 24, 20, 6


def make_case(dtype, shape, fan_in_fan_out=False, bias=True, ranks=(4,), dropouts=None, seed=0, device="cpu"):
    """Leaf tensors: x of ``shape`` (last dim IN), W, b in ``dtype``; fp32 master A/B per rank."""
    gen = torch.Generator().manual_seed(seed)

    def leaf(*size, dtype=dtype, scale=1.0):
        return (torch.randn(*size, generator=gen) * scale).to(device, dtype).requires_grad_()

    x = leaf(*shape)
    weight = leaf(*((IN, OUT) if fan_in_fan_out else (OUT, IN)), scale=0.2).detach()  # frozen
    b = leaf(OUT) if bias else None
    dropouts = dropouts or [0.0] * len(ranks)
    factors = [
        LoraFactors(leaf(r, IN, dtype=torch.float32, scale=0.3), leaf(OUT, r, dtype=torch.float32, scale=0.3), s, p)
        for r, s, p in zip(ranks, (2.0, 0.5, 1.5), dropouts)
    ]
    return x, weight, b, factors


def leaves_of(x, bias, factors) -> dict[str, torch.Tensor | None]:
    """The differentiable inputs by name: x, bias, a0, b0, a1, b1, ..."""
    return {"x": x, "bias": bias, **{f"{k}{i}": t for i, f in enumerate(factors) for k, t in (("a", f.a), ("b", f.b))}}


def reference(x, weight, bias, factors, fan_in_fan_out, masks):
    """The LoRA formula in float64 on detached copies; returns (y, dict of leaf copies)."""
    ref = {
        k: None if v is None else v.detach().double().requires_grad_() for k, v in leaves_of(x, bias, factors).items()
    }
    w = weight.double()
    y = ref["x"] @ (w if fan_in_fan_out else w.t())
    if bias is not None:
        y = y + ref["bias"]
    for i, (f, mask) in enumerate(zip(factors, masks)):
        adapter_in = ref["x"] if mask is None else ref["x"] * mask.double() / (1 - quantized_dropout(f.dropout))
        y = y + f.scaling * (adapter_in @ ref[f"a{i}"].t()) @ ref[f"b{i}"].t()
    return y, ref


def check_against_reference(x, weight, bias, factors, fan_in_fan_out=False, seed=1234):
    """Run the fused function under ``seed`` and compare y, dx, db, dA, dB with the float64 formula."""
    torch.manual_seed(seed)
    y = fused_lora_linear(x, weight, bias, factors, fan_in_fan_out)
    torch.manual_seed(seed)  # the masks the function drew: same seeds, same order
    masks = [None if f.dropout == 0 else dropout_mask(x.shape, f.dropout, draw_seed(), x.device) for f in factors]
    ref_y, ref = reference(x, weight, bias, factors, fan_in_fan_out, masks)
    assert y.dtype == x.dtype
    assert_matches_reference(y, ref_y, leaves_of(x, bias, factors), ref, TOLERANCE[x.dtype], FUSED_NODE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(ROWS, IN), (2, 3, IN)], ids=["2d", "3d"])
@pytest.mark.parametrize("fan_in_fan_out", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("device", DEVICES)
def test_fused_equals_formula(dtype, shape, fan_in_fan_out, bias, device):
    case = make_case(dtype, shape, fan_in_fan_out, bias, device=device)
    check_against_reference(*case, fan_in_fan_out=fan_in_fan_out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_equals_formula_for_non_contiguous_input_and_three_adapters(dtype):
    x, weight, bias, factors = make_case(dtype, (3, 2, IN), ranks=(4, 2, 3))
    x_t = x.detach().transpose(0, 1).requires_grad_()  # [2, 3, IN], not contiguous
    assert not x_t.is_contiguous()
    check_against_reference(x_t, weight, bias, factors)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_dropout_equals_formula_with_the_same_masks(dtype):
    """Two adapters with different dropout (one off): masks regenerated in backward match forward's."""
    check_against_reference(*make_case(dtype, (2, 5, IN), ranks=(4, 2), dropouts=[0.3, 0.0]))
    x, weight, bias, factors = make_case(dtype, (2, 5, IN), dropouts=[0.5])
    torch.manual_seed(0)
    no_dropout = [factors[0]._replace(dropout=0.0)]
    dropped = fused_lora_linear(x, weight, None, factors) - fused_lora_linear(x, weight, None, no_dropout)
    assert dropped.abs().max() > 0, "dropout had no effect; the comparison is void"


@pytest.mark.parametrize("p", [0.05, 0.1, 0.3, 0.5])
def test_dropout_masks_keep_with_the_quantized_probability_and_replay_from_their_seed(p):
    """One 64-bit draw gives four 16-bit lanes: each element keeps with probability 1 - p̂, p̂ within 8e-6 of p."""
    assert abs(quantized_dropout(p) - p) <= 2**-17 and quantized_dropout(p) * 2**16 == round(
        quantized_dropout(p) * 2**16
    )
    shape = torch.Size([1001, 999])  # not a multiple of four elements
    mask = dropout_mask(shape, p, 123, torch.device("cpu"))
    assert mask.shape == shape and mask.dtype == torch.bool
    keep = mask.double().mean().item()
    sigma = (p * (1 - p) / shape.numel()) ** 0.5
    assert abs(keep - (1 - quantized_dropout(p))) < 5 * sigma
    for lane in range(4):  # no lane of the 64-bit draws is biased
        lane_keep = mask.flatten()[lane::4].double().mean().item()
        assert abs(lane_keep - (1 - p)) < 5 * sigma * 2
    assert torch.equal(mask, dropout_mask(shape, p, 123, torch.device("cpu")))
    assert not torch.equal(mask, dropout_mask(shape, p, 124, torch.device("cpu")))
    assert dropout_mask(shape, p, 1, torch.device("meta")).shape == shape


def three_projections(dtype, dropout=0.0):
    """q/k/v-like LoraLinear layers (bf16/fp32 base, fp32 adapters) reading one shared x [4, 5, 32]."""
    layers = []
    for seed in range(3):
        torch.manual_seed(seed)
        layer = LoraLinear(nn.Linear(32, 16, dtype=dtype)).requires_grad_(False)
        layer.add("default", 4, 8, deltatune.LoraConfig(r=4, lora_dropout=dropout, init_lora_weights=False))
        layer.active_adapters = ["default"]
        for _, param in layer.adapter_parameters("default"):
            param.requires_grad_(True)
        layers.append(layer.train())
    x = torch.randn(4, 5, 32, dtype=dtype, requires_grad=True)
    return layers, x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_input_is_saved_once_and_dropout_saves_nothing_extra(dtype):
    """Saved per q/k/v: only the rank-r h; x once, in its own dtype; the same with dropout 0.3."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = {str(dtype): 4 * 5 * 32 * itemsize + 3 * 4 * 5 * 4 * itemsize}
    for dropout in (0.0, 0.3):
        layers, x = three_projections(dtype, dropout)
        weights = [p for layer in layers for p in layer.parameters()]
        assert saved_bytes(lambda layers=layers, x=x: [layer(x) for layer in layers], weights) == expected
    LoraLinear.fused = False
    try:  # the plain path (peft's graph) keeps far more: an fp32 copy of x per projection for bf16, dropped x's
        layers, x = three_projections(dtype, 0.3)
        weights = [p for layer in layers for p in layer.parameters()]
        plain = sum(saved_bytes(lambda: [layer(x) for layer in layers], weights).values())
    finally:
        LoraLinear.fused = True
    assert plain > 2 * sum(expected.values())


def layer_pair(base: nn.Module, names=("default", "other")):
    """A LoraLinear over ``base`` with random non-zero adapters ``names``, all active and trainable."""
    layer = LoraLinear(base.requires_grad_(False))
    for i, name in enumerate(names):
        torch.manual_seed(i)
        layer.add(name, 3 + i, 5 + i, deltatune.LoraConfig(r=3 + i, lora_alpha=5 + i, init_lora_weights=False))
        for _, param in layer.adapter_parameters(name):
            param.requires_grad_(True)
    layer.active_adapters = list(names)
    return layer


def grads_of(layer: LoraLinear, x: torch.Tensor, fused: bool):
    layer.fused = fused
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    y = layer(x)
    y.square().sum().backward()
    grads = {name: p.grad for name, p in layer.named_parameters() if p.requires_grad}
    return y.grad_fn.name(), y.detach(), x.grad, grads


@pytest.mark.parametrize("make_base", [lambda: nn.Linear(12, 10), lambda: Conv1D(10, 12)], ids=["linear", "conv1d"])
def test_layer_fused_path_matches_plain_path_with_bias_and_two_adapters(make_base):
    torch.manual_seed(3)
    layer = layer_pair(make_base())
    layer.base_layer.bias.requires_grad_(True)  # bias="lora_only"/"all" trains it
    x = torch.randn(2, 4, 12)
    node, y, dx, grads = grads_of(layer, x, fused=True)
    plain_node, plain_y, plain_dx, plain_grads = grads_of(layer, x, fused=False)
    assert node == FUSED_NODE != plain_node
    torch.testing.assert_close(y, plain_y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx, plain_dx, rtol=1e-5, atol=1e-6)
    assert grads.keys() == plain_grads.keys() and "base_layer.bias" in grads and len(grads) == 5
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_merged_and_disabled_layers_run_the_base_layer_only():
    torch.manual_seed(4)
    layer = layer_pair(nn.Linear(12, 10))
    x = torch.randn(3, 12)
    unmerged = layer(x).detach()
    layer.merge(["default"])  # "other" still runs through the fused function, "default" is in W now
    y = layer(x)
    assert y.grad_fn.name() == FUSED_NODE
    torch.testing.assert_close(y, unmerged, rtol=1e-5, atol=1e-5)
    layer.merge(["other"])
    merged = layer(x)
    assert merged.grad_fn is None  # the frozen base alone: nothing to train through
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    layer.disabled = True
    torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=0)


def test_layers_the_fused_function_cannot_reproduce_take_the_plain_path():
    torch.manual_seed(5)
    layer = layer_pair(nn.Linear(12, 10))
    x = torch.randn(3, 12)
    fused, base = layer(x), layer.base_layer(x)
    assert fused.grad_fn.name() == FUSED_NODE
    handle = layer.base_layer.register_forward_hook(lambda module, args, out: out * 2)
    hooked = layer(x)
    assert hooked.grad_fn.name() != FUSED_NODE
    torch.testing.assert_close(hooked, fused + base)  # 2·base + lora: the hook ran
    handle.remove()
    layer.base_layer.weight.requires_grad_(True)  # a trainable base weight needs dW, which the function skips
    layer(x).sum().backward()
    assert layer.base_layer.weight.grad is not None


def test_autocast_runs_the_base_gemm_in_bf16_and_returns_fp32_gradients():
    torch.manual_seed(6)
    layer = layer_pair(nn.Linear(16, 8))
    x = torch.randn(4, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        layer.fused = False
        plain = layer(x)
        layer.fused = True
    assert y.grad_fn.name() == FUSED_NODE and y.dtype == plain.dtype == torch.bfloat16
    torch.testing.assert_close(y, plain, rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.lora_A["default"].weight.grad.dtype == torch.float32


def test_fp32_adapter_option_keeps_the_bf16_input_uncopied_and_is_more_precise():
    """``adapter_dtype=torch.float32``: rank-r math in fp32, and still only the bf16 x is saved."""
    x, weight, _, factors = make_case(torch.bfloat16, (ROWS, IN))
    ref_y, _ = reference(x, weight, None, factors, False, [None])
    x_bytes, h_elements, weights = ROWS * IN * 2, ROWS * 4, [weight, *factors[0][:2]]
    bf16 = saved_bytes(lambda: fused_lora_linear(x, weight, None, factors), weights)
    assert bf16 == {"torch.bfloat16": x_bytes + h_elements * 2}
    fp32 = lambda: fused_lora_linear(x, weight, None, factors, adapter_dtype=torch.float32)  # noqa: E731
    assert saved_bytes(fp32, weights) == {"torch.bfloat16": x_bytes, "torch.float32": h_elements * 4}
    # the base GEMM is bf16 in both; compare each output's LoRA part with the exact one
    base = (x.double() @ weight.double().t()).to(torch.bfloat16).double()
    error_bf16 = (fused_lora_linear(x, weight, None, factors).double() - ref_y).abs().max()
    error_fp32 = (fp32().double() - ref_y).abs().max()
    assert error_fp32 <= error_bf16 and (ref_y - base).abs().max() > 0.1


def lora_grads(model, inputs) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(11)  # dropout masks
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    return {name.removeprefix("_orig_mod."): p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def fused_llama(dropout=0.0):
    config = deltatune.LoraConfig(target_modules=LLAMA_LINEAR, lora_dropout=dropout, init_lora_weights=False)
    return deltatune.get_delta_model(tiny_llama(), config).train()


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_gradient_checkpointing_gives_the_same_gradients(use_reentrant):
    """Recomputation replays the dropout seeds, so even with dropout the gradients are unchanged."""
    inputs = token_inputs()
    model = fused_llama(dropout=0.2)
    expected = lora_grads(model, inputs)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert model.base_model.model.gradient_checkpointing
    got = lora_grads(model, inputs)
    assert got.keys() == expected.keys() and len(got) == 2 * 2 * len(LLAMA_LINEAR)
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_lora_layer_compiles_without_graph_break(dropout):
    """``fullgraph=True`` fails on any graph break; with dropout the layer takes the traceable plain path."""
    torch.manual_seed(7)
    layer = layer_pair(Conv1D(10, 12), names=("default",))
    layer.lora_dropout["default"] = nn.Dropout(dropout)
    layer.train()
    x = torch.randn(2, 3, 12, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.manual_seed(0)
    y = compiled(x)
    y.square().sum().backward()
    assert x.grad is not None and layer.lora_A["default"].weight.grad is not None
    if dropout == 0:
        eager = layer_pair(Conv1D(10, 12), names=("default",))
        eager.load_state_dict(layer.state_dict())
        _, eager_y, eager_dx, _ = grads_of(eager, x, fused=True)
        torch.testing.assert_close(y.detach(), eager_y)
        torch.testing.assert_close(x.grad, eager_dx)


def test_tiny_llama_compiles_whole_and_trains():
    """The whole DeltaModel compiles as ONE graph (fullgraph) and its gradients equal eager's."""
    inputs = token_inputs()
    model = fused_llama()
    expected = lora_grads(model, inputs)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = lora_grads(compiled, inputs)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss = compiled(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_gpt2_trains_through_the_fused_path_with_trained_biases():
    model = deltatune.get_delta_model(
        tiny_gpt2(), deltatune.LoraConfig(target_modules=["c_attn", "c_fc"], bias="lora_only")
    )
    inputs = token_inputs()
    out = model(**inputs, labels=inputs["input_ids"])
    layer = model.base_model.transformer.h[0].attn.c_attn
    assert layer.base_layer.bias.requires_grad and layer(torch.randn(1, 2, 32)).grad_fn.name() == FUSED_NODE
    out.loss.backward()
    assert layer.base_layer.bias.grad.abs().max() > 0 and layer.lora_B["default"].weight.grad.abs().max() > 0


@pytest.mark.parametrize("device,dtype", [("cpu", torch.bfloat16), ("meta", torch.float32)])
def test_adapters_are_created_on_the_base_device_with_fp32_masters(device, dtype):
    config = tiny_llama().config
    with torch.device(device):
        base = LlamaForCausalLM(config).to(dtype)
    model = deltatune.get_delta_model(base, deltatune.LoraConfig(target_modules=["q_proj"]))
    lora_a = model.base_model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert lora_a.device.type == device and lora_a.dtype == torch.float32
