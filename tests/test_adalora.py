"""AdaLoRA against peft 0.21.2 (the installed package is the oracle): its rows of peft's custom-model tests, both
file directions and merge, GPT-2's Conv1D, the adapter API, and the options refused by name.

Each adapter starts random (``init_lora_weights=False``) and is then perturbed as training would, so that E is
not zero and a wrong key, shape or scale shows in the outputs. The training loop (rank allocation and the
orthogonality regulariser) is checked in ``test_adalora_training.py``.
"""

from __future__ import annotations

import re

import peft
import pytest
import torch

import deltatune
from deltatune import DeltaModel
from deltatune.errors import ConfigError
from family_checks import merges_as_peft_does
from peft_models import EmbConv1D, example, maker
from quantised_models import quantised
from test_lora_conv import DIRECTIONS, MERGE_ATOL, assert_same_model, save_and_load
from tiny_models import _seeded, perturb_trainable, tiny_llama

pytestmark = [
    pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning"),
    pytest.mark.filterwarnings("ignore:Note that `r` is not used in AdaLora:UserWarning"),
]

# peft's AdaLoRA rows: name -> (model, AdaLoraConfig kwargs), init_lora_weights=False added by save_and_load.
ROWS: dict[str, tuple[str, dict]] = {
    "Vanilla MLP 1 AdaLoRA": ("MLP", {"target_modules": ["lin0"], "total_step": 1, "orth_reg_weight": 0}),
    "Vanilla MLP 2 AdaLoRA": ("MLP", {"target_modules": ["lin0", "lin1"], "total_step": 1}),
    "Conv2d 1 AdaLoRA": ("Conv2d", {"target_modules": ["conv2d"], "total_step": 1}),
    "Conv2d 2 AdaLoRA": ("Conv2d", {"target_modules": ["conv2d", "lin0"], "total_step": 1}),
}
# Beyond peft's rows: GPT-2's Conv1D (fan_in_fan_out) and the MLP with dropout, alpha and init_r changed.
EXTRA_ROWS: dict[str, tuple[str, dict]] = {
    "EmbConv1D AdaLoRA": ("EmbConv1D", {"target_modules": ["conv1d"], "total_step": 1}),
    "Vanilla MLP AdaLoRA options": (
        "MLP",
        {"target_modules": ["lin0", "lin1"], "total_step": 4, "init_r": 5, "lora_alpha": 3, "lora_dropout": 0.1},
    ),
}
RANDOM = {"init_lora_weights": False}
# With peft's random factors (N(0, 1) A, E, B) the rows' log-probabilities are ~1e2 in size, so a merged weight's
# float32 rounding moves them by ~1e-6 relative (2e-4 absolute): merges are compared to 1e-4 or 1e-5 relative.
MERGE_RTOL = 1e-5


def test_the_table_holds_all_of_peft_0_21_2_adalora_rows():
    assert len(ROWS) == 4
    assert peft.__version__ == "0.21.2"


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("row", [*ROWS, *EXTRA_ROWS])
def test_row_matches_peft_both_ways_and_merges_as_peft_does(row, direction, tmp_path):
    model_id, options = {**ROWS, **EXTRA_ROWS}[row]
    make, x = maker(model_id), example(model_id)
    peft_side, delta_side = save_and_load(make, options, direction, tmp_path, method="AdaLoraConfig")
    assert_same_model(peft_side, delta_side, make, (x,))
    merges_as_peft_does(peft_side, delta_side, x, atol=MERGE_ATOL, rtol=MERGE_RTOL)


def random_model(model_id: str = "MLP", **options) -> DeltaModel:
    config = deltatune.AdaLoraConfig(**{"target_modules": ["lin0", "lin1"], **options}, **RANDOM)
    model = _seeded(lambda: deltatune.get_delta_model(maker(model_id)(), config))
    perturb_trainable(model)
    return model


def test_merge_then_unmerge_restores_the_base_and_merge_and_unload_keeps_the_output():
    model, x = random_model(), example("MLP")
    base = {name: t.clone() for name, t in model.base_model.state_dict().items() if ".lora_" not in name}
    with torch.no_grad():
        adapted = model(x)
        model.merge_adapter()
        assert (model.base_model.lin0.base_layer.weight - base["lin0.base_layer.weight"]).abs().max() > 1e-3
        model.unmerge_adapter()
        for name, tensor in model.base_model.state_dict().items():
            if name in base:
                torch.testing.assert_close(tensor, base[name], atol=1e-6, rtol=0, msg=name)
        plain = model.merge_and_unload()
        assert type(plain.lin0) is torch.nn.Linear
        torch.testing.assert_close(plain(x), adapted, atol=MERGE_ATOL, rtol=MERGE_RTOL)


def test_second_adapter_switching_deleting_and_disabling():
    model, x = random_model(), example("MLP")
    with torch.no_grad():
        base = maker("MLP")()(x)
        first = model(x)
        model.add_adapter("other", deltatune.AdaLoraConfig(target_modules=["lin1"], init_r=3, **RANDOM))
        assert model(x).equal(first)  # a new adapter is not active
        model.set_adapter("other")
        second = model(x)
        assert (second - first).abs().max() > 1e-3 and (second - base).abs().max() > 1e-3
        with model.disable_adapter():
            torch.testing.assert_close(model(x), base, atol=0, rtol=0)
        model.set_adapter(["default", "other"])
        both = model(x)
        assert (both - first).abs().max() > 1e-3
        model.delete_adapter("other")
        assert model.active_adapters == ["default"]
        assert model(x).equal(first)
        assert "other" not in model.base_model.lin1.lora_A


def test_init_starts_at_the_base_model_with_zero_singular_values():
    config = deltatune.AdaLoraConfig(target_modules=["lin0", "lin1"], init_r=6)
    model = _seeded(lambda: deltatune.get_delta_model(maker("MLP")(), config))
    x = example("MLP")
    with torch.no_grad():
        torch.testing.assert_close(model(x), maker("MLP")()(x), atol=0, rtol=0)
    layer = model.base_model.lin0
    assert layer.lora_E["default"].abs().max() == 0 and layer.lora_A["default"].shape == (6, 10)
    assert 0.01 < layer.lora_A["default"].std() < 0.03  # N(0, 0.02²), as peft
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == 6 * (10 + 1 + 20) + 6 * (20 + 1 + 2)


# -- refused by name -----------------------------------------------------------------------------------------

# Options peft accepts for AdaLoRA (and silently ignores) that deltatune refuses -> the name its refusal gives.
PEFT_SAVED_REFUSALS = {
    "use_rslora": {"use_rslora": True},
    "lora_bias": {"lora_bias": True},
    "alpha_pattern": {"alpha_pattern": {"lin0": 4}},
    "init_lora_weights": {"init_lora_weights": "gaussian"},
}


@pytest.mark.parametrize("name", sorted(PEFT_SAVED_REFUSALS))
def test_option_peft_ignores_is_refused_by_name_both_ways(name, tmp_path):
    options = {"target_modules": ["lin0"], "total_step": 1, **PEFT_SAVED_REFUSALS[name]}
    _seeded(lambda: peft.get_peft_model(maker("MLP")(), peft.AdaLoraConfig(**options))).save_pretrained(tmp_path)
    message = rf"^{re.escape(name)}=.* is not supported by deltatune"
    with pytest.raises(ConfigError, match=message):
        DeltaModel.from_pretrained(maker("MLP")(), tmp_path)
    with pytest.raises(ConfigError, match=message):
        deltatune.AdaLoraConfig(**options)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"use_dora": True}, "use_dora=True is not supported by deltatune's AdaLoRA: AdaLoRA has no DoRA"),
        ({"loftq_config": {"loftq_bits": 4}}, "loftq_config=.* is not supported by deltatune"),
        ({"trainable_token_indices": [1, 2]}, "trainable_token_indices=.* is not supported"),
        ({"target_parameters": ["lin0.weight"]}, "target_parameters=.* is not supported"),
        ({"beta1": 1.0}, "beta1=1.0 must be a number in \\(0, 1\\)"),
        ({"orth_reg_weight": -1}, "orth_reg_weight=-1 must be a positive"),
        ({"tinit": 5, "total_step": 5}, "leave no budgeting phase"),
        ({"rank_pattern": {"lin0": [True]}}, "must be a module name followed by '.lora_E'"),
    ],
)
def test_bad_or_unbuilt_fields_are_refused_by_name(options, message):
    with pytest.raises(ConfigError, match=message):
        deltatune.AdaLoraConfig(target_modules=["lin0"], **options)


@pytest.mark.parametrize(
    ("model_id", "target", "message"),
    [
        ("EmbConv1D", "emb", "AdaLoRA adapts nn.Linear, Conv1D and nn.Conv2d .as in peft., not Embedding emb"),
        ("Conv1d", "conv1d", "not Conv1d conv1d"),
        ("Conv2dGroups", "conv2d", "cannot adapt the grouped convolution conv2d .groups=8."),
        ("MHA", "mha", "not MultiheadAttention mha"),
    ],
)
def test_layers_peft_cannot_adapt_are_refused_and_leave_the_model_alone(model_id, target, message):
    model = maker(model_id)()
    before = {name: type(module) for name, module in model.named_modules()}
    with pytest.raises(ConfigError, match=message):
        deltatune.get_delta_model(model, deltatune.AdaLoraConfig(target_modules=[target]))
    assert {name: type(module) for name, module in model.named_modules()} == before


def test_peft_refuses_the_same_layers():
    """The refusals above are peft's own: its AdaLoRA raises on an embedding (and on Conv1d)."""
    with pytest.raises(ValueError, match="only `torch.nn.Linear`, `Conv1D`, and `torch.nn.Conv2d`"):
        peft.get_peft_model(EmbConv1D(), peft.AdaLoraConfig(target_modules=["emb"], total_step=1))


def test_adapter_config_round_trips_with_peft_field_names(tmp_path):
    model = random_model(total_step=7, tinit=1, tfinal=2, deltaT=2, beta1=0.5, target_r=3, init_r=6)
    model.save_pretrained(tmp_path)
    saved = peft.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(saved, peft.AdaLoraConfig)
    assert (saved.total_step, saved.tinit, saved.tfinal, saved.deltaT, saved.beta1, saved.target_r, saved.init_r) == (
        7,
        1,
        2,
        2,
        0.5,
        3,
        6,
    )
    assert saved.rank_pattern is None


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_a_quantised_base_is_refused_by_name(mode, tmp_path):
    """peft has bitsandbytes AdaLoRA layers; deltatune does not build them and says so."""
    tiny_llama().save_pretrained(tmp_path)
    model = quantised(tmp_path, mode)
    with pytest.raises(ConfigError, match="AdaLoRA over a quantised base .* is not built in deltatune"):
        deltatune.get_delta_model(model, deltatune.AdaLoraConfig(target_modules=["q_proj"]))


def test_deltatune_train_defaults_leave_total_step_to_the_run():
    from deltatune.train.config import TrainConfig
    from deltatune.train.methods import build_config

    config = build_config("adalora", {"tinit": 3}, "CAUSAL_LM", None)
    assert isinstance(config, deltatune.AdaLoraConfig)
    assert (config.init_r, config.target_r, config.lora_alpha, config.target_modules) == (12, 8, 32, "all-linear")
    assert config.total_step is None and config.tinit == 3
    assert TrainConfig.from_dict({"method": "adalora"}).learning_rate == 1e-2
