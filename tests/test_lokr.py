"""LoKr (``LoKrConfig``) against peft 0.21.2: its own rows (``tests/test_custom_models.py``) both ways and merged,
the Kronecker split (``kron_factors``) and which factors are kept low-rank, exactly as peft chooses them,
training-time dropout drawn as peft draws it, the three starts, adapter switching, refusals and the tiny Llama.

Every LoKr row peft has passes here; none is refused (deltatune builds every LoKrConfig field).
"""

from __future__ import annotations

import peft
import pytest
import torch
from peft.tuners.lokr.layer import factorization

import deltatune
from deltatune.errors import ConfigError
from deltatune.tuners.lycoris.lokr import LoKrLayer, kron_factors
from lycoris_checks import (
    check_adapters_switch_delete_disable_and_unmerge,
    check_config_matches_peft,
    check_module_dropout_one_gives_the_base_in_training,
    check_one_op_forward,
    check_rank_dropout_drops_rows_while_training,
    check_refuses_layers_peft_cannot_adapt,
    check_row_both_ways_and_merged,
    check_tiny_llama_trains_and_round_trips,
    check_train_defaults,
    check_training_dropout_matches_peft,
)
from peft_models import maker
from test_lora_conv import DIRECTIONS
from tiny_models import _seeded

METHOD = "LoKrConfig"
EFFECTIVE = {"target_modules": ["conv2d", "lin0"], "use_effective_conv2d": True}

# peft's LoKr rows: name -> (model, LoKrConfig kwargs)
ROWS: dict[str, tuple[str, dict]] = {
    "Vanilla MLP 1 LOKR": ("MLP", {"target_modules": "lin0"}),
    "Vanilla MLP 2 LOKR": ("MLP", {"target_modules": ["lin0"]}),
    "Vanilla MLP 3 LOKR": ("MLP", {"target_modules": ["lin1"]}),
    "Vanilla MLP 4 LOKR": ("MLP", {"target_modules": ["lin0", "lin1"]}),
    "Vanilla MLP 5 LOKR": ("MLP", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    "Vanilla MLP 6 LOKR": ("MLP", {"target_modules": ["lin0"], "alpha": 4, "module_dropout": 0.1}),
    "Vanilla MLP 7 LOKR": ("MLP", {"target_modules": "lin0", "rank_dropout": 0.5}),
    "Vanilla MLP 8 LOKR": ("MLP", {"target_modules": "lin0", "decompose_both": True, "r": 1, "alpha": 1}),
    "Conv1d LOKR 1": ("Conv1d", {"target_modules": ["conv1d"]}),
    "Conv1d LOKR 2": ("Conv1d", {"target_modules": ["conv1d"], "r": 2}),
    "Conv1d Groups LOKR": ("Conv1dGroups", {"target_modules": ["conv1d"], "r": 4}),
    "Conv1d LOKR 3": ("Conv1dBigger", {"target_modules": ["conv1d"], "r": 2, "use_effective_conv2d": True}),
    "Conv1d LOKR 4": ("Conv1dBigger", {"target_modules": ["conv1d"], "r": 2, "use_effective_conv2d": False}),
    "Conv2d 1 LOKR": ("Conv2d", {"target_modules": ["conv2d"]}),
    "Conv2d 2 LOKR": ("Conv2d", {"target_modules": ["conv2d", "lin0"]}),
    "Conv2d 3 LOKR": ("Conv2d", {"target_modules": ["conv2d"], "use_effective_conv2d": True}),
    "Conv2d 4 LOKR": ("Conv2d", EFFECTIVE),
    "Conv2d 1x1 LOKR": ("Conv2d1x1", {"target_modules": ["conv2d"]}),
    "Conv2d 5 LOKR": ("Conv2d", {**EFFECTIVE, "decompose_both": True}),
    "Conv2d 6 LOKR": ("Conv2d", {**EFFECTIVE, "decompose_factor": 4}),
    "Conv2d 7 LOKR": ("Conv2d", {**EFFECTIVE, "decompose_both": True, "decompose_factor": 4}),
    "Conv2d Groups LOKR": ("Conv2dGroups", {"target_modules": ["conv2d"]}),
    "Conv2d Groups2 LOKR": ("Conv2dGroups2", {"target_modules": ["conv2d"]}),
}
DROPOUT_ROWS = ["Vanilla MLP 6 LOKR", "Vanilla MLP 7 LOKR"]


def test_the_table_holds_all_of_peft_0_21_2_lokr_rows():
    assert len(ROWS) == 23
    assert peft.__version__ == "0.21.2"


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("row", list(ROWS))
def test_row_matches_peft_both_ways_and_merges_as_peft_does(row, direction, tmp_path):
    model_id, options = ROWS[row]
    check_row_both_ways_and_merged(METHOD, model_id, options, direction, tmp_path)


@pytest.mark.parametrize("row", DROPOUT_ROWS)
def test_training_mode_dropout_draws_as_peft_does(row, tmp_path):
    model_id, options = ROWS[row]
    check_training_dropout_matches_peft(METHOD, model_id, options, tmp_path)


def test_training_mode_scaled_rank_dropout_draws_as_peft_does(tmp_path):
    options = {"target_modules": ["lin0"], "rank_dropout": 0.5, "rank_dropout_scale": True}
    check_training_dropout_matches_peft(METHOD, "MLP", options, tmp_path)


def test_the_forward_is_one_op_with_the_summed_weight_where_that_keeps_the_arithmetic(tmp_path):
    check_one_op_forward(METHOD, tmp_path)


def test_module_dropout_one_gives_the_base_output_in_training():
    check_module_dropout_one_gives_the_base_in_training(METHOD, "lin0")


@pytest.mark.parametrize("rescale", [False, True])
def test_rank_dropout_rescales_the_kept_rows_only_with_rank_dropout_scale(rescale):
    scale, kept, rows = check_rank_dropout_drops_rows_while_training(METHOD, {"rank_dropout_scale": rescale})
    assert scale == pytest.approx(rows / kept if rescale else 1.0)


@pytest.mark.parametrize("factor", [-1, 1, 2, 3, 4, 5, 8, 16, 64])
def test_kron_factors_split_every_dimension_as_peft_does(factor):
    for dimension in range(1, 400):
        assert kron_factors(dimension, factor) == factorization(dimension, factor), (dimension, factor)


# (model, options) -> the factors peft makes for the adapted layer, by shape
SHAPES = [
    ("MLP", {"target_modules": ["lin0"]}, {"lokr_w1": (4, 2), "lokr_w2": (5, 5)}),
    (
        "MLP",
        {"target_modules": ["lin0"], "r": 1, "decompose_both": True},
        {"lokr_w1_a": (4, 1), "lokr_w1_b": (1, 2), "lokr_w2_a": (5, 1)},
    ),
    ("Conv2d", {"target_modules": ["conv2d"]}, {"lokr_w1": (2, 1), "lokr_w2": (5, 5, 3, 3)}),
    ("Conv2d", {"target_modules": ["conv2d"], "r": 2}, {"lokr_w1": (2, 1), "lokr_w2_a": (5, 2), "lokr_w2_b": (2, 45)}),
    (
        "Conv2d",
        {"target_modules": ["conv2d"], "r": 2, "use_effective_conv2d": True},
        {"lokr_w1": (2, 1), "lokr_t2": (2, 2, 3, 3), "lokr_w2_a": (2, 5), "lokr_w2_b": (2, 5)},
    ),
    ("Conv1dBigger", {"target_modules": ["conv1d"], "r": 2, "use_effective_conv2d": True}, {"lokr_t2": (2, 2, 2, 1)}),
    ("Conv1dGroups", {"target_modules": ["conv1d"], "r": 4}, {"lokr_w1": (2, 2), "lokr_w2": (4, 2, 3)}),
    ("Conv2d1x1", {"target_modules": ["conv2d"], "r": 1, "use_effective_conv2d": True}, {"lokr_w2_b": (1, 1)}),
]


@pytest.mark.parametrize(("model_id", "options", "shapes"), SHAPES)
def test_factors_are_the_ones_peft_makes(model_id, options, shapes):
    model = deltatune.get_delta_model(maker(model_id)(), deltatune.LoKrConfig(**options))
    layer = next(m for m in model.modules() if isinstance(m, LoKrLayer))
    ours = {name: tuple(t.shape) for name, t in layer.factors("default").items()}
    peft_model = peft.get_peft_model(maker(model_id)(), peft.LoKrConfig(**options))
    theirs = {key.rsplit(".", 1)[-1]: tuple(t.shape) for key, t in peft.get_peft_model_state_dict(peft_model).items()}
    assert ours == theirs and shapes.items() <= ours.items()


@pytest.mark.parametrize("init", [True, "lycoris", "LyCORIS"])
def test_the_update_starts_at_zero_with_peft_s_zero_factor(init):
    config = deltatune.LoKrConfig(target_modules=["conv2d", "lin0"], r=2, init_weights=init)
    model = _seeded(lambda: deltatune.get_delta_model(maker("Conv2d")(), config))
    zero = {"lokr_w1"} if init is True else {"lokr_w2", "lokr_w2_b"}
    for layer in (m for m in model.modules() if isinstance(m, LoKrLayer)):
        assert torch.equal(layer.delta_weight("default"), torch.zeros_like(layer.base_layer.weight))
        for name, factor in layer.factors("default").items():
            assert bool((factor == 0).all()) == (name in zero), name
    peft_model = _seeded(lambda: peft.get_peft_model(maker("Conv2d")(), peft.LoKrConfig(**config.to_dict())))
    theirs = peft.get_peft_model_state_dict(peft_model)
    for name, tensor in model.adapter_state("default").items():
        key = "base_model.model." + name.removesuffix(".default")
        assert torch.equal(tensor, theirs[key]), key  # the same seeded draws, in the same order


def test_adapters_switch_delete_disable_and_unmerge(tmp_path):
    check_adapters_switch_delete_disable_and_unmerge(METHOD, tmp_path)


def test_layers_peft_cannot_adapt_are_refused_by_name():
    check_refuses_layers_peft_cannot_adapt(METHOD)


def test_config_has_peft_s_fields_and_defaults_both_ways(tmp_path):
    check_config_matches_peft(METHOD, tmp_path)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"r": -1}, "r=-1 must be a positive integer"),
        ({"decompose_factor": 0}, "decompose_factor=0 must be -1"),
        ({"decompose_both": 1}, "decompose_both=1 must be true or false"),
        ({"init_weights": "gaussian"}, "init_weights='gaussian' is unknown for LoKrConfig"),
        ({"rank_dropout_scale": "yes"}, "rank_dropout_scale='yes' must be true or false"),
    ],
)
def test_bad_values_are_refused_by_name(options, message):
    with pytest.raises(ConfigError, match=message):
        deltatune.LoKrConfig(**options)


def test_tiny_llama_trains_and_round_trips(tmp_path):
    check_tiny_llama_trains_and_round_trips(METHOD, tmp_path, lr=3e-2)


def test_train_defaults_adapt_every_linear_layer_at_a_larger_learning_rate():
    check_train_defaults(METHOD)
