"""LoHa (``LoHaConfig``) against peft 0.21.2: its own rows (``tests/test_custom_models.py``) both ways and merged,
training-time dropout drawn as peft draws it, adapter switching, refusals, and the tiny Llama.

Every LoHa row peft has passes here; none is refused (deltatune builds every LoHaConfig field).
"""

from __future__ import annotations

import peft
import pytest
import torch

import deltatune
from deltatune.errors import ConfigError
from deltatune.tuners.lycoris.loha import LoHaLayer
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
    tucker_by_autograd,
)
from peft_models import example, maker
from test_lora_conv import DIRECTIONS
from tiny_models import _seeded

METHOD = "LoHaConfig"

# peft's LoHa rows: name -> (model, LoHaConfig kwargs)
ROWS: dict[str, tuple[str, dict]] = {
    "Vanilla MLP 1 LOHA": ("MLP", {"target_modules": "lin0"}),
    "Vanilla MLP 2 LOHA": ("MLP", {"target_modules": ["lin0"]}),
    "Vanilla MLP 3 LOHA": ("MLP", {"target_modules": ["lin1"]}),
    "Vanilla MLP 4 LOHA": ("MLP", {"target_modules": ["lin0", "lin1"]}),
    "Vanilla MLP 5 LOHA": ("MLP", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    "Vanilla MLP 6 LOHA": ("MLP", {"target_modules": ["lin0"], "alpha": 4, "module_dropout": 0.1}),
    "Vanilla MLP 7 LOHA": ("MLP", {"target_modules": "lin0", "rank_dropout": 0.5}),
    "Conv2d 1 LOHA": ("Conv2d", {"target_modules": ["conv2d"]}),
    "Conv2d 2 LOHA": ("Conv2d", {"target_modules": ["conv2d", "lin0"]}),
    "Conv2d 3 LOHA": ("Conv2d", {"target_modules": ["conv2d"], "use_effective_conv2d": True}),
    "Conv2d 4 LOHA": ("Conv2d", {"target_modules": ["conv2d", "lin0"], "use_effective_conv2d": True}),
    "Conv1d LOHA": ("Conv1d", {"target_modules": ["conv1d"]}),
    "Conv1d LOHA 1": ("Conv1d", {"target_modules": ["conv1d"]}),
    "Conv1d LOHA 2": ("Conv1d", {"target_modules": ["conv1d"], "r": 2}),
    "Conv1d Groups LOHA": ("Conv1dGroups", {"target_modules": ["conv1d"], "r": 4}),
    "Conv1d LOHA 3": ("Conv1dBigger", {"target_modules": ["conv1d"], "r": 2, "use_effective_conv2d": True}),
    "Conv1d LOHA 4": ("Conv1dBigger", {"target_modules": ["conv1d"], "r": 2, "use_effective_conv2d": False}),
    "Conv2d 1x1 LOHA": ("Conv2d1x1", {"target_modules": ["conv2d"]}),
    "Conv2d Groups LOHA": ("Conv2dGroups", {"target_modules": ["conv2d"]}),
    "Conv2d Groups2 LOHA": ("Conv2dGroups2", {"target_modules": ["conv2d"]}),
}
DROPOUT_ROWS = ["Vanilla MLP 6 LOHA", "Vanilla MLP 7 LOHA"]


def test_the_table_holds_all_of_peft_0_21_2_loha_rows():
    assert len(ROWS) == 20
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


def test_the_forward_is_one_op_with_the_summed_weight_where_that_keeps_the_arithmetic(tmp_path):
    check_one_op_forward(METHOD, tmp_path)


def test_module_dropout_one_gives_the_base_output_in_training():
    check_module_dropout_one_gives_the_base_in_training(METHOD, "lin0")


def test_rank_dropout_rescales_the_kept_rows():
    scale, kept, rows = check_rank_dropout_drops_rows_while_training(METHOD, {})
    assert scale == pytest.approx(rows / kept)


@pytest.mark.parametrize(
    ("model_id", "options", "shapes"),
    [
        ("MLP", {"target_modules": ["lin0"]}, {"hada_w1_a": (20, 8), "hada_w1_b": (8, 10)}),
        ("Conv2d", {"target_modules": ["conv2d"]}, {"hada_w2_a": (10, 8), "hada_w2_b": (8, 45)}),
        (
            "Conv2d",
            {"target_modules": ["conv2d"], "use_effective_conv2d": True},
            {"hada_t1": (8, 8, 3, 3), "hada_w1_a": (8, 10), "hada_w1_b": (8, 5)},
        ),
        (
            "Conv1dBigger",
            {"target_modules": ["conv1d"], "r": 2, "use_effective_conv2d": True},
            {"hada_t2": (2, 2, 2, 1)},
        ),
        ("Conv2d1x1", {"target_modules": ["conv2d"], "use_effective_conv2d": True}, {"hada_w1_b": (8, 1)}),
    ],
)
def test_factor_shapes_are_peft_s_and_the_update_starts_at_zero(model_id, options, shapes):
    model = deltatune.get_delta_model(maker(model_id)(), deltatune.LoHaConfig(**options))
    layer = next(m for m in model.modules() if isinstance(m, LoHaLayer))
    factors = layer.factors("default")
    assert {name: tuple(factors[name].shape) for name in shapes} == shapes
    assert ("hada_t1" in factors) == ("hada_t1" in shapes or "hada_t2" in shapes)
    assert torch.equal(layer.delta_weight("default"), torch.zeros_like(layer.base_layer.weight))


def test_adapters_switch_delete_disable_and_unmerge(tmp_path):
    check_adapters_switch_delete_disable_and_unmerge(METHOD, tmp_path)


def test_layers_peft_cannot_adapt_are_refused_by_name():
    check_refuses_layers_peft_cannot_adapt(METHOD)


def test_config_has_peft_s_fields_and_defaults_both_ways(tmp_path):
    check_config_matches_peft(METHOD, tmp_path)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"r": 0}, "r=0 must be a positive integer"),
        ({"rank_dropout": 1.0}, "rank_dropout=1.0 must be a number in"),
        ({"module_dropout": 1.5}, "module_dropout=1.5 must be a number in"),
        ({"init_weights": "lycoris"}, "init_weights='lycoris' is unknown for LoHaConfig"),
        ({"alpha": float("nan")}, "alpha=nan must be a finite number"),
        ({"layers_pattern": "layers"}, "layers_pattern is only used with layers_to_transform"),
    ],
)
def test_bad_values_are_refused_by_name(options, message):
    with pytest.raises(ConfigError, match=message):
        deltatune.LoHaConfig(**options)


def test_tiny_llama_trains_and_round_trips(tmp_path):
    check_tiny_llama_trains_and_round_trips(METHOD, tmp_path, lr=3e-2)


def test_peft_s_tucker_backward_differs_from_autograd_for_the_output_factors():
    """Pinned: peft 0.21.2's ``HadaWeightCP.backward`` mixes up the two products for ``hada_w1_a``/``hada_w2_a``
    (its other gradients and its forward are right); deltatune's gradients are torch's own."""
    from peft.tuners.loha.layer import make_weight_cp

    generator = torch.Generator().manual_seed(0)
    shapes = [(3, 3, 2, 2), (3, 4), (3, 5)] * 2
    factors = [torch.randn(s, generator=generator, dtype=torch.float64, requires_grad=True) for s in shapes]
    upstream = torch.randn(4, 5, 2, 2, generator=generator, dtype=torch.float64)
    grads = []
    for build in (make_weight_cp, lambda *f, scale: tucker_by_autograd(*f[:3]) * tucker_by_autograd(*f[3:]) * scale):
        weight = build(*factors, scale=torch.tensor(1.5, dtype=torch.float64))
        grads.append(torch.autograd.grad((weight * upstream).sum(), factors))
        forward = weight.detach()
    torch.testing.assert_close(forward, weight.detach())
    for name, peft_grad, torch_grad in zip(("t1", "w1a", "w1b", "t2", "w2a", "w2b"), *grads):
        assert torch.allclose(peft_grad, torch_grad) == (name not in ("w1a", "w2a")), name


def test_train_defaults_adapt_every_linear_layer_at_a_larger_learning_rate():
    check_train_defaults(METHOD)


def test_a_padding_mode_other_than_zeros_pads_the_update_as_the_base_does():
    """Unlike peft (which zero-pads the update's input), the forward is the merged convolution's."""
    for conv in (
        torch.nn.Conv1d(3, 4, 3, padding=1, padding_mode="reflect"),
        torch.nn.Conv2d(3, 4, (3, 2), padding=(1, 2), padding_mode="circular"),
    ):
        model = _seeded(
            lambda conv=conv: deltatune.get_delta_model(
                torch.nn.Sequential(conv), deltatune.LoHaConfig(target_modules=["0"], r=2, init_weights=False)
            )
        )
        x = torch.randn((2, 3) + (5,) * (conv.weight.dim() - 2), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            unmerged = model(x)
            assert (unmerged - model.base_model[0].base_layer(x)).abs().max() > 1e-3
            model.merge_adapter()
            torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=0)


def test_a_half_precision_base_keeps_fp32_factors_and_its_own_output_dtype():
    model = deltatune.get_delta_model(maker("MLP")().to(torch.bfloat16), deltatune.LoHaConfig(target_modules=["lin0"]))
    assert all(p.dtype == torch.float32 for p in model.adapter_state("default").values())
    assert model(example("MLP").to(torch.bfloat16)).dtype == torch.bfloat16


def test_the_hadamard_kernel_keeps_only_the_factors_and_gives_autograds_gradients():
    from deltatune.kernels.loha_weight import hadamard_of_products

    g = torch.Generator().manual_seed(0)
    factors = [torch.randn(shape, generator=g, dtype=torch.float64) for shape in ((7, 3), (3, 5), (7, 3), (3, 5))]
    ours = [f.clone().requires_grad_() for f in factors]
    plain = [f.clone().requires_grad_() for f in factors]
    weights = torch.randn(7, 5, generator=g, dtype=torch.float64)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        result = hadamard_of_products(*ours)
    assert sorted(saved) == sorted(f.shape for f in factors)  # no [out, in] product is kept
    torch.testing.assert_close(result, (plain[0] @ plain[1]) * (plain[2] @ plain[3]))
    (result * weights).sum().backward()
    ((plain[0] @ plain[1]) * (plain[2] @ plain[3]) * weights).sum().backward()
    for mine, reference in zip(ours, plain):
        torch.testing.assert_close(mine.grad, reference.grad)
