"""The fused gated MLP equals the plain formula, keeps only x, gate(x) and up(x) for backward, and is
used exactly where it reproduces the modules (and nowhere once the adapters are gone).

Kernel tests compare with ``down(act(gate(x)) * up(x))`` written out in float64 with plain autograd,
each projection ``x Wᵀ + b + Σ s (x ⊙ M / (1 - p)) Aᵀ Bᵀ``, on the same values and dropout masks.
Module tests compare the fused MLP with the same model run layer by layer (``fuse_mlp = False``).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import io
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GemmaConfig, GemmaForCausalLM, activations
from transformers.models.llama.modeling_llama import LlamaMLP

import deltatune
from deltatune.compat.transformers import activation_name
from deltatune.kernels import lora_mlp
from deltatune.kernels.lora_linear import (
    LoraFactors,
    draw_seed,
    dropout_mask,
    quantized_dropout,
)
from deltatune.kernels.lora_mlp import ACTIVATIONS, Projection, fused_lora_mlp
from deltatune.tuners.lora.layer import LoraLinear
from deltatune.tuners.lora.mlp import FusedGatedMlp, is_gated_mlp
from tensor_checks import DEVICES, assert_matches_reference, saved_bytes
from tiny_models import LLAMA_LINEAR, tiny_llama, token_inputs

MLP_NODE = "_LoraMlpFunctionBackward"
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
HIDDEN, INTER = 16, 40
REFERENCE_ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
}


def make_mlp_case(dtype, shape, bias=True, dropout=0.0, seed=0, device="cpu"):
    """x, and gate (two adapters), up (none) and down (one) projections: frozen W/b in ``dtype``, fp32 adapters."""
    gen = torch.Generator().manual_seed(seed)

    def leaf(*size, dtype=dtype, scale=0.3):
        return (torch.randn(*size, generator=gen) * scale).to(device, dtype).requires_grad_()

    def projection(out_features, in_features, shapes):
        weight = leaf(out_features, in_features).detach()
        adapters = [
            LoraFactors(leaf(r, in_features, dtype=torch.float32), leaf(out_features, r, dtype=torch.float32), s, p)
            for r, s, p in shapes
        ]
        return Projection(weight, leaf(out_features) if bias else None, adapters)

    x = leaf(*shape, scale=1.0)
    gate = projection(INTER, HIDDEN, [(4, 2.0, dropout), (2, 0.5, 0.0)])
    up = projection(INTER, HIDDEN, [])
    down = projection(HIDDEN, INTER, [(3, 1.5, dropout)])
    return x, gate, up, down


def differentiable(x, projections) -> list[torch.Tensor]:
    leaves = [x] + [p.bias for p in projections if p.bias is not None]
    return leaves + [t for p in projections for f in p.adapters for t in (f.a, f.b)]


def reference_mlp(x, projections, activation, copies):
    """The MLP formula in float64 on the copies (``copies[id(leaf)]``), drawing masks as the kernel does."""

    def linear(inputs, projection):
        out = inputs @ projection.weight.double().t()
        if projection.bias is not None:
            out = out + copies[id(projection.bias)]
        for f in projection.adapters:
            if f.dropout > 0:
                mask = dropout_mask(inputs.shape, f.dropout, draw_seed(), inputs.device)
                inputs_f = inputs * mask.double() / (1 - quantized_dropout(f.dropout))
            else:
                inputs_f = inputs
            out = out + f.scaling * (inputs_f @ copies[id(f.a)].t()) @ copies[id(f.b)].t()
        return out

    gate, up, down = projections
    x64 = copies[id(x)]
    g, u = linear(x64, gate), linear(x64, up)
    return linear(REFERENCE_ACTIVATIONS[activation](g) * u, down)


def check_mlp(x, gate, up, down, activation="silu", seed=1234, compile_elementwise=None):
    projections = (gate, up, down)
    torch.manual_seed(seed)
    y = fused_lora_mlp(x, gate, up, down, activation, compile_elementwise=compile_elementwise)
    leaves = differentiable(x, projections)
    copies = {id(t): t.detach().double().requires_grad_() for t in leaves}
    torch.manual_seed(seed)  # the same seeds in the same order: the kernel's masks
    ref = reference_mlp(x, projections, activation, copies)
    assert y.dtype == x.dtype and y.shape == x.shape
    named = {f"leaf {i}": leaf for i, leaf in enumerate(leaves)}
    assert_matches_reference(y, ref, named, {k: copies[id(t)] for k, t in named.items()}, TOLERANCE[x.dtype], MLP_NODE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(6, HIDDEN), (2, 3, HIDDEN)], ids=["2d", "3d"])
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("device", DEVICES)
def test_fused_mlp_equals_formula(dtype, shape, activation, bias, device):
    check_mlp(*make_mlp_case(dtype, shape, bias, device=device), activation=activation)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_mlp_with_dropout_and_a_non_contiguous_input_equals_formula(dtype):
    x, gate, up, down = make_mlp_case(dtype, (3, 2, HIDDEN), dropout=0.3)
    x_t = x.detach().transpose(0, 1).requires_grad_()
    assert not x_t.is_contiguous()
    check_mlp(x_t, gate, up, down)
    no_dropout = [p._replace(adapters=[f._replace(dropout=0.0) for f in p.adapters]) for p in (gate, up, down)]
    assert (fused_lora_mlp(x, *no_dropout, "silu") - fused_lora_mlp(x, gate, up, down, "silu")).abs().max() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_mlp_saves_x_gate_and_up_only(dtype):
    """Saved: x [N, hidden], g and u [N, inter] and the rank-r products; with or without dropout."""
    size = torch.empty((), dtype=dtype).element_size()
    rows = 2 * 5
    expected = {str(dtype): rows * (HIDDEN + 2 * INTER) * size + rows * (4 + 2 + 3) * size}
    for dropout in (0.0, 0.3):
        x, gate, up, down = make_mlp_case(dtype, (2, 5, HIDDEN), dropout=dropout)
        parameters = [t for p in (gate, up, down) for t in (p.weight, p.bias) if t is not None]  # saved as references
        weights = parameters + [t for p in (gate, up, down) for f in p.adapters for t in f[:2]]
        step = functools.partial(fused_lora_mlp, x, gate, up, down, "silu")
        assert saved_bytes(step, weights) == expected


def test_without_anything_to_differentiate_the_mlp_runs_outside_autograd():
    x, gate, up, down = make_mlp_case(torch.float32, (2, 3, HIDDEN))
    with torch.no_grad():
        y = fused_lora_mlp(x, gate, up, down, "silu")
    assert y.grad_fn is None
    torch.testing.assert_close(y, fused_lora_mlp(x, gate, up, down, "silu").detach())


# -- in a model -------------------------------------------------------------------------------
def llama_with_lora(target_modules=LLAMA_LINEAR, dropout=0.0, names=("default",), mlp_bias=False):
    base = tiny_llama()
    if mlp_bias:  # the same tiny Llama with biases on its MLP projections
        config = copy.deepcopy(base.config)
        config.mlp_bias = True
        torch.manual_seed(0)
        base = type(base)(config).eval()
    model = None
    for i, name in enumerate(names):
        config = deltatune.LoraConfig(
            r=4 + i, lora_alpha=8, target_modules=target_modules, lora_dropout=dropout, init_lora_weights=False
        )
        if model is None:
            model = deltatune.get_delta_model(base, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    model.set_adapter(list(names))
    return model.train()


def mlp_of(model, layer=0):
    return model.base_model.model.layers[layer].mlp


@contextlib.contextmanager
def mlp_fusion(enabled: bool):
    """Every LoRA layer with ``fuse_mlp = enabled`` inside the block (False: the layer-by-layer reference)."""
    LoraLinear.fuse_mlp = enabled
    try:
        yield
    finally:
        LoraLinear.fuse_mlp = True


def run_grads(model, inputs, fuse_mlp: bool):
    """(logits, {name: grad}) of one loss.backward with the MLP fused or layer by layer."""
    with mlp_fusion(fuse_mlp):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(11)
        out = model(**inputs, labels=inputs["input_ids"])
        out.loss.backward()
    return out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def assert_same_training(model, inputs=None):
    inputs = inputs or token_inputs()
    logits, grads = run_grads(model, inputs, fuse_mlp=True)
    ref_logits, ref_grads = run_grads(model, inputs, fuse_mlp=False)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def mlp_node(model) -> str | None:
    y = mlp_of(model)(torch.randn(2, 3, 32))
    return y.grad_fn.name() if y.grad_fn is not None else None


@pytest.mark.parametrize(
    "target_modules,names,mlp_bias",
    [
        (LLAMA_LINEAR, ("default", "other"), True),
        (["down_proj"], ("default",), False),
        (["gate_proj", "q_proj"], ("default",), True),
    ],
    ids=["all-two-adapters-bias", "down-only", "gate-only"],
)
def test_llama_mlp_trains_through_the_fused_function_as_it_does_layer_by_layer(target_modules, names, mlp_bias):
    model = llama_with_lora(target_modules, names=names, mlp_bias=mlp_bias)
    assert isinstance(mlp_of(model), FusedGatedMlp) and mlp_node(model) == MLP_NODE
    assert_same_training(model)


def test_mlp_fusion_with_dropout_replays_under_gradient_checkpointing():
    model = llama_with_lora(dropout=0.2)
    inputs = token_inputs()
    _, expected = run_grads(model, inputs, fuse_mlp=True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _, got = run_grads(model, inputs, fuse_mlp=True)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)


def test_gemma_mlp_with_tanh_gelu_fuses_and_matches():
    config = GemmaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    torch.manual_seed(0)
    default_targets = deltatune.get_delta_model(GemmaForCausalLM(config), deltatune.LoraConfig(r=4))
    lora = deltatune.get_delta_model(
        GemmaForCausalLM(config), deltatune.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    ).train()
    assert activation_name(mlp_of(lora).act_fn) == "gelu_tanh" and mlp_node(lora) == MLP_NODE
    assert not isinstance(
        mlp_of(default_targets), FusedGatedMlp
    )  # Gemma's default targets are q/v only: nothing to fuse
    assert_same_training(lora)


def test_states_the_function_cannot_reproduce_run_the_class_forward():
    model = llama_with_lora(names=("default", "other"))
    inputs = token_inputs()
    mlp = mlp_of(model)
    assert mlp_node(model) == MLP_NODE
    handle = mlp.up_proj.register_forward_hook(lambda module, args, out: out * 2)
    assert mlp_node(model) != MLP_NODE  # the hook must run, so the MLP goes module by module
    handle.remove()
    mlp.up_proj.base_layer.weight.requires_grad_(True)  # a trained base weight needs dW
    assert mlp_node(model) != MLP_NODE
    mlp.up_proj.base_layer.weight.requires_grad_(False)
    with model.disable_adapter():
        assert mlp_node(model) is None  # frozen base only
    model.merge_adapter(["default"])  # "other" still runs fused, "default" is in the weights
    assert mlp_node(model) == MLP_NODE
    model.merge_adapter(["other"])
    assert mlp_node(model) is None
    model.unmerge_adapter()
    mlp.gate_proj.adapter_dtype = torch.float32  # the projections disagree on the rank-r dtype
    assert mlp_node(model) != MLP_NODE
    mlp.gate_proj.adapter_dtype = None
    mlp.down_proj.fused = False
    assert mlp_node(model) != MLP_NODE
    mlp.down_proj.fused = True
    assert_same_training(model, inputs)


def test_the_fused_class_comes_and_goes_with_the_lora_layers():
    model = llama_with_lora(target_modules=["up_proj", "q_proj"])
    mlp = mlp_of(model)
    assert isinstance(mlp, FusedGatedMlp) and isinstance(mlp, LlamaMLP) and type(mlp).__name__ == "FusedLlamaMLP"
    model.add_adapter("attention", deltatune.LoraConfig(target_modules=["q_proj"]))
    model.delete_adapter("default")  # up_proj is a plain Linear again
    assert type(mlp) is LlamaMLP
    model.add_adapter("mlp", deltatune.LoraConfig(target_modules=["gate_proj"]))
    assert isinstance(mlp, FusedGatedMlp)
    base = model.merge_and_unload()
    assert not any(isinstance(module, FusedGatedMlp) for module in base.modules())
    assert type(mlp_of(llama_with_lora(target_modules=["q_proj", "v_proj"]))) is LlamaMLP


def test_another_wrapper_on_a_projection_runs_the_class_forward_and_fusion_returns_without_it():
    """modules_to_save on down_proj (of an adapter that is not even active) must not break the forward."""
    model = llama_with_lora(target_modules=["gate_proj", "up_proj"])
    model.add_adapter("saved", deltatune.LoraConfig(target_modules=["q_proj"], modules_to_save=["down_proj"]))
    inputs = token_inputs()
    assert type(mlp_of(model)) is LlamaMLP
    expected = model(**inputs).logits
    model.delete_adapter("saved")
    assert isinstance(mlp_of(model), FusedGatedMlp)
    torch.testing.assert_close(model(**inputs).logits, expected)
    mlp = mlp_of(model)
    mlp.down_proj = nn.Sequential(mlp.down_proj)  # wrapped behind the tuner's back
    assert mlp_node(model) != MLP_NODE
    torch.testing.assert_close(model(**inputs).logits, expected)


def test_copies_replicas_and_pickles_run_their_own_modules():
    model = llama_with_lora()
    x = torch.randn(2, 3, 32)
    mlp = mlp_of(model)
    expected = mlp(x)
    twin = copy.deepcopy(model)
    assert isinstance(mlp_of(twin), FusedGatedMlp) and mlp_node(twin) == MLP_NODE
    with torch.no_grad():
        mlp_of(twin).down_proj.lora_B["default"].weight.add_(1.0)
    assert not torch.allclose(mlp_of(twin)(x), expected)  # the copy computes with its own weights
    replica = mlp._replicate_for_data_parallel()  # what nn.DataParallel does on each GPU
    with torch.no_grad():
        replica.down_proj = copy.deepcopy(replica.down_proj)
        replica.down_proj.lora_B["default"].weight.mul_(0)
    torch.testing.assert_close(replica(x), replica._unfused_class.forward(replica, x))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    assert isinstance(mlp_of(loaded), FusedGatedMlp) and mlp_node(loaded) == MLP_NODE
    torch.testing.assert_close(mlp_of(loaded)(x), expected)


def test_a_deleted_model_frees_its_mlp_weights_without_the_cycle_collector():
    model = llama_with_lora()
    weight = weakref.ref(mlp_of(model).gate_proj.base_layer.weight)
    gc.disable()
    try:
        del model
        assert weight() is None
    finally:
        gc.enable()


def test_the_mlp_takes_its_input_by_keyword_too():
    model = llama_with_lora()
    mlp, x = mlp_of(model), torch.randn(2, 3, 32)
    assert mlp(x=x).grad_fn.name() == MLP_NODE
    torch.testing.assert_close(mlp(x=x), mlp(x))
    with pytest.raises(TypeError):
        mlp(hidden_states=x)  # as LlamaMLP itself would refuse it


class _RenamedArgumentMlp(nn.Module):
    def __init__(self, act_fn: nn.Module) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(8, 12), nn.Linear(8, 12), nn.Linear(12, 8)
        self.act_fn = act_fn

    def forward(self, hidden_state):
        """The gated MLP, under another argument name."""
        return self.down_proj(self.act_fn(self.gate_proj(hidden_state)) * self.up_proj(hidden_state))


class _ScaledMlp(_RenamedArgumentMlp):
    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x)) * 2


class _SwappedMlp(_RenamedArgumentMlp):
    def forward(self, x):
        return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))


def test_mlps_qualify_by_what_their_forward_computes():
    assert is_gated_mlp(_RenamedArgumentMlp(nn.SiLU()))
    assert is_gated_mlp(_RenamedArgumentMlp(activations.GELUTanh()))
    assert not is_gated_mlp(_RenamedArgumentMlp(activations.GELUTanh(use_gelu_tanh_python=True)))
    assert not is_gated_mlp(_RenamedArgumentMlp(nn.ReLU()))
    assert not is_gated_mlp(_ScaledMlp(nn.SiLU())) and not is_gated_mlp(_SwappedMlp(nn.SiLU()))
    assert activation_name(nn.GELU(approximate="tanh")) == "gelu_tanh" and activation_name(nn.GELU()) == "gelu"
    assert activation_name(activations.GELUActivation()) == "gelu"
    assert activation_name(activations.GELUActivation(use_gelu_python=True)) is None
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP
    from transformers.models.phi3.modeling_phi3 import Phi3MLP

    assert not any(is_gated_mlp(cls.__new__(cls)) for cls in (GPT2MLP, Phi3MLP))


def test_a_custom_gated_mlp_fuses_and_matches():
    torch.manual_seed(0)
    holder = nn.Sequential(_RenamedArgumentMlp(nn.SiLU()))
    model = deltatune.get_delta_model(
        holder, deltatune.LoraConfig(r=2, target_modules=["gate_proj", "down_proj"], init_lora_weights=False)
    )
    mlp = holder[0]
    x = torch.randn(3, 8)
    y = model(x)
    assert y.grad_fn.name() == MLP_NODE
    expected = mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)


def test_autocast_and_fp32_adapter_math_fuse_and_match_the_layer_path():
    """bf16 autocast over an fp32 model, and a bf16 model with ``adapter_dtype=torch.float32``."""
    model = llama_with_lora()
    x = torch.randn(2, 3, 32)
    mlp = mlp_of(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mlp(x)
        with mlp_fusion(False):
            layered = mlp(x)
    assert y.grad_fn.name() == MLP_NODE and y.dtype == layered.dtype == torch.bfloat16
    torch.testing.assert_close(y, layered, rtol=2e-2, atol=2e-2)
    model.base_model.to(torch.bfloat16)
    for layer in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        layer.adapter_dtype = torch.float32
    for _, param in model.named_parameters():
        if param.requires_grad:
            param.data = param.data.float()  # fp32 masters, as get_delta_model makes them for a bf16 base
    y = mlp(x.bfloat16())
    with mlp_fusion(False):
        layered = mlp(x.bfloat16())
    assert y.grad_fn.name() == MLP_NODE and y.dtype == torch.bfloat16
    torch.testing.assert_close(y, layered, rtol=2e-2, atol=2e-2)
    y.float().square().sum().backward()
    assert mlp.gate_proj.lora_A["default"].weight.grad.dtype == torch.float32


# -- the compiled elementwise kernels (the default on CUDA; forced here, where inductor emits C++) --
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_compiled_elementwise_kernels_equal_the_formula(dtype, activation):
    x, gate, up, down = make_mlp_case(dtype, (2, 5, HIDDEN), dropout=0.3)
    check_mlp(x, gate, up, down, activation=activation, compile_elementwise=True)
    assert not lora_mlp._compile_failed
    g, u, dh = (torch.randn(7, INTER, generator=torch.Generator().manual_seed(i)).to(dtype) for i in range(3))
    compiled_dg, compiled_du = lora_mlp._compiled(lora_mlp.gated_grads)(g, u, dh, activation)
    eager_dg, eager_du = lora_mlp.gated_grads(g, u, dh, activation)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(compiled_dg, eager_dg, rtol=tol, atol=tol)
    torch.testing.assert_close(compiled_du, eager_du, rtol=tol, atol=tol)


def test_a_model_trains_the_same_with_compiled_elementwise_kernels(monkeypatch):
    model = llama_with_lora(names=("default", "other"), mlp_bias=True)
    inputs = token_inputs()
    _, eager = run_grads(model, inputs, fuse_mlp=True)
    ran = []
    compiled_of = lora_mlp._compiled
    monkeypatch.setattr(lora_mlp, "_compiled", lambda fn: ran.append(fn.__name__) or compiled_of(fn))
    monkeypatch.setattr(LoraLinear, "compile_mlp", True)
    _, compiled = run_grads(model, inputs, fuse_mlp=True)
    assert ran.count("gated_product") == 2 * 2 and ran.count("gated_grads") == 2  # 2 layers: forward, recompute
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_failing_compile_warns_once_and_runs_eagerly_but_running_out_of_memory_propagates(monkeypatch):
    def failing(error):
        def compiled(fn):
            def call(*args):
                raise error

            return call

        return compiled

    x, gate, up, down = make_mlp_case(torch.float32, (2, 3, HIDDEN))
    monkeypatch.setattr(lora_mlp, "_compile_failed", False)
    monkeypatch.setattr(lora_mlp, "_compiled", failing(torch.OutOfMemoryError("out of memory")))
    with pytest.raises(torch.OutOfMemoryError):
        fused_lora_mlp(x, gate, up, down, "silu", compile_elementwise=True)
    assert not lora_mlp._compile_failed
    monkeypatch.setattr(lora_mlp, "_compiled", failing(torch._dynamo.exc.TorchDynamoException("no compiler here")))
    with pytest.warns(RuntimeWarning, match="no compiler here"):
        y = fused_lora_mlp(x, gate, up, down, "silu", compile_elementwise=True)
    assert lora_mlp._compile_failed
    torch.testing.assert_close(y, fused_lora_mlp(x, gate, up, down, "silu", compile_elementwise=False))


def test_one_compiled_graph_serves_every_batch_shape():
    """2-D views in forward and backward, and inference left eager: no recompilation as shapes change."""
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a recompilation would surface as the fallback's warning
        for shape in [(2, 5, HIDDEN), (3, 7, HIDDEN), (1, 9, HIDDEN), (13, HIDDEN)]:
            x, gate, up, down = make_mlp_case(torch.float32, shape, dropout=0.2)
            fused_lora_mlp(x, gate, up, down, "silu", compile_elementwise=True).square().sum().backward()
            with torch.inference_mode():
                fused_lora_mlp(x, gate, up, down, "silu", compile_elementwise=True)
    assert not lora_mlp._compile_failed
