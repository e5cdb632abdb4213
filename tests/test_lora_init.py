"""Every ``init_lora_weights`` value against peft 0.21 (the installed package is the oracle).

Same seed -> bit-identical A, B and base weights as peft; PiSSA/OLoRA keep the model's output at
step 0; their residual-base files load both ways; a trained PiSSA/OLoRA adapter converts to a plain
rank-2r LoRA for the original base exactly as peft's ``path_initial_model_for_weight_conversion``;
the methods deltatune does not build are refused by name.
"""

from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import deltatune
from deltatune import DeltaModel
from deltatune.errors import ConfigError
from deltatune.tuners.lora.config import LORA_INIT_REFUSALS
from deltatune.tuners.lora.init import olora, orthogonal, pissa
from tiny_models import (
    LLAMA_LINEAR,
    build,
    inputs_for,
    output_tensor,
    perturb_trainable,
    token_inputs,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning"),
    pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`:UserWarning"),
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    # peft's notice when it loads the initial adapter next to the trained one to convert it
    pytest.mark.filterwarnings("ignore:(PiSSA|OLoRA) changes the base weights:UserWarning"),
]

ATOL = 1e-5
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]
# (model kind, targets, dtype)
MODELS = {
    "llama": ("llama", LLAMA_LINEAR, torch.float32),
    "gpt2": ("gpt2", GPT2_TARGETS, torch.float32),
    "llama_bf16": ("llama", ["q_proj", "v_proj", "down_proj"], torch.bfloat16),
}
INITS = [True, False, "gaussian", "pissa", "pissa_niter_2", "olora", "orthogonal"]
BASE_CHANGING = ["pissa", "pissa_niter_2", "olora"]


def build_pair(lib, kind: str, targets: list[str], dtype: torch.dtype = torch.float32, seed: int = 3, **lora):
    """``lib``'s model (peft or deltatune) on the tiny ``kind`` in ``dtype``, adapter drawn under ``seed``."""
    config = lib.LoraConfig(target_modules=targets, r=4, lora_alpha=12, **lora)  # s = 3: not a power of two
    base = build(kind).to(dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return peft.get_peft_model(base, config) if lib is peft else deltatune.get_delta_model(base, config)


def inner(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft or deltatune wrapper."""
    return model.get_base_model() if isinstance(model, peft.PeftModel) else model.base_model


def logits(model: nn.Module, kind: str = "llama") -> torch.Tensor:
    with torch.no_grad():
        return output_tensor(model(**inputs_for(kind))).float()


# -- same seed, same numbers as peft ---------------------------------------------------------------
# peft's OLoRA factors GPT-2 Conv1D's [in, out] weight untransposed, so its factors do not fit the layer
# and its forward fails: there is nothing to match; test_olora_on_conv1d_uses_the_out_in_weight checks ours.
PEFT_CASES = [(init, model_id) for init in INITS for model_id in MODELS if (init, model_id) != ("olora", "gpt2")]


@pytest.mark.parametrize("init,model_id", PEFT_CASES, ids=str)
def test_same_factors_and_base_as_peft(init, model_id):
    kind, targets, dtype = MODELS[model_id]
    theirs = inner(build_pair(peft, kind, targets, dtype, init_lora_weights=init)).state_dict()
    ours = inner(build_pair(deltatune, kind, targets, dtype, init_lora_weights=init)).state_dict()
    assert sorted(ours) == sorted(theirs)
    assert any(".lora_A." in key for key in ours)
    for key, tensor in ours.items():
        assert tensor.dtype == theirs[key].dtype, key
        assert torch.equal(tensor, theirs[key]), key


@pytest.mark.parametrize("init", ["pissa", "olora", "orthogonal"])
def test_embeddings_keep_their_default_init_as_in_peft(init):
    """peft applies these methods to Linear layers only; an embedding target gets the usual A = 0, B normal."""
    for lib in (peft, deltatune):
        model = build_pair(lib, "llama", ["embed_tokens"], init_lora_weights=init)
        embedding = inner(model).model.embed_tokens
        assert torch.equal(embedding.lora_embedding_A["default"], torch.zeros(4, 128))
        assert embedding.lora_embedding_B["default"].abs().sum() > 0
        assert torch.equal(embedding.base_layer.weight, build("llama").model.embed_tokens.weight)


@pytest.mark.parametrize("init", BASE_CHANGING)
def test_pissa_and_olora_replace_the_base_weight(init):
    original = inner(build_pair(deltatune, "llama", LLAMA_LINEAR, init_lora_weights=True)).state_dict()
    changed = inner(build_pair(deltatune, "llama", LLAMA_LINEAR, init_lora_weights=init)).state_dict()
    key = "model.layers.0.self_attn.q_proj.base_layer.weight"
    assert not torch.allclose(changed[key], original[key], atol=1e-3)


# -- the model at step 0 ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora", "orthogonal", "gaussian"])
def test_output_at_init_equals_the_base_model(init, kind):
    targets = LLAMA_LINEAR if kind == "llama" else GPT2_TARGETS
    model = build_pair(deltatune, kind, targets, init_lora_weights=init)
    with model.disable_adapter():
        disabled = logits(model, kind)
    assert torch.allclose(logits(model, kind), logits(build(kind), kind), atol=ATOL)
    if init in BASE_CHANGING:  # the principal part now lives in the adapter, not in the base
        assert not torch.allclose(disabled, logits(build(kind), kind), atol=1e-2)


def test_gradients_flow_to_both_factors_from_step_0():
    model = build_pair(deltatune, "llama", ["q_proj"], init_lora_weights="pissa")
    output_tensor(model(**token_inputs())).sum().backward()
    layer = model.base_model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.grad.abs().sum() > 0
    assert layer.lora_B["default"].weight.grad.abs().sum() > 0


# -- the math of the pure functions -------------------------------------------------------------------
def weight(out_features: int = 24, in_features: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))


def test_pissa_is_the_best_rank_r_approximation():
    w, rank, scaling = weight(), 4, 2.5
    start = pissa(w, rank, scaling)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    best = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
    assert start.a.shape == (rank, 16) and start.b.shape == (24, rank)
    assert torch.allclose(scaling * start.b @ start.a, best, atol=1e-5)
    assert torch.allclose(start.base + scaling * start.b @ start.a, w, atol=1e-5)
    assert torch.allclose(torch.linalg.svdvals(start.base)[: 16 - rank], s[rank:], atol=1e-5)


def test_pissa_niter_spans_the_top_r_subspace():
    """With a clear gap after the r-th singular value, the randomised SVD finds the exact top-r subspace."""
    rank, scaling = 4, 0.5
    u, _, vh = torch.linalg.svd(weight(), full_matrices=False)
    spectrum = torch.tensor([10.0, 8.0, 6.0, 5.0] + [0.5 / (i + 1) for i in range(12)])
    w = u @ torch.diag(spectrum) @ vh
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        start = pissa(w, rank, scaling, niter=4)
    u = torch.linalg.svd(w, full_matrices=False).U[:, :rank]
    b_basis = torch.linalg.qr(start.b).Q
    assert torch.allclose(b_basis @ b_basis.T, u @ u.T, atol=1e-4)  # same column space as the exact top-r
    assert torch.allclose(start.base + scaling * start.b @ start.a, w, atol=1e-5)


def test_olora_factors_are_the_leading_qr_columns():
    w, rank, scaling = weight(), 4, 2.0
    start = olora(w, rank, scaling)
    assert torch.allclose(start.b.T @ start.b, torch.eye(rank), atol=1e-5)  # orthonormal columns
    assert torch.equal(start.a.tril(-1), torch.zeros_like(start.a))  # rows of the upper-triangular R
    assert torch.allclose(start.base + scaling * start.b @ start.a, w, atol=1e-5)


def test_orthogonal_factors_are_nonzero_with_a_zero_product():
    start = orthogonal(16, 24, 6, torch.float32)
    assert start.base is None and start.a.shape == (6, 16) and start.b.shape == (24, 6)
    assert start.a.abs().min() > 0 and start.b.abs().min() > 0
    assert torch.allclose(start.b @ start.a, torch.zeros(24, 16), atol=1e-6)


def test_olora_on_conv1d_uses_the_out_in_weight():
    original = build("gpt2").transformer.h[0].attn.c_attn.weight.detach().clone()  # Conv1D: [in, out]
    model = build_pair(deltatune, "gpt2", ["c_attn"], init_lora_weights="olora")
    layer = model.base_model.transformer.h[0].attn.c_attn
    a, b, scaling = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    q, r = torch.linalg.qr(original.T)
    assert torch.equal(a, r[:4]) and torch.equal(b, q[:, :4])
    assert torch.allclose(layer.base_layer.weight + (scaling * b @ a).T, original, atol=1e-6)


# -- files, both ways --------------------------------------------------------------------------------
CASES = [("llama", LLAMA_LINEAR, "pissa"), ("llama", LLAMA_LINEAR, "olora"), ("gpt2", GPT2_TARGETS, "pissa_niter_2")]


@pytest.mark.parametrize("kind,targets,init", CASES)
@pytest.mark.parametrize("direction", ["peft_to_deltatune", "deltatune_to_peft"])
def test_residual_base_adapter_loads_both_ways(tmp_path, direction, kind, targets, init):
    """The documented workflow: train, set init_lora_weights=True, save; load onto the residual base."""
    source_lib = peft if direction == "peft_to_deltatune" else deltatune
    source = build_pair(source_lib, kind, targets, init_lora_weights=init)
    perturb_trainable(source)
    expected = logits(source, kind)
    source.peft_config["default"].init_lora_weights = True
    source.save_pretrained(tmp_path)
    residual = source.unload()  # the base model holding W0 - s·B0A0
    if direction == "peft_to_deltatune":
        loaded = DeltaModel.from_pretrained(residual, tmp_path)
    else:
        loaded = peft.PeftModel.from_pretrained(residual, tmp_path)
    assert torch.allclose(logits(loaded, kind), expected, atol=ATOL)


def test_a_file_naming_the_method_reruns_it_on_load_as_in_peft(tmp_path):
    """A saved config that still says "pissa" re-decomposes the base it is loaded onto, in both libraries."""
    source = build_pair(deltatune, "llama", ["q_proj", "v_proj"], init_lora_weights="pissa")
    perturb_trainable(source)
    source.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
    ours = DeltaModel.from_pretrained(build("llama"), tmp_path)
    theirs = peft.PeftModel.from_pretrained(build("llama"), tmp_path)
    assert torch.allclose(logits(ours), logits(theirs), atol=ATOL)
    assert torch.allclose(logits(ours), logits(source), atol=ATOL)  # loaded on the ORIGINAL base, so it fits


# -- converting to a plain LoRA for the original base ---------------------------------------------------
def converted_pair(tmp_path, init: str, **lora):
    """(deltatune's converted folder, peft's converted folder, the trained logits) for the same training."""
    outputs = {}
    for lib in (peft, deltatune):
        root = tmp_path / lib.__name__
        model = build_pair(lib, "llama", LLAMA_LINEAR, init_lora_weights=init, **lora)
        model.save_pretrained(root / "initial")
        perturb_trainable(model)
        outputs[lib.__name__] = logits(model)
        if lib is peft:
            model.save_pretrained(root / "lora", path_initial_model_for_weight_conversion=str(root / "initial"))
        else:
            model.save_pretrained(root / "lora", convert_to_lora_from=root / "initial")
    assert torch.allclose(outputs["peft"], outputs["deltatune"], atol=ATOL)  # the same trained model
    return tmp_path / "deltatune" / "lora", tmp_path / "peft" / "lora", outputs["deltatune"]


@pytest.mark.parametrize(
    "init,lora",
    [
        ("pissa", {}),
        ("olora", {"use_rslora": True}),
        ("pissa", {"rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 4}}),
    ],
    ids=["pissa", "olora_rslora", "pissa_patterns"],
)
def test_conversion_to_plain_lora_matches_peft(tmp_path, init, lora):
    ours, theirs, trained = converted_pair(tmp_path, init, **lora)
    our_tensors, their_tensors = (
        load_file(ours / "adapter_model.safetensors"),
        load_file(theirs / "adapter_model.safetensors"),
    )
    assert sorted(our_tensors) == sorted(their_tensors)
    for key, tensor in our_tensors.items():
        assert torch.equal(tensor, their_tensors[key]), key
    our_config = json.loads((ours / "adapter_config.json").read_text())
    their_config = json.loads((theirs / "adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "init_lora_weights", "use_rslora"):
        assert our_config[key] == their_config[key], key
    assert our_config["r"] == 8 and our_config["init_lora_weights"] is True
    # on the ORIGINAL base, both libraries reproduce the trained (residual-base) model
    assert torch.allclose(logits(DeltaModel.from_pretrained(build("llama"), ours)), trained, atol=ATOL)
    assert torch.allclose(logits(peft.PeftModel.from_pretrained(build("llama"), ours)), trained, atol=ATOL)


def test_conversion_refusals(tmp_path):
    plain = build_pair(deltatune, "llama", ["q_proj"], init_lora_weights=True)
    plain.save_pretrained(tmp_path / "initial")
    with pytest.raises(ConfigError, match="init_lora_weights=True"):
        plain.save_pretrained(tmp_path / "out", convert_to_lora_from=tmp_path / "initial")
    residual = build_pair(deltatune, "llama", ["q_proj", "v_proj"], init_lora_weights="pissa")
    with pytest.raises(ConfigError, match="initial adapter has no tensor"):
        residual.save_pretrained(tmp_path / "out", convert_to_lora_from=tmp_path / "initial")
    patterned = build_pair(
        deltatune, "llama", ["q_proj"], init_lora_weights="pissa", use_rslora=True, rank_pattern={"q_proj": 2}
    )
    patterned.save_pretrained(tmp_path / "initial2")
    with pytest.raises(ConfigError, match="use_rslora"):
        patterned.save_pretrained(tmp_path / "out", convert_to_lora_from=tmp_path / "initial2")
    assert not (tmp_path / "out").exists()


# -- refusals --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", sorted(LORA_INIT_REFUSALS))
def test_unsupported_methods_are_refused_by_name(value):
    with pytest.raises(ConfigError, match=f"init_lora_weights='{value}'.*not supported"):
        deltatune.LoraConfig(init_lora_weights=value)


@pytest.mark.parametrize(
    "field,value",
    [
        ("loftq_config", {"loftq_bits": 4}),
        ("eva_config", {"rho": 2.0}),
        ("corda_config", {"corda_method": "kpm"}),
        ("lora_ga_config", {"direction": "ArB2r"}),
    ],
)
def test_options_of_unsupported_methods_are_refused(field, value):
    with pytest.raises(ConfigError, match=f"{field}=.*init_lora_weights='{field.removesuffix('_config')}'"):
        deltatune.LoraConfig(**{field: value})


def test_peft_written_config_with_neutral_init_options_loads(tmp_path):
    peft_side = build_pair(peft, "llama", ["q_proj"], init_lora_weights="olora")
    peft_side.save_pretrained(tmp_path)
    config = deltatune.LoraConfig.from_pretrained(tmp_path)
    assert config.init_lora_weights == "olora" and config.loftq_config == {}


@pytest.mark.parametrize("init", ["pissa", "olora", "orthogonal"])
def test_non_linear_layers_are_refused(init):
    with pytest.raises(ConfigError, match=f"init_lora_weights='{init}' works on Linear/Conv1D layers only.*Conv2d"):
        deltatune.get_delta_model(
            build("conv"), deltatune.LoraConfig(target_modules=["conv1"], r=4, init_lora_weights=init)
        )


def test_odd_rank_orthogonal_is_refused():
    with pytest.raises(ConfigError, match="'orthogonal' needs an even rank, got r=3"):
        deltatune.get_delta_model(
            build("llama"), deltatune.LoraConfig(target_modules=["q_proj"], r=3, init_lora_weights="orthogonal")
        )


@pytest.mark.filterwarnings("ignore:r=20 is larger than:UserWarning")
def test_rank_above_the_layer_size_is_refused():
    with pytest.raises(ConfigError, match=r"'pissa' needs r <= min\(in, out\) = 16"):
        deltatune.get_delta_model(
            build("llama"), deltatune.LoraConfig(target_modules=["k_proj"], r=20, init_lora_weights="pissa")
        )


@pytest.mark.parametrize("init", ["pissa_niter_3", "olora"])
def test_non_half_float_bases_are_refused_as_in_peft(init):
    with pytest.raises(ConfigError, match=f"init_lora_weights='{init}' needs a float32/float16/bfloat16 base weight"):
        deltatune.get_delta_model(
            build("llama").double(), deltatune.LoraConfig(target_modules=["q_proj"], init_lora_weights=init)
        )
