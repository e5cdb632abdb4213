"""QLoRA: LoRA and DoRA over bitsandbytes 4-bit (nf4/fp4, double quantisation) and 8-bit base weights, on CPU.

``dense`` must reproduce bitsandbytes' own training matmul bit for bit; adapters over a quantised tiny
llama (transformers' ``BitsAndBytesConfig``, ``device_map="cpu"``) must give peft's logits and gradients
in both file directions, in training mode (the fused path) and in eval mode (bitsandbytes' forward).
"""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
import torch.nn.functional as F

from deltatune import DeltaModel, LoraConfig, get_delta_model
from deltatune.kernels.base_weight import dense, logical_shape
from deltatune.tuners.lora.quantized import LoraQuantLinear
from quantised_models import MODES, quantised
from tensor_checks import assert_close_rel, saved_bytes
from tiny_models import perturb_trainable, token_inputs

bnb = pytest.importorskip("bitsandbytes")  # the test extra installs it; `pip install deltatune[qlora]`

pytestmark = [
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:.*re-quantises its weight:UserWarning"),
]

ATOL = 1e-5
DIRECTIONS = ["peft_to_deltatune", "deltatune_to_peft"]


# -- the seam ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["nf4", "fp4", "nf4-double", "int8"])
def test_dense_reproduces_the_quantised_layers_training_matmul(mode, dtype):
    torch.manual_seed(0)
    plain = torch.nn.Linear(128, 96)
    if mode == "int8":
        layer = bnb.nn.Linear8bitLt(128, 96, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(
            128, 96, compute_dtype=dtype, quant_type=mode[:3], compress_statistics="double" in mode
        )
    layer.load_state_dict(plain.state_dict())
    layer = layer.to("cpu").to(dtype).train()
    x = torch.randn(3, 5, 128, dtype=dtype, requires_grad=True)
    y = layer(x)
    if mode == "int8":  # bitsandbytes moves the scales to the layer's state on the first forward
        layer.weight.SCB = layer.state.SCB
    w = dense(layer.weight, dtype)
    assert w.shape == logical_shape(layer.weight) == (96, 128) and w.dtype == dtype
    torch.testing.assert_close(y, F.linear(x, w, layer.bias.to(dtype)), atol=0, rtol=0)
    assert (w.float() - plain.weight).abs().max() < 0.2 * plain.weight.abs().max()  # really the weight, rounded


# -- adapters against peft ----------------------------------------------------------------------------------
def adapted(folder, mode: str, direction: str, root, use_dora: bool = False):
    """(peft model, deltatune model) over two loads of the same quantised model, holding the same adapter."""
    config = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, use_dora=use_dora)
    if direction == "peft_to_deltatune":
        peft_side = peft.get_peft_model(quantised(folder, mode), peft.LoraConfig(**config))
        perturb_trainable(peft_side)
        peft_side.save_pretrained(root)
        delta_side = DeltaModel.from_pretrained(quantised(folder, mode), root, is_trainable=True)
    else:
        delta_side = get_delta_model(quantised(folder, mode), LoraConfig(**config))
        perturb_trainable(delta_side)
        delta_side.save_pretrained(root)
        peft_side = peft.PeftModel.from_pretrained(quantised(folder, mode), root, is_trainable=True)
    return peft_side, delta_side


def trainable(model) -> dict[str, torch.nn.Parameter]:
    """Trainable parameters by a name both libraries share (from ``layers.``, adapter infix removed)."""
    return {
        "layers." + name.split(".layers.", 1)[1].replace(".default", "").replace("vector.weight", "vector"): p
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def assert_same_training_step(peft_side, delta_side, eval_against_peft: bool = True) -> torch.Tensor:
    """Same logits and gradients in training mode, same logits in eval mode; returns the eval logits.

    Without ``eval_against_peft`` the eval logits are compared with the training-mode ones instead, within
    what bitsandbytes' bf16 CPU inference kernel changes."""
    inputs = token_inputs()
    peft_side.train(), delta_side.train()
    p_out, d_out = peft_side(**inputs).logits, delta_side(**inputs).logits
    assert delta_side.base_model.model.layers[0].self_attn.q_proj.fusable(d_out, ["default"])
    torch.testing.assert_close(d_out, p_out, atol=ATOL, rtol=0)
    p_out.square().mean().backward()
    d_out.square().mean().backward()
    p_params, d_params = trainable(peft_side), trainable(delta_side)
    assert sorted(p_params) == sorted(d_params) and p_params
    for name, param in p_params.items():
        torch.testing.assert_close(d_params[name].grad, param.grad, atol=ATOL, rtol=1e-5, msg=f"gradient of {name}")
    peft_side.eval(), delta_side.eval()
    with torch.no_grad():  # eval: bitsandbytes' own inference forward on both sides (after training: it repacks
        logits = delta_side(**inputs).logits  # 4-bit weights for its CPU kernel, rounding their scales to bf16)
        if eval_against_peft:
            torch.testing.assert_close(logits, peft_side(**inputs).logits, atol=ATOL, rtol=0)
        else:
            torch.testing.assert_close(logits, d_out, atol=1e-2, rtol=0)
    return logits


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("mode", list(MODES))
def test_lora_over_a_quantised_llama_matches_peft(llama_dir, mode, direction, tmp_path):
    peft_side, delta_side = adapted(llama_dir, mode, direction, tmp_path)
    layer = delta_side.base_model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoraQuantLinear) and (layer.in_features, layer.out_features) == (64, 64)
    assert layer.lora_A["default"].weight.dtype == torch.float32
    logits = assert_same_training_step(peft_side, delta_side)
    with torch.no_grad():
        assert (logits - quantised(llama_dir, mode)(**token_inputs()).logits).abs().max() > 1e-3, "a void adapter"


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_dora_over_a_quantised_llama_matches_peft(llama_dir, mode, direction, tmp_path):
    """Eval mode is checked against the training-mode logits, not peft's: peft 0.21.2 takes DoRA's weight norm
    from a 4-bit weight that bitsandbytes has repacked for its CPU kernel without unpacking it (its eval logits
    move ~0.03 off its training-mode ones; deltatune unpacks first), and its DoRA over int8 fails in eval on CPU
    (bitsandbytes' int8 matmul gets no column statistics)."""
    peft_side, delta_side = adapted(llama_dir, mode, direction, tmp_path, use_dora=True)
    assert_same_training_step(peft_side, delta_side, eval_against_peft=False)


def test_bf16_compute_under_fp32_activations_runs_as_peft(llama_dir, tmp_path):
    """A base computing in another dtype than the activations takes bitsandbytes' forward, as peft does."""
    config = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    delta_side = get_delta_model(quantised(llama_dir, "nf4", compute=torch.bfloat16), LoraConfig(**config))
    perturb_trainable(delta_side)
    delta_side.save_pretrained(tmp_path)
    peft_side = peft.PeftModel.from_pretrained(quantised(llama_dir, "nf4", compute=torch.bfloat16), tmp_path)
    inputs = token_inputs()
    delta_side.train(), peft_side.train()
    assert not delta_side.base_model.model.layers[0].self_attn.q_proj.fusable(torch.zeros(1, 64), ["default"])
    torch.testing.assert_close(delta_side(**inputs).logits, peft_side(**inputs).logits, atol=ATOL, rtol=0)


def test_the_fused_step_saves_no_dense_weight(llama_dir):
    model = get_delta_model(quantised(llama_dir, "nf4"), LoraConfig(r=4, target_modules="all-linear"))
    model.train()
    packed = [m.weight for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    saved = saved_bytes(lambda: model(**token_inputs()).logits.sum().backward(), packed)
    # 14 adapted projections of >= 64 x 64 weights: a dequantised fp32 copy saved by each would be >= 229 KiB,
    # more than every activation of 2 x 7 tokens (and the rank-r products) that a step saves
    assert saved.get("torch.float32", 0) < 14 * 64 * 64 * 4, saved
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().max() > 0 for g in grads)


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_quantised_gated_mlps_run_as_one_fused_function_while_training(llama_dir, mode):
    """The MLP function reads quantised weights through ``dense`` too: same numbers as layer by layer."""
    model = get_delta_model(
        quantised(llama_dir, mode), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    )
    model.train()
    mlp, inputs = model.base_model.model.layers[0].mlp, torch.randn(2, 3, 64)
    fused = mlp(inputs)
    assert fused.grad_fn.name() == "_LoraMlpFunctionBackward"
    for layer in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        layer.fuse_mlp = False
    layered = mlp(inputs)
    assert layered.grad_fn.name() != "_LoraMlpFunctionBackward"
    torch.testing.assert_close(fused, layered, atol=1e-5, rtol=0)


def test_rank_is_checked_against_the_logical_shape(llama_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # r=8 <= 32: no "larger than the smallest dimension" warning
        model = get_delta_model(quantised(llama_dir, "nf4"), LoraConfig(r=8, target_modules="all-linear"))
    down = model.base_model.model.layers[0].mlp.down_proj
    assert (down.in_features, down.out_features) == (128, 64)
    assert down.lora_A["default"].weight.shape == (8, 128)


# -- merging ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_merge_and_unload_requantises_like_peft_with_a_warning(llama_dir, mode, tmp_path):
    peft_side, delta_side = adapted(llama_dir, mode, "deltatune_to_peft", tmp_path)
    layer = delta_side.base_model.model.layers[0].self_attn.q_proj
    target = dense(layer.base_weight) + layer.delta_weight("default")  # W0 + s·BA, before rounding
    with pytest.warns(UserWarning, match="re-quantises"):
        merged = delta_side.merge_and_unload()
    p_merged = peft_side.merge_and_unload()
    weight, p_weight = merged.model.layers[0].self_attn.q_proj.weight, p_merged.model.layers[0].self_attn.q_proj.weight
    assert type(weight) is type(p_weight) and type(weight).__name__ in ("Params4bit", "Int8Params")
    torch.testing.assert_close(dense(weight), dense(p_weight), atol=0, rtol=0)
    delta = target - dense(quantised(llama_dir, mode).model.layers[0].self_attn.q_proj.weight)
    assert (dense(weight) - target).norm() < 0.5 * delta.norm()  # rounded, and the update is in it
    inputs = token_inputs()
    merged.train(), p_merged.train()  # bitsandbytes' dense training matmul on both
    torch.testing.assert_close(merged(**inputs).logits, p_merged(**inputs).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_inits_that_rewrite_the_base_are_refused_over_a_quantised_base(llama_dir, init):
    from deltatune import ConfigError

    with pytest.raises(ConfigError, match="quantised"):
        get_delta_model(
            quantised(llama_dir, "nf4"), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=init)
        )


# -- the embedded SmolLM2 ----------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_lora_over_nf4_smollm2_matches_peft(direction, tmp_path):
    from deltatune.runtime.assets import smollm2_path

    peft_side, delta_side = adapted(smollm2_path(), "nf4", direction, tmp_path)
    inputs = {"input_ids": torch.randint(0, 49152, (1, 12), generator=torch.Generator().manual_seed(3))}
    peft_side.train(), delta_side.train()  # the fused path; logits come out bit-identical
    p_out, d_out = peft_side(**inputs).logits, delta_side(**inputs).logits
    torch.testing.assert_close(d_out, p_out, atol=ATOL, rtol=0)
    p_out.float().logsumexp(-1).mean().backward()
    d_out.float().logsumexp(-1).mean().backward()
    p_params, d_params = trainable(peft_side), trainable(delta_side)
    assert sorted(p_params) == sorted(d_params) and len(p_params) == 30 * 7 * 2
    for name, param in p_params.items():  # 30 layers of fp32 backward, summed in another order: relative to the max
        assert_close_rel(d_params[name].grad, param.grad.double(), 1e-4, f"gradient of {name}")
