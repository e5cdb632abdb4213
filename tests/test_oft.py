"""OFT against peft 0.21.2 (the installed package is the oracle): its own rows, its maths, its files.

peft's 17 OFT rows (``tests/test_custom_models.py``) run both file directions (same tensors under the same
keys, same outputs and gradients) and merge (merged = unmerged = peft's merged output, 1e-4). Two Conv2d rows
use COFT with peft's default eps, whose rotation moves the output by ~1e-5 only: they are compared in float64,
where that is far above the noise. The rotation's pieces (Cayley transform, Neumann series, COFT projection,
block-size rule) are checked against peft's own functions; the rest covers what the rows do not: several
adapters, dropout, unmerge, refusals, the config and its files.
"""

from __future__ import annotations

import dataclasses
import json

import peft
import pytest
import torch
from peft.tuners.oft.layer import OFTLayer as PeftOFTLayer
from peft.tuners.oft.layer import OFTRotationModule
from torch import nn

import deltatune
from deltatune import ConfigError, DeltaConfig, DeltaModel, OFTConfig, TargetError
from deltatune.tuners.oft.layer import OFTLayer
from deltatune.tuners.oft.rotation import (
    cayley,
    cayley_neumann,
    constrained,
    rotate,
    skew_symmetric,
    unrotate,
)
from deltatune.tuners.oft.tuner import nearest_divisor
from family_checks import merges_as_peft_does
from peft_models import example, maker
from test_lora_conv import DIRECTIONS, MERGE_ATOL, assert_same_model, save_and_load
from test_peft_parity import delta_trainable, peft_trainable
from tiny_models import _seeded, perturb_trainable, tiny_llama, token_inputs

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not divide.*:UserWarning"),
    pytest.mark.filterwarnings("ignore:Invalid `(r|oft_block_size)`:UserWarning"),
]

RANDOM = {"init_weights": False}  # a random rotation: the adapter changes the output at once


# -- peft's OFT rows: name -> (model, OFTConfig kwargs) -----------------------------------------------

ROWS: dict[str, tuple[str, dict]] = {
    "Vanilla MLP 1 OFT": ("MLP", dict(r=2, oft_block_size=0, target_modules="lin0", use_cayley_neumann=False)),
    "Vanilla MLP 2 OFT": ("MLP", dict(r=2, oft_block_size=0, target_modules=["lin0"], use_cayley_neumann=False)),
    "Vanilla MLP 5 OFT": (
        "MLP",
        dict(r=2, oft_block_size=0, target_modules=["lin0"], modules_to_save=["lin1"], use_cayley_neumann=False),
    ),
    "Vanilla MLP 6 OFT": (
        "MLP",
        dict(r=2, oft_block_size=0, target_modules=["lin0"], module_dropout=0.1, use_cayley_neumann=False),
    ),
    "Vanilla MLP 7 OFT": ("MLP", dict(r=2, oft_block_size=0, target_modules=["lin0"], coft=True, eps=1e-2)),
    "Vanilla MLP 8 OFT": (
        "MLP",
        dict(r=2, oft_block_size=0, target_modules=["lin0"], block_share=True, use_cayley_neumann=False),
    ),
    "Vanilla MLP 9 OFT": (
        "MLP",
        dict(r=2, oft_block_size=0, target_modules=["lin0"], coft=True, eps=1e-2, block_share=True),
    ),
    "Vanilla MLP 10 OFT": ("MLP", dict(r=0, oft_block_size=2, target_modules=["lin0"], use_cayley_neumann=True)),
    "Vanilla MLP 11 OFT": ("MLP", dict(r=0, oft_block_size=2, target_modules=["lin0"], use_cayley_neumann=False)),
    "Vanilla MLP 12 OFT": (
        "MLP",
        dict(r=0, oft_block_size=2, target_modules=["lin0"], coft=True, eps=1e-2, block_share=True),
    ),
    "Vanilla MLP 13 OFT": (
        "MLP",
        dict(
            r=0,
            oft_block_size=2,
            target_modules=["lin0"],
            coft=True,
            eps=1e-2,
            block_share=True,
            use_cayley_neumann=False,
        ),
    ),
    "Embedding + transformers Conv1D 1 OFT": ("EmbConv1D", dict(r=1, oft_block_size=0, target_modules=["emb"])),
    "Embedding + transformers Conv1D 2 OFT": (
        "EmbConv1D",
        dict(r=1, oft_block_size=0, target_modules=["emb"], block_share=True),
    ),
    "Conv2d 1 OFT": ("Conv2d", dict(r=5, oft_block_size=0, target_modules=["conv2d"])),
    "Conv2d 3 OFT": ("Conv2d", dict(r=5, oft_block_size=0, target_modules=["conv2d"], coft=True)),
    "Conv2d 4 OFT": ("Conv2d", dict(r=5, oft_block_size=0, target_modules=["conv2d"], block_share=True)),
    "Conv2d 5 OFT": ("Conv2d", dict(r=5, oft_block_size=0, target_modules=["conv2d"], coft=True, block_share=True)),
}
# COFT at peft's default eps (6e-5) moves these outputs by ~1e-5 to 1e-4: compared in float64.
SMALL_EFFECT = {"Conv2d 3 OFT", "Conv2d 5 OFT"}
# peft's rows deltatune refuses (none: every OFT row runs).
REFUSED: dict[str, str] = {}


def test_the_table_holds_all_of_peft_0_21_2_oft_rows():
    assert (len(ROWS), len(SMALL_EFFECT), len(REFUSED)) == (17, 2, 0)
    assert peft.__version__ == "0.21.2"


def assert_same_model_in_float64(peft_side: nn.Module, delta_side: DeltaModel, make, x: torch.Tensor) -> None:
    """``assert_same_model`` in float64: same tensors, outputs within 1e-10, gradients within 1e-9, the adapter
    moving the output by more than 1e-6."""
    peft_side.double(), delta_side.double()
    x = x.double()
    p_params, d_params = peft_trainable(peft_side, "default"), delta_trainable(delta_side, "default")
    assert sorted(d_params) == sorted(p_params)
    for key, param in p_params.items():
        torch.testing.assert_close(d_params[key], param, atol=0, rtol=0, msg=f"{key} differs")
    with torch.no_grad():
        base = make().double()(x)
    p_out, d_out = peft_side(x), delta_side(x)
    assert (p_out - base).abs().max() > 1e-6, "the adapter does not change the output; the comparison is void"
    torch.testing.assert_close(d_out, p_out, atol=1e-10, rtol=0)
    p_out.square().mean().backward()
    d_out.square().mean().backward()
    for key, param in p_params.items():
        torch.testing.assert_close(d_params[key].grad, param.grad, atol=1e-9, rtol=1e-7, msg=f"gradient of {key}")
        assert param.grad.abs().max() > 0


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("row", list(ROWS))
def test_row_matches_peft_both_ways_and_merges_as_peft_does(row, direction, tmp_path):
    model_id, options = ROWS[row]
    make, x = maker(model_id), example(model_id)
    peft_side, delta_side = save_and_load(make, options, direction, tmp_path, method="OFTConfig", random_init=RANDOM)
    if row in SMALL_EFFECT:
        assert_same_model_in_float64(peft_side, delta_side, make, x)
        x, atol = x.double(), 1e-10
    else:
        assert_same_model(peft_side, delta_side, make, (x,))
        atol = MERGE_ATOL
    merges_as_peft_does(peft_side, delta_side, x, atol=atol)


# -- the rotation's pieces against peft's own functions ----------------------------------------------


def peft_rotation(blocks: int, block_size: int, **options) -> OFTRotationModule:
    return OFTRotationModule(blocks, block_size * (block_size - 1) // 2, block_size, blocks * block_size, **options)


@pytest.mark.parametrize("terms", [None, 1, 2, 3, 4, 5, 8])
def test_cayley_and_its_neumann_series_are_peft_s(terms):
    packed = 0.2 * torch.randn(3, 6 * 5 // 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    module = peft_rotation(3, 6, use_cayley_neumann=terms is not None, num_cayley_neumann_terms=terms or 5)
    expected = module._cayley_batch(packed, 6, terms is not None, terms or 5)
    skew = skew_symmetric(packed, 6)
    assert torch.equal(skew, module._pytorch_skew_symmetric(packed, 6))
    ours = cayley(skew) if terms is None else cayley_neumann(skew, terms)
    torch.testing.assert_close(ours, expected, atol=1e-12, rtol=0)


def test_exact_cayley_is_orthogonal_and_the_long_neumann_series_is_its_transpose():
    skew = skew_symmetric(0.05 * torch.randn(4, 10, dtype=torch.float64), 5)
    exact = cayley(skew)
    eye = torch.eye(5, dtype=torch.float64).expand(4, 5, 5)
    torch.testing.assert_close(exact @ exact.transpose(-2, -1), eye, atol=1e-12, rtol=0)
    torch.testing.assert_close(cayley_neumann(skew, 40), exact.transpose(-2, -1), atol=1e-12, rtol=0)


@pytest.mark.parametrize("block_share", [False, True])
def test_coft_projection_is_peft_s(block_share):
    """Within 1e-7 relative: peft takes the radius eps / sqrt(D) in float32."""
    blocks = 1 if block_share else 4
    packed = torch.randn(blocks, 10, dtype=torch.float64) * torch.tensor([[1e-4], [1.0], [1e-6], [3.0]])[:blocks]
    module = peft_rotation(blocks, 5, coft=True, eps=1e-3)
    torch.testing.assert_close(constrained(packed, 5, 1e-3), module._project_batch(packed, eps=1e-3), atol=0, rtol=1e-7)


@pytest.mark.parametrize("transpose", [False, True])
def test_unrotate_inverts_rotate_for_a_nearly_orthogonal_neumann_rotation(transpose):
    blocks = cayley_neumann(skew_symmetric(0.3 * torch.randn(3, 6, dtype=torch.float64), 4), 3)
    assert (blocks @ blocks.transpose(-2, -1) - torch.eye(4, dtype=torch.float64)).abs().max() > 1e-3
    matrix = torch.randn(7, 12, dtype=torch.float64)
    torch.testing.assert_close(unrotate(rotate(matrix, blocks, transpose), blocks, transpose), matrix)


def test_block_sizes_that_do_not_divide_move_to_peft_s_divisor():
    for width in range(1, 41):
        for wanted in range(1, 45):
            if width % wanted or wanted > width:
                assert nearest_divisor(width, wanted) == PeftOFTLayer.adjust_oft_parameters(None, width, wanted)


@pytest.mark.parametrize("options", [{"oft_block_size": 3}, {"oft_block_size": 32}, {"r": 3, "oft_block_size": 0}])
def test_an_adjusted_block_size_gives_peft_s_shapes_and_warns(options):
    make = maker("MLP")
    peft_model = peft.get_peft_model(make(), peft.OFTConfig(target_modules=["lin0", "lin1"], **options))
    with pytest.warns(UserWarning, match="does not divide"):
        delta = deltatune.get_delta_model(make(), OFTConfig(target_modules=["lin0", "lin1"], **options))
    shapes = {key: tuple(p.shape) for key, p in peft_trainable(peft_model, "default").items()}
    assert shapes == {key: tuple(p.shape) for key, p in delta_trainable(delta, "default").items()}


# -- several adapters, dropout, unmerge ----------------------------------------------------------------

TWO_ADAPTERS = {  # peft's multiple-adapter rows for OFT: (first, second)
    "OFT Same": ({"target_modules": ["lin0"]}, {"target_modules": ["lin0"]}),
    "OFT Different": ({"target_modules": ["lin0"]}, {"target_modules": ["lin1"]}),
}


@pytest.mark.parametrize("row", list(TWO_ADAPTERS))
def test_two_adapters_switch_combine_delete_and_disable_as_in_peft(row, tmp_path):
    make, x = maker("MLP"), example("MLP")
    first, second = ({**options, "init_weights": False, "oft_block_size": 2} for options in TWO_ADAPTERS[row])
    peft_model = _seeded(lambda: peft.get_peft_model(make(), peft.OFTConfig(**first)))
    peft_model.add_adapter("other", peft.OFTConfig(**second))
    peft_model.save_pretrained(tmp_path)
    delta = DeltaModel.from_pretrained(make(), tmp_path)
    delta.load_adapter(tmp_path / "other", "other")
    with torch.no_grad():
        base = make()(x)
        for active in ("default", "other", ["default", "other"]):
            peft_model.base_model.set_adapter(active)
            delta.set_adapter(active)
            torch.testing.assert_close(delta(x), peft_model(x), atol=1e-5, rtol=0)
            assert (delta(x) - base).abs().max() > 1e-3
        combined = delta(x)
        with delta.disable_adapter():
            torch.testing.assert_close(delta(x), base, atol=0, rtol=0)
        delta.merge_adapter()
        torch.testing.assert_close(delta(x), combined, atol=MERGE_ATOL, rtol=0)
        delta.unmerge_adapter()
        delta.delete_adapter("other")
        peft_model.base_model.set_adapter("default")
        torch.testing.assert_close(delta(x), peft_model(x), atol=1e-5, rtol=0)
    assert delta.active_adapters == ["default"] and "other" not in delta.peft_config


@pytest.mark.parametrize("model_id, target", [("MLP", "lin0"), ("Conv2d", "conv2d"), ("EmbConv1D", "emb")])
def test_two_active_adapters_on_one_layer_rotate_in_turn_and_merge_to_the_same(model_id, target):
    """Blocks of 5 (rotations of 5 dimensions do not commute, unlike peft's rows' blocks of 2): x R_1 R_2 as in
    peft's forward, and merging both folds them in the order that computes it."""
    make, x = maker(model_id), example(model_id)
    options = {"r": 1, "oft_block_size": 0, "target_modules": [target], "use_cayley_neumann": False, **RANDOM}
    peft_model = _seeded(lambda: peft.get_peft_model(make(), peft.OFTConfig(**options)))
    peft_model.add_adapter("other", peft.OFTConfig(**options))
    delta = deltatune.get_delta_model(make(), OFTConfig(**options))
    delta.add_adapter("other", OFTConfig(**options))
    state = {k.removeprefix("base_model.model."): v for k, v in peft_model.state_dict().items() if "oft_" in k}
    assert len(state) == 2
    delta.base_model.load_state_dict(state, strict=False)  # the same two rotations in both
    peft_model.base_model.set_adapter(["default", "other"])
    delta.set_adapter(["default", "other"])
    with torch.no_grad():
        combined = delta(x)
        torch.testing.assert_close(combined, peft_model(x), atol=1e-5, rtol=0)
        delta.set_adapter(["other", "default"])
        assert (delta(x) - combined).abs().max() > 1e-3  # the order matters
        delta.set_adapter(["default", "other"])
        delta.merge_adapter()
        torch.testing.assert_close(delta(x), combined, atol=MERGE_ATOL, rtol=0)


@pytest.mark.parametrize("neumann", [False, True])
@pytest.mark.parametrize("model_id, target", [("MLP", "lin0"), ("Conv2d", "conv2d"), ("EmbConv1D", "emb")])
def test_merge_then_unmerge_restores_the_base_weights(model_id, target, neumann):
    make, x = maker(model_id), example(model_id)
    config = OFTConfig(r=1, oft_block_size=0, target_modules=[target], use_cayley_neumann=neumann, **RANDOM)
    delta = deltatune.get_delta_model(make(), config)
    perturb_trainable(delta)
    weights = {name: t.clone() for name, t in delta.base_model.state_dict().items() if "oft_" not in name}
    with torch.no_grad():
        unmerged = delta(x)
        delta.merge_adapter()
        assert delta.merged_adapters == ["default"]
        torch.testing.assert_close(delta(x), unmerged, atol=MERGE_ATOL, rtol=0)
        delta.unmerge_adapter()
    for name, tensor in delta.base_model.state_dict().items():
        if "oft_" not in name:
            torch.testing.assert_close(tensor, weights[name], atol=1e-5, rtol=0, msg=name)


def test_module_dropout_makes_some_blocks_the_identity_while_training_only():
    make, x = maker("MLP"), example("MLP")
    config = OFTConfig(r=0, oft_block_size=2, target_modules=["lin0"], module_dropout=0.4, **RANDOM)
    delta = deltatune.get_delta_model(make(), config)
    rotation = delta.base_model.lin0.oft_R["default"]
    eye = torch.eye(2)
    identities = [int(torch.equal(block, eye)) for block in rotation.matrices(dropout=True)]
    assert sum(identities) == 2  # int(0.4 * 5) of the 5 blocks
    assert not any(torch.equal(block, eye) for block in rotation.matrices())
    with torch.no_grad():
        evaluated = delta(x)
        torch.testing.assert_close(delta(x), evaluated, atol=0, rtol=0)
        delta.train()
        torch.manual_seed(0)
        trained = [delta(x) for _ in range(4)]
    assert any((out - evaluated).abs().max() > 1e-4 for out in trained)


# -- Conv2d with overlapping patches: the convolution with the rotated kernel --------------------------


class PaddedConv(nn.Module):
    """conv: 4 → 6 channels, 3x3, padding 1, on [2, 4, 6, 6] images: every input pixel is in several patches."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_conv2d_with_overlapping_patches_runs_as_peft_s_merged_layer(tmp_path):
    make = lambda: _seeded(PaddedConv)  # noqa: E731
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = make()(x)
        at_start = deltatune.get_delta_model(make(), OFTConfig(oft_block_size=4, target_modules=["conv"]))
        torch.testing.assert_close(at_start(x), base, atol=0, rtol=0)  # R = I: the base convolution
    config = OFTConfig(oft_block_size=4, target_modules=["conv"], **RANDOM)
    delta = _seeded(lambda: deltatune.get_delta_model(make(), config))
    delta.save_pretrained(tmp_path)
    peft_model = peft.PeftModel.from_pretrained(make(), tmp_path)
    with torch.no_grad():
        output = delta(x)
        assert (output - base).abs().max() > 1e-2
        assert (peft_model(x) - output).abs().max() > 1e-1  # peft sums overlapping patches before its convolution
        peft_model.merge_adapter()
        torch.testing.assert_close(output, peft_model(x), atol=1e-5, rtol=0)


# -- what OFT does not wrap, and the bias ---------------------------------------------------------------

UNWRAPPED = {  # model, target -> the words deltatune's refusal names
    "transformers Conv1D": ("EmbConv1D", "conv1d", "is a Conv1D; OFT adapts nn.Linear, nn.Conv2d and nn.Embedding"),
    "nn.Conv1d": ("Conv1d", "conv1d", "is a Conv1d; OFT adapts"),
    "nn.Conv3d": ("Conv3d", "conv3d", "is a Conv3d; OFT adapts"),
    "grouped Conv2d": ("Conv2dGroups", "conv2d", "grouped Conv2d"),
}


@pytest.mark.parametrize("kind", list(UNWRAPPED))
def test_a_layer_peft_s_oft_does_not_wrap_is_refused_by_name(kind):
    model_id, target, message = UNWRAPPED[kind]
    make = maker(model_id)
    with pytest.raises(TargetError, match=message):
        deltatune.get_delta_model(make(), OFTConfig(r=1, oft_block_size=0, target_modules=[target]))
    if kind != "grouped Conv2d":  # peft wraps a grouped Conv2d but cannot merge it
        with pytest.raises(TypeError, match="is not supported"):
            peft.get_peft_model(make(), peft.OFTConfig(r=1, oft_block_size=0, target_modules=[target]))


def test_a_dilated_conv2d_is_refused_as_in_peft():
    model = nn.Sequential(nn.Conv2d(2, 2, 3, dilation=2))
    with pytest.raises(TargetError, match="dilation"):
        deltatune.get_delta_model(model, OFTConfig(r=1, oft_block_size=0, target_modules=["0"]))


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_oft_only_bias_trains_and_saves_the_adapted_layers_bias_as_peft_does(direction, tmp_path):
    make, x = maker("MLP"), example("MLP")
    options = {"r": 2, "oft_block_size": 0, "target_modules": ["lin0"], "bias": "oft_only"}
    peft_side, delta_side = save_and_load(make, options, direction, tmp_path, method="OFTConfig", random_init=RANDOM)
    assert "base_model.model.lin0.base_layer.bias" in delta_trainable(delta_side, "default")
    assert_same_model(peft_side, delta_side, make, (x,))


# -- the config and its file ----------------------------------------------------------------------------


def test_the_config_has_peft_s_fields_and_defaults():
    peft_fields = {f.name: f for f in dataclasses.fields(peft.OFTConfig) if f.init}
    ours = {f.name: f for f in dataclasses.fields(OFTConfig)}
    assert set(peft_fields) - set(ours) == {"peft_type", "auto_mapping", "peft_version"}
    assert set(ours) <= set(peft_fields)
    for name, field in ours.items():
        assert field.default == peft_fields[name].default, name
    assert (OFTConfig().r, OFTConfig().oft_block_size) == (0, 32)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"r": 4}, r"^r=4 and oft_block_size=32 are both set"),
        ({"oft_block_size": 0}, r"^r=0 and oft_block_size=0: set one of them"),
        ({"oft_block_size": -2}, r"^oft_block_size=-2 must be a positive integer"),
        ({"bias": "lora_only"}, r"^bias='lora_only' is unknown"),
        ({"layers_pattern": "layers"}, r"^layers_pattern is only used with layers_to_transform"),
        ({"module_dropout": 1.0}, r"^module_dropout=1.0 must be a number in \[0, 1\)"),
        ({"num_cayley_neumann_terms": 0}, r"^num_cayley_neumann_terms=0 must be a positive integer"),
    ],
)
def test_a_bad_config_is_one_line_naming_the_field(options, message):
    with pytest.raises(ConfigError, match=message) as error:
        OFTConfig(**options)
    assert "\n" not in str(error.value)


def test_the_config_file_reads_the_same_in_both_libraries(tmp_path):
    options = {"r": 4, "oft_block_size": 0, "target_modules": ["q_proj"], "coft": True, "eps": 1e-3}
    peft.OFTConfig(**options).save_pretrained(str(tmp_path / "peft"))
    OFTConfig(**options).save(tmp_path)
    ours, theirs = DeltaConfig.from_pretrained(tmp_path / "peft"), peft.OFTConfig.from_pretrained(str(tmp_path))
    assert ours == OFTConfig(**options)
    for name in (f.name for f in dataclasses.fields(OFTConfig)):
        expected = getattr(ours, name)
        value = getattr(theirs, name)
        assert (sorted(value) if isinstance(value, set) else value) == expected, name


def test_a_file_from_before_peft_0_14_is_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "OFT", "r": 8, "target_modules": ["q"]}))
    with pytest.raises(ConfigError, match="saved by peft < 0.14"):
        DeltaConfig.from_pretrained(tmp_path)


# -- a real model --------------------------------------------------------------------------------------


def test_the_train_defaults_train_the_tiny_llama_and_round_trip_its_logits(tmp_path):
    config = OFTConfig(**OFTConfig.train_defaults, task_type="CAUSAL_LM")
    model = deltatune.get_delta_model(tiny_llama(), config)
    adapted = {name.rsplit(".", 1)[-1] for name, m in model.base_model.named_modules() if isinstance(m, OFTLayer)}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    batch = token_inputs(batch=4, length=12)
    batch["labels"] = batch["input_ids"]
    # the random tiny model's small weights move little under a rotation: a larger step than the real default
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    losses = []
    for _ in range(6):
        optimizer.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.05, losses
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = DeltaModel.from_pretrained(tiny_llama(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, atol=0, rtol=0)
