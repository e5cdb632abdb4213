"""VeRA checked against peft 0.21.2 (the installed package is the oracle): its own VeRA rows
(``tests/test_custom_models.py``) both ways and merged, with the projections in the file and without, its
multi-adapter row, the shared-projection refusals it makes, the lifecycle, and the tiny Llama training and
round trip."""

from __future__ import annotations

from pathlib import Path

import bitsandbytes as bnb
import peft
import pytest
import torch
from peft.tuners.vera import VeraLayer as PeftVeraLayer
from safetensors.torch import load_file, save_file

import deltatune
from deltatune import DeltaModel, VeraConfig, get_delta_model
from deltatune.errors import AdapterLoadError, ConfigError
from deltatune.tuners.vera.layer import VeraLayer
from family_checks import (
    config_and_doc_have_peft_s_fields,
    lifecycle_keeps_the_base,
    row_matches_peft_and_merges_alike,
    two_adapters_match_peft,
)
from peft_models import MLP, example, maker
from test_lora_conv import DIRECTIONS
from test_training import BATCH, logits, tiny, train
from tiny_models import perturb_trainable, tiny_llama

pytestmark = [
    pytest.mark.filterwarnings("ignore:Specified to not (save|load) vera_A and vera_B:UserWarning"),
    pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning"),
]

RANDOM = {"init_weights": False}

# peft's VeRA rows: name -> (model, VeraConfig kwargs)
ROWS: dict[str, tuple[str, dict]] = {
    "Vanilla MLP 1 VeRA": ("MLP", {"target_modules": "lin0"}),
    "Vanilla MLP 2 VeRA": ("MLP", {"target_modules": ["lin0"]}),
    "Vanilla MLP 3 VeRA": ("MLP", {"target_modules": ["lin1"]}),
    "Vanilla MLP 4 VeRA": ("MLP", {"target_modules": ["lin0", "lin1"]}),
    "Vanilla MLP 5 VeRA": ("MLP", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    "Embedding + transformers Conv1D 1 VeRA": ("EmbConv1D", {"target_modules": ["conv1d"]}),
}
# peft's multi-adapter row (``MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES``) on the MLP; peft leaves out targeting
# lin0 and lin1 with two adapters, which it refuses (see test_a_second_adapter_wider_than_the_projections...)
TWO_ADAPTERS = {"VeRA Same": ({"target_modules": ["lin0"]} | RANDOM, {"target_modules": ["lin0"]} | RANDOM)}
REFUSED: dict[str, str] = {}  # every peft VeRA row passes


def test_the_config_has_peft_s_fields_and_docs_vera_md_a_row_for_each():
    config_and_doc_have_peft_s_fields("VeraConfig", "vera.md")


def test_the_table_holds_all_of_peft_0_21_2_vera_rows():
    assert (len(ROWS), len(TWO_ADAPTERS), len(REFUSED)) == (6, 1, 0)
    assert peft.__version__ == "0.21.2"


def projections(delta_side: DeltaModel) -> dict[str, torch.Tensor]:
    layer = next(m for m in delta_side.modules() if isinstance(m, VeraLayer))
    return {"vera_A": layer.vera_projections.vera_A, "vera_B": layer.vera_projections.vera_B}


@pytest.mark.parametrize("save_projection", [True, False])
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("row", list(ROWS))
def test_row_matches_peft_both_ways_and_merges_as_peft_does(row, direction, save_projection, tmp_path):
    """Same λ tensors, outputs and gradients, and the same projections, whether the file carries them
    (``save_projection``) or both libraries draw them from ``projection_prng_key``."""
    model_id, options = ROWS[row]
    options = {**options, "save_projection": save_projection, "r": 16}
    peft_side, delta_side = row_matches_peft_and_merges_alike(
        maker(model_id), example(model_id), options, direction, tmp_path, "VeraConfig", RANDOM
    )
    for name, tensor in projections(delta_side).items():
        assert torch.equal(tensor, getattr(peft_side.base_model, name)["default"]), name
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert ({"base_model.vera_A", "base_model.vera_B"} <= keys) == save_projection


def test_the_default_rank_draws_peft_s_projections_for_the_widest_layer():
    """r = 256 over lin0 [20, 10] and lin1 [2, 20]: A [256, 20], B [20, 256], bit for bit peft's."""
    peft_model = peft.get_peft_model(maker("MLP")(), peft.VeraConfig(target_modules=["lin0", "lin1"]))
    drawn = projections(get_delta_model(maker("MLP")(), VeraConfig(target_modules=["lin0", "lin1"])))
    assert drawn["vera_A"].shape == (256, 20) and drawn["vera_B"].shape == (20, 256)
    for name, tensor in drawn.items():
        assert torch.equal(tensor, getattr(peft_model.base_model, name)["default"]), name


@pytest.mark.parametrize("bias", ["vera_only", "all"])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_trained_biases_are_saved_and_loaded_as_peft_does(bias, direction, tmp_path):
    options = {"target_modules": ["lin0"], "bias": bias, "r": 8}
    row_matches_peft_and_merges_alike(maker("MLP"), example("MLP"), options, direction, tmp_path, "VeraConfig", RANDOM)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    expected = {"base_model.model.lin0.base_layer.bias"} if bias == "vera_only" else {"base_model.model.lin1.bias"}
    assert expected <= keys


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("row", list(TWO_ADAPTERS))
def test_two_adapters_match_peft_both_ways(row, direction, tmp_path):
    first_options, second_options = TWO_ADAPTERS[row]
    two_adapters_match_peft(
        maker("MLP"), example("MLP"), first_options, second_options, direction, tmp_path, "VeraConfig"
    )


def test_lifecycle_switches_disables_merges_and_deletes():
    options = {"target_modules": ["lin0", "lin1"], "r": 8}
    model = get_delta_model(maker("MLP")(), VeraConfig(**options))
    perturb_trainable(model)
    lifecycle_keeps_the_base(model, maker("MLP"), example("MLP"), VeraConfig(**options))


def test_a_fresh_adapter_is_the_base_model_and_trains_only_its_vectors():
    model = get_delta_model(maker("MLP")(), VeraConfig(target_modules=["lin0", "lin1"], r=8, d_initial=0.3))
    x = example("MLP")
    torch.testing.assert_close(model(x), maker("MLP")()(x), atol=0, rtol=0)
    trainable = {name: tuple(p.shape) for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        f"base_model.{layer}.vera_lambda_{kind}.default": shape
        for layer, b_size in (("lin0", 20), ("lin1", 2))
        for kind, shape in (("b", (b_size,)), ("d", (8,)))
    }
    assert torch.equal(model.base_model.lin0.vera_lambda_d["default"], torch.full((8,), 0.3))
    assert not model.state_dict().keys() & {"vera_A", "vera_B"}  # buffers the file carries, not the model


# -- what peft refuses, refused by name --------------------------------------------------------------

# a second adapter on a model holding VeRA on lin0 (r=8, key 0, projections saved): kwargs -> refusal
SECOND_ADAPTERS = {
    "wider layer": ({"target_modules": ["lin1"]}, r"^lin1 needs vera_A's input width >= 20 but the shared"),
    "higher rank": ({"target_modules": ["lin0"], "r": 16}, r"^r=16 differs from the 8 of the VeRA projections"),
    "other key": ({"target_modules": ["lin0"], "projection_prng_key": 3}, r"^projection_prng_key=3 differs"),
    "projections not saved": ({"target_modules": ["lin0"], "save_projection": False}, r"^save_projection=False"),
}


@pytest.mark.parametrize("case", list(SECOND_ADAPTERS))
def test_a_second_adapter_that_cannot_share_the_projections_is_refused_as_in_peft(case):
    options, message = SECOND_ADAPTERS[case]
    peft_model = peft.get_peft_model(maker("MLP")(), peft.VeraConfig(target_modules=["lin0"], r=8))
    with pytest.raises(ValueError):
        peft_model.add_adapter("other", peft.VeraConfig(**{"r": 8, **options}))
    model = get_delta_model(maker("MLP")(), VeraConfig(target_modules=["lin0"], r=8))
    with pytest.raises(ConfigError, match=message) as error:
        model.add_adapter("other", VeraConfig(**{"r": 8, **options}))
    assert "\n" not in str(error.value)
    assert list(model.peft_config) == ["default"]
    assert all(layer.adapter_names == ["default"] for layer in model.modules() if isinstance(layer, VeraLayer))


@pytest.mark.parametrize(("model_id", "target"), [("Conv2d", "conv2d"), ("EmbConv1D", "emb"), ("MHA", "mha")])
def test_layer_types_peft_does_not_adapt_are_refused_by_name(model_id, target):
    with pytest.raises((ValueError, TypeError)):
        peft.get_peft_model(maker(model_id)(), peft.VeraConfig(target_modules=[target]))
    with pytest.raises(ConfigError, match=rf"^VeRA cannot wrap {target} \("):
        get_delta_model(maker(model_id)(), VeraConfig(target_modules=[target]))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"r": 0}, "r"),
        ({"projection_prng_key": "zero"}, "projection_prng_key"),
        ({"bias": "lora_only"}, "bias"),
        ({"vera_dropout": 1.5}, "vera_dropout"),
        ({"d_initial": "small"}, "d_initial"),
        ({"layers_pattern": "layers"}, "layers_pattern"),
    ],
)
def test_invalid_values_raise_one_line_config_errors(kwargs, field):
    with pytest.raises(ConfigError, match=f"^{field}") as error:
        VeraConfig(**kwargs)
    assert "\n" not in str(error.value)


def test_a_file_that_should_carry_the_projections_but_lacks_them_is_refused(tmp_path):
    get_delta_model(maker("MLP")(), VeraConfig(target_modules=["lin0"], r=8)).save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(path).items() if "vera_A" not in k}, str(path))
    with pytest.raises(AdapterLoadError, match="lacks base_model.vera_A"):
        DeltaModel.from_pretrained(maker("MLP")(), tmp_path)


def test_a_peft_saved_config_reads_back_with_the_same_fields(tmp_path):
    options = {"target_modules": ["lin0"], "r": 8, "projection_prng_key": 7, "save_projection": False, "d_initial": 0.2}
    peft.get_peft_model(maker("MLP")(), peft.VeraConfig(**options)).save_pretrained(tmp_path)
    config = deltatune.DeltaConfig.from_pretrained(tmp_path)
    assert isinstance(config, VeraConfig)
    assert {key: getattr(config, key) for key in options} == options


def test_a_quantised_base_layer_is_refused_by_name():
    model = MLP(lambda fan_in, fan_out: bnb.nn.Linear4bit(fan_in, fan_out, quant_type="nf4")).to("cpu")
    with pytest.raises(ConfigError, match=r"^VeRA on the quantised layer lin0 \(Linear4bit\) is not supported"):
        get_delta_model(model, VeraConfig(target_modules=["lin0"], r=8))


# -- a real model -----------------------------------------------------------------------------------


def test_llama_defaults_adapt_peft_s_targets():
    peft_model = peft.get_peft_model(tiny_llama(), peft.VeraConfig(r=8))
    delta_model = get_delta_model(tiny_llama(), VeraConfig(r=8))
    peft_names = {
        n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if isinstance(m, PeftVeraLayer)
    }
    delta_names = {n.removeprefix("base_model.") for n, m in delta_model.named_modules() if isinstance(m, VeraLayer)}
    assert delta_names == peft_names and len(delta_names) == 2 * 2


def test_tiny_llama_trains_and_round_trips_to_identical_logits(tmp_path: Path):
    model = get_delta_model(tiny("llama"), VeraConfig(r=64, target_modules="all-linear"))
    adapter = {id(p) for p in model.adapter_state("default").values()}
    assert adapter == {id(p) for p in model.parameters() if p.requires_grad}
    losses = train(model, lr=5e-2)
    assert losses[-1] < 0.9 * losses[0], losses
    expected = logits(model)
    model.save_pretrained(tmp_path)
    loaded = DeltaModel.from_pretrained(tiny("llama"), tmp_path)
    assert torch.equal(logits(loaded), expected)
    with model.disable_adapter():
        assert torch.equal(logits(model), logits(tiny("llama")))
    assert model(input_ids=BATCH).logits.dtype == torch.float32


def test_a_bfloat16_base_keeps_fp32_vectors_and_its_own_dtype():
    model = get_delta_model(tiny_llama().to(torch.bfloat16), VeraConfig(r=8, init_weights=False))
    layer = model.base_model.model.layers[0].self_attn.q_proj
    assert layer.vera_lambda_b["default"].dtype == torch.float32 and layer.base_layer.weight.dtype == torch.bfloat16
    assert layer.vera_projections.vera_A.dtype == torch.float32
    assert model(input_ids=BATCH).logits.dtype == torch.bfloat16
