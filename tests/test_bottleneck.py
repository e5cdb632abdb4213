"""Bottleneck adapters: config, placement per architecture, identity at init, training, files, switching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.activations import ACT2FN
from transformers.pytorch_utils import Conv1D

from deltatune import (
    AdapterLoadError,
    ConfigError,
    DeltaConfig,
    DeltaModel,
    MergeError,
    TargetError,
    get_delta_model,
)
from deltatune.data import collate_causal, encode_records, split_records
from deltatune.data.chatterbot import chatterbot_conversations
from deltatune.train.evaluate import heldout_loss
from deltatune.tuners.bottleneck.config import NON_LINEARITIES, BottleneckConfig
from deltatune.tuners.bottleneck.tuner import (
    PLACEMENTS,
    BottleneckLayer,
    Sites,
    find_sites,
    model_sites,
    site_layer,
    site_suffixes,
)
from test_model_semantics import single_thread  # noqa: F401  (autouse fixture)
from test_training import BATCH, logits, tiny, train
from tiny_models import (
    VOCAB,
    perturb_trainable,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    token_inputs,
)

D_MODEL = 32
N_LAYERS = 2
# The four tensors saved per site, in docs/formats.md's order (spelled out, not taken from deltatune).
TENSOR_PARTS = ("adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias")


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    """Qwen2 (q/k/v biases): vocab 128, hidden 32, 2 layers, 4 heads, 2 kv heads, intermediate 64."""
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=D_MODEL,
        intermediate_size=64,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen2ForCausalLM(config).eval()


FAMILIES = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gpt2": tiny_gpt2, "bert": tiny_bert}
# The module that ends each sub-block of layer 0, spelled out per family (not taken from PLACEMENTS).
LAYER0_SITES = {
    "llama": ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"],
    "qwen2": ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"],
    "gpt2": ["transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj"],
    "bert": ["bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.0.output.dense"],
}


def model_logits(model: nn.Module, inputs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(**(inputs or token_inputs())).logits


def bottleneck_layers(model: nn.Module) -> dict[str, BottleneckLayer]:
    return {name: module for name, module in model.named_modules() if isinstance(module, BottleneckLayer)}


# -- config ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"reduction_factor": 0}, "reduction_factor"),
        ({"reduction_factor": float("inf")}, "reduction_factor"),
        ({"bottleneck_size": 0}, "bottleneck_size"),
        ({"bottleneck_size": 2.5}, "bottleneck_size"),
        ({"placement": "parallel"}, "placement"),
        ({"non_linearity": "prelu"}, "non_linearity"),
        ({"dropout": 1.0}, "dropout"),
        ({"scaling": -1.0}, "scaling"),
        ({"init_weights": "bert"}, "init_weights"),
        ({"layers_to_transform": [-1]}, "layers_to_transform"),
        ({"modules_to_save": "lm_head"}, "modules_to_save"),
    ],
)
def test_invalid_values_raise_one_line_config_errors(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field) as info:
        BottleneckConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_names_are_normalised_and_the_json_round_trip_is_exact(tmp_path: Path) -> None:
    config = BottleneckConfig(
        bottleneck_size=12,
        placement="Pfeiffer",
        non_linearity="GELU",
        dropout=0.1,
        scaling=2.0,
        init_weights="Normal",
        layers_to_transform=[0, 1],
        modules_to_save=["lm_head"],
        task_type="causal_lm",
    )
    assert (config.placement, config.non_linearity, config.init_weights) == ("pfeiffer", "gelu", "normal")
    config.save(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "BOTTLENECK" and data["task_type"] == "CAUSAL_LM"
    again = DeltaConfig.from_pretrained(tmp_path)
    assert type(again) is BottleneckConfig and again == config
    with pytest.raises(ConfigError, match="r=8"):
        DeltaConfig.from_dict({**data, "r": 8})  # a LoRA key in a bottleneck file is refused, not dropped


def test_every_non_linearity_is_a_parameter_free_transformers_activation() -> None:
    for name in NON_LINEARITIES:
        assert not list(ACT2FN[name].parameters()), name


@pytest.mark.parametrize(
    ("kwargs", "features", "width"),
    [
        ({}, 576, 36),
        ({"reduction_factor": 4}, 32, 8),
        ({"reduction_factor": 5}, 32, 6),
        ({"reduction_factor": 2.5}, 32, 12),
        ({"bottleneck_size": 3}, 576, 3),
    ],
)
def test_bottleneck_width_is_d_over_the_reduction_factor_or_the_explicit_size(kwargs, features, width) -> None:
    assert BottleneckConfig(**kwargs).bottleneck_width(features) == width


def test_a_reduction_factor_larger_than_d_is_refused_before_the_model_changes() -> None:
    model = tiny_llama()
    with pytest.raises(ConfigError, match="reduction_factor=64 leaves no bottleneck units for width 32"):
        get_delta_model(model, BottleneckConfig(reduction_factor=64))
    assert not bottleneck_layers(model)


# -- placement ------------------------------------------------------------------------------------


def test_site_layer_reads_the_index_and_tells_bert_sub_blocks_apart() -> None:
    assert site_layer("bert.encoder.layer.3.output.dense", "output.dense") == 3
    assert site_layer("bert.encoder.layer.3.attention.output.dense", "output.dense") is None
    assert site_layer("bert.encoder.layer.3.attention.output.dense", "attention.output.dense") == 3
    assert site_layer("model.decoder.layers.11.fc2", "fc2") == 11
    assert site_layer("model.layers.1.mlp.down_proj.extra", "mlp.down_proj") is None
    assert site_layer("mlp.down_proj", "mlp.down_proj") is None  # not inside a layer list


def test_site_suffixes_follow_the_placement() -> None:
    sites = Sites("attn.out", "mlp.out")
    assert site_suffixes(sites, "houlsby") == ("attn.out", "mlp.out")
    assert site_suffixes(sites, "pfeiffer") == ("mlp.out",)


@pytest.mark.parametrize("model_type", sorted(PLACEMENTS))
def test_every_placement_entry_names_two_projections_in_every_layer(model_type: str) -> None:
    """The table holds for this transformers version: default configs, built on the meta device (no memory)."""
    config = AutoConfig.for_model(model_type)
    layers = list(range(config.num_hidden_layers))
    with torch.device("meta"):
        model = (AutoModel if model_type == "distilbert" else AutoModelForCausalLM).from_config(config)
    houlsby = find_sites(model, BottleneckConfig())
    pfeiffer = find_sites(model, BottleneckConfig(placement="pfeiffer"))
    sites = PLACEMENTS[model_type]
    assert [site_layer(name, sites.attention) for name in houlsby[::2]] == layers
    assert [site_layer(name, sites.mlp) for name in houlsby[1::2]] == layers
    assert pfeiffer == houlsby[1::2]
    assert all(isinstance(model.get_submodule(name), (nn.Linear, Conv1D)) for name in houlsby)


@pytest.mark.parametrize(("kind", "placement"), [(k, p) for k in FAMILIES for p in ("houlsby", "pfeiffer")])
def test_placement_wraps_the_sub_block_outputs(kind: str, placement: str) -> None:
    model = get_delta_model(FAMILIES[kind](), BottleneckConfig(reduction_factor=4, placement=placement))
    names = list(bottleneck_layers(model.base_model))
    expected = LAYER0_SITES[kind] if placement == "houlsby" else LAYER0_SITES[kind][1:]
    assert names[: len(expected)] == expected
    assert len(names) == len(expected) * N_LAYERS


class _Block(nn.Module):
    def __init__(self, attention: str, mlp: str) -> None:
        super().__init__()
        self.attn, self.mlp = nn.Module(), nn.Module()
        self.attn.add_module(attention, nn.Linear(8, 8))
        self.mlp.add_module(mlp, nn.Linear(8, 8))


class _Stack(nn.Module):
    """A model transformers does not know: no config, layers in ``blocks``."""

    def __init__(self, attention: str, mlp: str) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_Block(attention, mlp) for _ in range(2)])


def test_unknown_architectures_fall_back_to_a_known_projection_pair() -> None:
    assert model_sites(_Stack("c_proj", "c_proj")) == PLACEMENTS["gpt2"]
    assert find_sites(_Stack("c_proj", "c_proj"), BottleneckConfig(placement="pfeiffer")) == [
        "blocks.0.mlp.c_proj",
        "blocks.1.mlp.c_proj",
    ]


def test_an_unplaceable_architecture_gets_an_error_listing_its_layer_modules() -> None:
    with pytest.raises(TargetError, match=r"model_type=None.*hold attn\.mix, mlp\.squeeze; register") as info:
        get_delta_model(_Stack("mix", "squeeze"), BottleneckConfig())
    assert "\n" not in str(info.value)


def test_a_wrong_placement_entry_is_reported_with_the_names_it_looked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(PLACEMENTS, "llama", Sites("attn.o", "mlp.o"))
    with pytest.raises(TargetError, match=r"LlamaForCausalLM has no module named <layers>\.<index>\.attn\.o or mlp\.o"):
        get_delta_model(tiny_llama(), BottleneckConfig())


@pytest.mark.parametrize(("layers", "kept"), [([1], [1]), (0, [0]), ([0, 1], [0, 1]), ([], [0, 1])])
def test_layers_to_transform_keeps_only_those_layers(layers, kept) -> None:
    model = get_delta_model(tiny_llama(), BottleneckConfig(reduction_factor=4, layers_to_transform=layers))
    names = list(bottleneck_layers(model.base_model))
    assert names == [f"model.layers.{i}.{site}" for i in kept for site in ("self_attn.o_proj", "mlp.down_proj")]


def test_layers_to_transform_outside_the_model_is_refused() -> None:
    with pytest.raises(TargetError, match=r"layers_to_transform=\[5\] selects none of this model's layers \[0, 1\]"):
        get_delta_model(tiny_llama(), BottleneckConfig(layers_to_transform=[5]))


# -- the math -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("init_weights", ["kaiming", "normal"])
def test_fresh_adapters_give_exactly_the_base_outputs(kind: str, init_weights: str) -> None:
    model = FAMILIES[kind]()
    reference = model_logits(model)
    delta = get_delta_model(model, BottleneckConfig(reduction_factor=4, init_weights=init_weights))
    assert torch.equal(model_logits(delta), reference)
    for layer in bottleneck_layers(delta.base_model).values():
        assert layer.adapter_down["default"].weight.abs().sum() > 0  # only up is zero: down can learn
        assert not layer.adapter_up["default"].weight.any()


@pytest.mark.parametrize(("kind", "placement"), [(k, p) for k in FAMILIES for p in ("houlsby", "pfeiffer")])
@pytest.mark.parametrize("kwargs", [{"reduction_factor": 4}, {"bottleneck_size": 5}])
def test_trainable_count_is_sites_times_2dm_plus_d_plus_m(kind: str, placement: str, kwargs: dict) -> None:
    model = get_delta_model(FAMILIES[kind](), BottleneckConfig(placement=placement, **kwargs))
    m = kwargs.get("bottleneck_size") or D_MODEL // kwargs["reduction_factor"]
    sites = (2 if placement == "houlsby" else 1) * N_LAYERS
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == sites * (2 * D_MODEL * m + D_MODEL + m)


def test_a_layer_computes_y_plus_s_up_act_down_y_for_each_active_adapter() -> None:
    torch.manual_seed(0)
    layer = BottleneckLayer(nn.Linear(6, 8), 8)
    layer.add("a", 3, BottleneckConfig(non_linearity="gelu", scaling=0.5))
    layer.add("b", 2, BottleneckConfig(non_linearity="tanh", dropout=0.5))
    for module in [*layer.adapter_down.values(), *layer.adapter_up.values()]:
        nn.init.normal_(module.weight)
        nn.init.normal_(module.bias)
    layer.eval()  # dropout off
    x = torch.randn(4, 6)
    y = layer.base_layer(x)

    def bottleneck(name: str, act) -> torch.Tensor:
        down, up = layer.adapter_down[name], layer.adapter_up[name]
        return F.linear(act(F.linear(y, down.weight, down.bias)), up.weight, up.bias)

    delta_a, delta_b = 0.5 * bottleneck("a", F.gelu), bottleneck("b", torch.tanh)
    for active, expected in ((["a"], y + delta_a), (["b"], y + delta_b), (["a", "b"], y + delta_a + delta_b)):
        layer.active_adapters = active
        torch.testing.assert_close(layer(x), expected)
    layer.disabled = True
    assert torch.equal(layer(x), y)


def test_conv1d_and_half_precision_bases_keep_fp32_adapters_and_the_base_dtype() -> None:
    model = get_delta_model(tiny_gpt2().to(torch.bfloat16), BottleneckConfig(reduction_factor=4))
    layer = model.base_model.transformer.h[0].attn.c_proj
    assert layer.adapter_down["default"].weight.dtype == torch.float32
    assert layer.adapter_up["default"].weight.shape == (D_MODEL, 8)
    assert model_logits(model).dtype == torch.bfloat16


# -- training -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "placement"), [("llama", "houlsby"), ("gpt2", "pfeiffer")])
def test_training_lowers_the_loss_and_moves_only_adapter_parameters(kind: str, placement: str) -> None:
    model = get_delta_model(tiny(kind), BottleneckConfig(reduction_factor=4, placement=placement))
    adapter = {id(p) for p in model.adapter_state("default").values()}
    assert adapter == {id(p) for p in model.parameters() if p.requires_grad}
    frozen_before = {name: p.detach().clone() for name, p in model.named_parameters() if id(p) not in adapter}

    losses = train(model, lr=3e-2)  # up starts at zero, so the first steps move only up: a larger step than LoRA's
    assert losses[-1] < 0.5 * losses[0], losses

    for name, param in model.named_parameters():
        if id(param) in adapter:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, f"{name} received a gradient"
            assert torch.equal(param, frozen_before[name]), f"{name} changed"
    with model.disable_adapter():
        assert torch.equal(logits(model), logits(tiny(kind)))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_generate_runs_the_adapter_with_and_without_the_cache(kind: str) -> None:
    prompt = token_inputs(batch=1, length=5)["input_ids"]
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    base_tokens = FAMILIES[kind]().generate(prompt, **settings)
    model = get_delta_model(FAMILIES[kind](), BottleneckConfig(reduction_factor=4))
    assert torch.equal(model.generate(prompt, **settings), base_tokens)  # identity at init
    perturb_trainable(model, seed=3)
    cached = model.generate(prompt, **settings, use_cache=True)
    assert torch.equal(model.generate(prompt, **settings, use_cache=False), cached)
    assert not torch.equal(cached, base_tokens)


def test_gradient_checkpointing_trains_the_adapter_alike() -> None:
    grads = []
    for checkpointing in (False, True):
        model = get_delta_model(tiny("llama"), BottleneckConfig(reduction_factor=4))
        perturb_trainable(model)
        if checkpointing:
            model.activation_checkpointing_enable()
            model.enable_input_require_grads()
        calls = []
        model.base_model.model.layers[0].self_attn.o_proj.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        model.train()
        model(input_ids=BATCH, labels=BATCH).loss.backward()
        assert len(calls) == (2 if checkpointing else 1)  # checkpointing recomputes the layer in backward
        grads.append({name: p.grad for name, p in model.adapter_state("default").items()})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


def test_merge_and_unload_is_refused_clearly_and_changes_nothing() -> None:
    model = get_delta_model(tiny_llama(), BottleneckConfig(reduction_factor=4))
    perturb_trainable(model)
    before = model_logits(model)
    with pytest.raises(MergeError, match="bottleneck adapters add a non-linearity .* cannot be merged"):
        model.merge_and_unload()
    with pytest.raises(MergeError, match="cannot be merged"):
        model.merge_adapter()
    assert torch.equal(model_logits(model), before)
    plain = model.unload()
    assert not bottleneck_layers(plain)
    assert torch.equal(model_logits(plain), model_logits(tiny_llama()))


# -- files ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "adapter", "task_type"),
    [("llama", "default", None), ("bert", "default", "SEQ_CLS"), ("gpt2", "other", None)],
)
def test_save_and_load_reproduce_the_outputs(kind: str, adapter: str, task_type: str | None, tmp_path: Path) -> None:
    config = BottleneckConfig(reduction_factor=4, non_linearity="silu", scaling=0.5, task_type=task_type)
    model = get_delta_model(FAMILIES[kind](), config, adapter_name=adapter)
    perturb_trainable(model)
    expected = model_logits(model)
    model.save_pretrained(tmp_path)

    folder = tmp_path if adapter == "default" else tmp_path / adapter
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
    site = LAYER0_SITES[kind][0]
    assert {f"base_model.model.{site}.{part}" for part in TENSOR_PARTS} <= keys
    head = {"base_model.model.classifier.weight", "base_model.model.classifier.bias"}  # SEQ_CLS trains a head copy
    assert len(keys - head) == 4 * 2 * N_LAYERS and (head <= keys) == (task_type == "SEQ_CLS")
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "BOTTLENECK"

    loaded = DeltaModel.from_pretrained(FAMILIES[kind](), folder, adapter_name=adapter)
    assert torch.equal(model_logits(loaded), expected)
    assert loaded.get_nb_trainable_parameters()[0] == 0  # frozen unless is_trainable


def test_the_documented_format_read_with_plain_torch_hooks_gives_the_same_outputs(tmp_path: Path) -> None:
    """docs/formats.md: y' = y + s · (act(y W_down^T + b_down) W_up^T + b_up) at each saved site."""
    config = BottleneckConfig(reduction_factor=4, non_linearity="gelu", scaling=0.7, layers_to_transform=[1])
    model = get_delta_model(tiny_gpt2(), config)
    perturb_trainable(model)
    expected = model_logits(model)
    model.save_pretrained(tmp_path)

    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    plain = tiny_gpt2()
    for key in tensors:
        if key.endswith(".adapter_down.weight"):
            site = key.removeprefix("base_model.model.").removesuffix(".adapter_down.weight")
            down_w, down_b, up_w, up_b = (tensors[key.replace("adapter_down.weight", part)] for part in TENSOR_PARTS)

            def hook(module, inputs, y, down_w=down_w, down_b=down_b, up_w=up_w, up_b=up_b):
                hidden = ACT2FN[saved["non_linearity"]](y @ down_w.T + down_b)
                return y + saved["scaling"] * (hidden @ up_w.T + up_b)

            plain.get_submodule(site).register_forward_hook(hook)
    assert len(tensors) == 8  # layer 1 only: two sites, four tensors each
    torch.testing.assert_close(model_logits(plain), expected)


def test_a_file_for_another_bottleneck_size_is_refused(tmp_path: Path) -> None:
    get_delta_model(tiny_llama(), BottleneckConfig(reduction_factor=4)).save_pretrained(tmp_path)
    mismatch = r"adapter_(down|up)\.\w+ has shape \(\S*8\S*\) but the model expects \(\S*4"
    with pytest.raises(AdapterLoadError, match=mismatch):
        DeltaModel.from_pretrained(tiny_llama(), tmp_path, config=BottleneckConfig(reduction_factor=8))


# -- several adapters -----------------------------------------------------------------------------


def test_adapters_switch_sum_delete_and_load_side_by_side(tmp_path: Path) -> None:
    model = get_delta_model(tiny_llama(), BottleneckConfig(reduction_factor=4))
    model.add_adapter("pf", BottleneckConfig(bottleneck_size=3, placement="pfeiffer", non_linearity="tanh"))
    perturb_trainable(model)  # only "default" trains now
    model.set_adapter("pf")
    perturb_trainable(model, seed=8)
    base = model_logits(tiny_llama())
    outputs = {}
    for active in ("default", "pf"):
        model.set_adapter(active)
        outputs[active] = model_logits(model)
        assert {id(p) for p in model.parameters() if p.requires_grad} == {
            id(p) for p in model.adapter_state(active).values()
        }
    assert not torch.allclose(outputs["default"], outputs["pf"]) and not torch.allclose(outputs["pf"], base)
    model.set_adapter(["default", "pf"])
    both = model_logits(model)
    assert not torch.allclose(both, outputs["default"]) and not torch.allclose(both, outputs["pf"])

    model.save_pretrained(tmp_path)
    again = DeltaModel.from_pretrained(tiny_llama(), tmp_path)
    again.load_adapter(tmp_path / "pf", adapter_name="pf")
    again.set_adapter(["default", "pf"])
    assert torch.equal(model_logits(again), both)

    model.delete_adapter("default")
    assert model.active_adapters == ["pf"] and torch.equal(model_logits(model), outputs["pf"])
    assert len(bottleneck_layers(model.base_model)) == N_LAYERS  # attention sites had only "default"
    model.delete_adapter("pf")
    assert not bottleneck_layers(model.base_model)
    assert torch.equal(model_logits(model), base)


# -- the embedded model ---------------------------------------------------------------------------


@pytest.mark.slow
def test_a_few_steps_on_smollm2_lower_the_held_out_chatterbot_loss(smollm2_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, local_files_only=True)
    train_records, eval_records = split_records(chatterbot_conversations(), eval_fraction=0.1, seed=0)
    train_set = encode_records(tokenizer, train_records[:16], max_length=64).examples
    eval_set = encode_records(tokenizer, eval_records[:8], max_length=64).examples
    collate = lambda batch: collate_causal(batch, tokenizer.pad_token_id)  # noqa: E731

    model = get_delta_model(base, BottleneckConfig(placement="pfeiffer", non_linearity="gelu", task_type="CAUSAL_LM"))
    assert model.get_nb_trainable_parameters()[0] == 30 * (2 * 576 * 36 + 576 + 36)
    before = heldout_loss(model, eval_set, collate)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for start in range(0, len(train_set), 4):
        optimizer.zero_grad(set_to_none=True)
        model(**collate(train_set[start : start + 4])).loss.backward()
        optimizer.step()
    after = heldout_loss(model, eval_set, collate)
    assert after < before - 0.2, (before, after)
