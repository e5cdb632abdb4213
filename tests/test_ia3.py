"""IA3 checked against peft 0.21.2 (the installed package is the oracle): its own IA3 rows
(``tests/test_custom_models.py``) both ways and merged, its two multi-adapter rows, the lifecycle, the
config's refusals, and the tiny Llama training and round trip."""

from __future__ import annotations

import re
from pathlib import Path

import bitsandbytes as bnb
import peft
import pytest
import torch
from torch import nn

import deltatune
from deltatune import DeltaModel, IA3Config, get_delta_model
from deltatune.errors import ConfigError, MergeError
from deltatune.tuners.ia3.layer import IA3Layer
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
    pytest.mark.filterwarnings("ignore:Unmerge result can be inaccurate for \\(IA\\)\\^3:UserWarning"),
    pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning"),
]

RANDOM = {"init_ia3_weights": False}


def ff(targets: list[str] | str, feedforward: list[str] | str) -> dict:
    return {"target_modules": targets, "feedforward_modules": feedforward}


# peft's IA3 rows: name -> (model, IA3Config kwargs). peft names two rows "transformers Conv1D 1 IA3"; the
# second (with modules_to_save) is told apart here by a suffix.
ROWS: dict[str, tuple[str, dict]] = {
    "Vanilla MLP 1 IA3": ("MLP", ff("lin0", [])),
    "Vanilla MLP 2 IA3": ("MLP", ff("lin0", "lin0")),
    "Vanilla MLP 3 IA3": ("MLP", ff(["lin0"], [])),
    "Vanilla MLP 4 IA3": ("MLP", ff(["lin0"], ["lin0"])),
    "Vanilla MLP 5 IA3": ("MLP", ff(["lin1"], [])),
    "Vanilla MLP 6 IA3": ("MLP", ff(["lin1"], ["lin1"])),
    "Vanilla MLP 7 IA3": ("MLP", ff(["lin0", "lin1"], [])),
    "Vanilla MLP 8 IA3": ("MLP", ff(["lin0", "lin1"], ["lin0", "lin1"])),
    "Vanilla MLP 9 IA3": ("MLP", {**ff(["lin0"], ["lin0"]), "modules_to_save": ["lin1"]}),
    "transformers Conv1D 1 IA3": ("EmbConv1D", ff(["conv1d"], ["conv1d"])),
    "transformers Conv1D 2 IA3": ("EmbConv1D", ff(["conv1d", "lin0"], ["conv1d", "lin0"])),
    "transformers Conv1D 1 IA3 (modules_to_save)": (
        "EmbConv1D",
        {**ff(["conv1d"], ["conv1d"]), "modules_to_save": ["lin0"]},
    ),
    "Conv2d 1 IA3": ("Conv2d", ff(["conv2d"], [])),
    "Conv2d 2 IA3": ("Conv2d", ff(["conv2d"], ["conv2d"])),
    "Conv2d 3 IA3": ("Conv2d", ff(["conv2d", "lin0"], [])),
    "Conv2d 4 IA3": ("Conv2d", ff(["conv2d", "lin0"], ["conv2d"])),
    "Conv2d 5 IA3": ("Conv2d", ff(["conv2d", "lin0"], ["conv2d", "lin0"])),
    "Conv3d 1 IA3": ("Conv3d", ff(["conv3d"], [])),
    "Conv3d 2 IA3": ("Conv3d", ff(["conv3d"], ["conv3d"])),
    "Conv3d 3 IA3": ("Conv3d", ff(["conv3d", "lin0"], [])),
    "Conv3d 4 IA3": ("Conv3d", ff(["conv3d", "lin0"], ["conv3d"])),
    "Conv3d 5 IA3": ("Conv3d", ff(["conv3d", "lin0"], ["conv3d", "lin0"])),
}
# peft's multi-adapter rows (``MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES``): name -> (first, second) kwargs on the MLP
TWO_ADAPTERS = {
    "IA3 Same": (ff(["lin0"], ["lin0"]) | RANDOM, ff(["lin0"], ["lin0"]) | RANDOM),
    "IA3 Different": (ff(["lin0"], ["lin0"]) | RANDOM, ff(["lin1"], ["lin1"]) | RANDOM),
}
REFUSED: dict[str, str] = {}  # every peft IA3 row passes


def test_the_config_has_peft_s_fields_and_docs_ia3_md_a_row_for_each():
    config_and_doc_have_peft_s_fields("IA3Config", "ia3.md")


def test_the_table_holds_all_of_peft_0_21_2_ia3_rows():
    assert (len(ROWS), len(TWO_ADAPTERS), len(REFUSED)) == (22, 2, 0)
    assert peft.__version__ == "0.21.2"


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("row", list(ROWS))
def test_row_matches_peft_both_ways_and_merges_as_peft_does(row, direction, tmp_path):
    model_id, options = ROWS[row]
    row_matches_peft_and_merges_alike(
        maker(model_id), example(model_id), options, direction, tmp_path, "IA3Config", RANDOM
    )


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("row", list(TWO_ADAPTERS))
def test_two_adapters_match_peft_both_ways(row, direction, tmp_path):
    first_options, second_options = TWO_ADAPTERS[row]
    two_adapters_match_peft(
        maker("MLP"), example("MLP"), first_options, second_options, direction, tmp_path, "IA3Config"
    )


def test_grouped_convolution_scales_and_merges_as_peft_does(tmp_path):
    """Input scaling on a grouped convolution merges into each group's kernels (peft's layout)."""
    options = ff(["conv2d"], ["conv2d"])
    for direction in DIRECTIONS:
        row_matches_peft_and_merges_alike(
            maker("Conv2dGroups"),
            example("Conv2dGroups"),
            options,
            direction,
            tmp_path / direction,
            "IA3Config",
            RANDOM,
        )


@pytest.mark.parametrize("feedforward", [[], ["lin0"]])
def test_lifecycle_switches_disables_merges_and_deletes(feedforward):
    """Vectors start at ones and are perturbed: unmerging divides by l + 1e-8 (as peft does), which is exact
    only away from l = 0."""
    options = ff(["lin0", "lin1"], feedforward)
    model = get_delta_model(maker("MLP")(), IA3Config(**options))
    perturb_trainable(model)
    lifecycle_keeps_the_base(model, maker("MLP"), example("MLP"), IA3Config(**options))


def test_a_fresh_adapter_is_the_base_model_and_trains_only_its_vectors():
    model = get_delta_model(maker("MLP")(), IA3Config(**ff(["lin0", "lin1"], ["lin1"])))
    x = example("MLP")
    torch.testing.assert_close(model(x), maker("MLP")()(x), atol=0, rtol=0)
    trainable = {name: p.shape for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"base_model.lin0.ia3_l.default": (20, 1), "base_model.lin1.ia3_l.default": (1, 20)}


def test_safe_merge_refuses_non_finite_vectors_and_changes_nothing():
    model = get_delta_model(maker("MLP")(), IA3Config(**ff(["lin0", "lin1"], ["lin0"])))
    with torch.no_grad():
        model.base_model.lin1.ia3_l["default"][0, 0] = float("inf")
    before = {name: t.clone() for name, t in model.state_dict().items()}
    with pytest.raises(MergeError, match="^merging adapter 'default' would put NaN/Inf into the weights of lin1"):
        model.merge_adapter(safe_merge=True)
    assert model.merged_adapters == []
    assert all(torch.equal(t, before[name]) for name, t in model.state_dict().items())


# -- the config and what it refuses ----------------------------------------------------------------


def test_feedforward_modules_must_be_a_subset_of_the_targets_as_in_peft():
    with pytest.raises(ValueError, match="subset"):
        peft.IA3Config(**ff(["lin0"], ["lin1"]))
    with pytest.raises(ConfigError, match=r"^feedforward_modules \['lin1'\] are not in target_modules \['lin0'\]"):
        IA3Config(**ff(["lin0"], ["lin1"]))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"init_ia3_weights": "yes"}, "init_ia3_weights"),
        ({"target_modules": 3}, "target_modules"),
        ({"feedforward_modules": "("}, "feedforward_modules"),
        ({"modules_to_save": "lin1"}, "modules_to_save"),
    ],
)
def test_invalid_values_raise_one_line_config_errors(kwargs, field):
    with pytest.raises(ConfigError, match=f"^{field}") as error:
        IA3Config(**kwargs)
    assert "\n" not in str(error.value)


def test_a_peft_saved_config_reads_back_with_the_same_fields(tmp_path):
    peft.get_peft_model(maker("MLP")(), peft.IA3Config(**ff(["lin0", "lin1"], ["lin0"]))).save_pretrained(tmp_path)
    config = deltatune.DeltaConfig.from_pretrained(tmp_path)
    assert isinstance(config, IA3Config)
    assert (config.target_modules, config.feedforward_modules) == (["lin0", "lin1"], ["lin0"])
    assert config.init_ia3_weights is True and config.inference_mode is True


# layer types peft's IA3 does not wrap: model -> target
UNWRAPPABLE = {"Conv1d": "conv1d", "EmbConv1D": "emb", "MHA": "mha"}


@pytest.mark.parametrize("model_id", list(UNWRAPPABLE))
def test_layer_types_peft_does_not_adapt_are_refused_by_name(model_id):
    target = UNWRAPPABLE[model_id]
    with pytest.raises((ValueError, TypeError)):
        peft.get_peft_model(maker(model_id)(), peft.IA3Config(**ff([target], [])))
    model = maker(model_id)()
    with pytest.raises(ConfigError, match=rf"^IA3 cannot wrap {target} \(") as error:
        get_delta_model(model, IA3Config(**ff([target], [])))
    assert "\n" not in str(error.value)
    assert not any(isinstance(m, IA3Layer) for m in model.modules())


def test_a_second_adapter_disagreeing_on_feedforward_is_refused():
    model = get_delta_model(maker("MLP")(), IA3Config(**ff(["lin0"], ["lin0"])))
    with pytest.raises(ConfigError, match="^lin0 already scales its input for adapter.s. default"):
        model.add_adapter("other", IA3Config(**ff(["lin0"], [])))
    assert list(model.peft_config) == ["default"]


def test_unknown_architectures_need_feedforward_modules_as_in_peft():
    with pytest.raises(ValueError, match="feedforward_modules"):
        peft.get_peft_model(maker("MLP")(), peft.IA3Config(target_modules=["lin0"]))
    with pytest.raises(ConfigError, match="^IA3 has no default feedforward_modules for model_type=None"):
        get_delta_model(maker("MLP")(), IA3Config(target_modules=["lin0"]))


def test_a_quantised_base_layer_is_refused_by_name():
    model = MLP(lambda fan_in, fan_out: bnb.nn.Linear4bit(fan_in, fan_out, quant_type="nf4")).to("cpu")
    with pytest.raises(ConfigError, match=r"^IA3 on the quantised layer lin0 \(Linear4bit\) is not supported"):
        get_delta_model(model, IA3Config(target_modules=["lin0"], feedforward_modules=[]))


# -- a real model -----------------------------------------------------------------------------------


def ia3_modules(model: nn.Module, prefix: str = "") -> dict[str, bool]:
    """Adapted module name (relative to the transformers model) -> whether it scales its input."""
    return {
        name.removeprefix(prefix): module.is_feedforward
        for name, module in model.named_modules()
        if hasattr(module, "ia3_l") and hasattr(module, "is_feedforward")
    }


def test_llama_defaults_are_peft_s_targets_and_feedforward_modules(tmp_path):
    peft_model = peft.get_peft_model(tiny_llama(), peft.IA3Config())
    delta_model = get_delta_model(tiny_llama(), IA3Config())
    expected = ia3_modules(peft_model, "base_model.model.")
    assert ia3_modules(delta_model, "base_model.") == expected
    assert sorted({name.rsplit(".", 1)[1] for name, scales_input in expected.items() if scales_input}) == ["down_proj"]
    assert len(expected) == 3 * 2
    delta_model.save_pretrained(tmp_path)
    saved = deltatune.DeltaConfig.from_pretrained(tmp_path)
    assert (saved.target_modules, saved.feedforward_modules) == (["down_proj", "k_proj", "v_proj"], ["down_proj"])


def test_tiny_llama_trains_and_round_trips_to_identical_logits(tmp_path: Path):
    model = get_delta_model(tiny("llama"), IA3Config())
    adapter = {id(p) for p in model.adapter_state("default").values()}
    assert adapter == {id(p) for p in model.parameters() if p.requires_grad}
    losses = train(model, lr=5e-2)
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(later < earlier for earlier, later in zip(losses[::10], losses[10::10])), losses
    expected = logits(model)
    model.save_pretrained(tmp_path)
    loaded = DeltaModel.from_pretrained(tiny("llama"), tmp_path)
    assert torch.equal(logits(loaded), expected)
    with model.disable_adapter():
        assert torch.equal(logits(model), logits(tiny("llama")))
    assert model(input_ids=BATCH).logits.dtype == torch.float32


def test_a_bfloat16_base_keeps_fp32_vectors_and_its_own_dtype():
    model = get_delta_model(tiny_llama().to(torch.bfloat16), IA3Config(init_ia3_weights=False))
    layer = model.base_model.model.layers[0].mlp.down_proj
    assert layer.ia3_l["default"].dtype == torch.float32 and layer.base_layer.weight.dtype == torch.bfloat16
    assert model(input_ids=BATCH).logits.dtype == torch.bfloat16
    weight = layer.base_layer.weight.detach().clone()
    model.merge_adapter()
    expected = (weight.float() * layer.ia3_l["default"].detach()).to(torch.bfloat16)
    assert torch.equal(layer.base_layer.weight, expected)
    assert re.search("scales its input", repr(layer))
