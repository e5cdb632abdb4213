"""Layers that read the same input run as one product on packed weights (``tuners/lora/joined.py``): the joined
output equals each module's own output side by side, for every way their adapters can differ (one adapter, a
mixed batch in order or gathered, adapters on some of the layers only, DoRA, a B bias, the adapters as set,
disabled), for a prompt's tokens and a decoding step's one; a group that cannot join is left to its modules."""

from __future__ import annotations

import pytest
import torch
import transformers

import deltatune
from deltatune.compat.transformers import projections
from deltatune.kernels.packed_linear import PackedWeights
from deltatune.tuners.lora.joined import JoinedProjections
from tiny_models import DECODER_SIZES

pytestmark = pytest.mark.skipif(not PackedWeights(torch.nn.Linear(1, 1))._available, reason="no oneDNN packing")


@pytest.fixture(scope="module")
def model():
    """A Llama whose attention projections have biases (the joined pack stacks them), with LoRA ``a`` on every
    linear layer, ``qv`` on q_proj and v_proj only (k_proj plain under it), DoRA ``dora``, ``biased`` with a B bias
    on the attention projections."""
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**DECODER_SIZES, attention_bias=True))
    with torch.no_grad():
        for name, param in base.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.1)  # they start at zero
    delta = deltatune.get_delta_model(base.eval(), deltatune.LoraConfig(r=4, target_modules="all-linear"), "a")
    delta.add_adapter("qv", deltatune.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    delta.add_adapter("dora", deltatune.LoraConfig(r=4, target_modules="all-linear", use_dora=True))
    delta.add_adapter(
        "biased", deltatune.LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"], lora_bias=True)
    )
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():  # every adapter's factors (B starts at zero; only the active adapter trains)
        for name, param in delta.named_parameters():
            if "lora_" in name:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return delta.eval()


ROWS = {
    "one adapter": ["a"] * 4,
    "one adapter, then base rows": ["a", "a", None, None],
    "one adapter among base rows": [None, "a", None, "a"],
    "two adapters in order": ["a", "a", "qv", "qv"],
    "gathered, with a base row": ["qv", None, "a", "qv"],
    "only adapters on some layers": ["qv"] * 4,
    "DoRA among them": ["dora", "a", None, "dora"],
    "a B bias": ["biased", "a", "biased", None],
}


def inputs(groups_of, rows, tokens, seed):
    """A random input [rows, tokens, in] for each group (the MLP's down_proj reads wider ones)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, tokens, group[0].in_features, generator=generator) for group in groups_of]


def joined_and_separate(model, groups_of, xs):
    """(the joined outputs, each module's outputs side by side) of every group, on its input of ``xs``."""
    packed = PackedWeights(model)
    project = JoinedProjections(groups_of, packed)
    with torch.no_grad(), packed.applied(project.groups):
        joined = [project(group, x) for group, x in zip(groups_of, xs)]
        separate = [torch.cat([module(x) for module in group], dim=-1) for group, x in zip(groups_of, xs)]
    return joined, separate, packed


@pytest.mark.parametrize("tokens", [1, 5], ids=["a decoding step", "a prompt"])
@pytest.mark.parametrize("rows", ROWS)
def test_a_joined_product_equals_its_modules_in_a_mixed_batch(model, rows, tokens):
    groups_of = projections(model.base_model)
    xs = inputs(groups_of, 4, tokens, seed=1)
    with model.adapter_rows(ROWS[rows]):
        joined, separate, packed = joined_and_separate(model, groups_of, xs)
    assert all(group in packed._packs for group in JoinedProjections(groups_of, packed).groups)
    for got, expected in zip(joined, separate):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not all(torch.allclose(got, plain) for got, plain in zip(joined, bases_alone(model, groups_of, xs)))


def bases_alone(model, groups_of, xs):
    """The groups' outputs with no adapter anywhere (so a joined output that dropped the adapters is seen)."""
    with torch.no_grad(), model.disable_adapter():
        return [torch.cat([module(x) for module in group], dim=-1) for group, x in zip(groups_of, xs)]


@pytest.mark.parametrize("active", [["a"], ["a", "qv"], ["dora"]])
def test_a_joined_product_equals_its_modules_with_the_adapters_as_set(model, active):
    """Without a mixed batch (GRPO's rollouts, ``generate``): every row runs the active adapters."""
    groups_of = projections(model.base_model)
    xs = inputs(groups_of, 3, 2, seed=2)
    model.set_adapter(active)
    try:
        joined, separate, _ = joined_and_separate(model, groups_of, xs)
    finally:
        model.set_adapter("a")
    for got, expected in zip(joined, separate):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_a_hooked_layer_leaves_its_group_to_its_modules_and_their_own_packs(model):
    groups_of = projections(model.base_model)
    q_proj = groups_of[0][0]
    handle = q_proj.register_forward_hook(lambda *args: None)
    try:
        packed = PackedWeights(model)
        project = JoinedProjections(groups_of, packed)
        with torch.no_grad(), packed.applied(project.groups):
            assert project(groups_of[0], torch.randn(2, 1, 32)) is None
            assert project(groups_of[1], torch.randn(2, 1, 32)) is not None
        assert groups_of[0] not in project.groups and q_proj.base_layer in packed._packs
    finally:
        handle.remove()


def test_a_joined_weight_over_the_piece_size_is_packed_in_row_blocks(model, monkeypatch):
    import deltatune.kernels.packed_linear as packed_linear

    monkeypatch.setattr(packed_linear, "PIECE_BYTES", 20 * 32 * 4)  # q, k, v: 32 + 16 + 16 rows in pieces of 20
    groups_of = projections(model.base_model)
    xs = inputs(groups_of, 4, 3, seed=4)
    with model.adapter_rows(ROWS["a B bias"]):
        joined, separate, packed = joined_and_separate(model, groups_of, xs)
    *_, rows, pieces = packed._packs[JoinedProjections(groups_of, packed).groups[0]][1].args
    assert rows == 20 and len(pieces) == 4  # partial(_joined_forward, layers, bias, rows, pieces)
    for got, expected in zip(joined, separate):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_a_joined_pack_is_dropped_when_its_weights_can_no_longer_be_packed():
    """A model moved to another dtype (or device) keeps no stale group pack alive."""
    layers = (torch.nn.Linear(8, 4), torch.nn.Linear(8, 2))
    packed = PackedWeights(torch.nn.Sequential(*layers))
    with torch.no_grad():
        assert packed.joined_forward(layers) is not None and layers in packed._packs
        for layer in layers:
            layer.half()
        assert packed.joined_forward(layers) is None and layers not in packed._packs


def test_a_joined_pack_follows_a_weight_written_in_place(model):
    """A merge writes into the base weights: the group's pack is made again, and the products follow."""
    groups_of = projections(model.base_model)[:1]
    x = torch.randn(2, 1, 32, generator=torch.Generator().manual_seed(3))
    packed = PackedWeights(model)
    project = JoinedProjections(groups_of, packed)
    with torch.no_grad():
        with packed.applied(project.groups):
            before = project(groups_of[0], x)
        q_proj = groups_of[0][0].base_layer
        q_proj.weight.mul_(2)
        try:
            project = JoinedProjections(groups_of, packed)  # one a forward: what it found is kept for its life
            with packed.applied(project.groups):
                after = project(groups_of[0], x)
                expected = torch.cat([module(x) for module in groups_of[0]], dim=-1)
        finally:
            q_proj.weight.div_(2)
    torch.testing.assert_close(after, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("rows", [["a"] * 4, [None, "a", "a", None]], ids=["every row", "among base rows"])
def test_one_adapter_on_some_layers_of_a_group_is_one_block_diagonal_product(rows):
    """LoRA on q_proj and v_proj only (k_proj a plain ``nn.Linear``): with one adapter in the batch the group's B's
    are one [Σr, q | k | v] product, k's columns zero, and the outputs equal the modules' own."""
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**DECODER_SIZES))
    model = deltatune.get_delta_model(base.eval(), deltatune.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), "a")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(0.1 * torch.randn(param.shape, generator=torch.Generator().manual_seed(5)))
    groups_of = projections(model.base_model)[:1]  # the first layer's (q, k, v)
    assert type(groups_of[0][1]) is torch.nn.Linear
    xs = inputs(groups_of, 4, 2, seed=6)
    with model.adapter_rows(rows):
        joined, separate, _ = joined_and_separate(model, groups_of, xs)
    torch.testing.assert_close(joined[0], separate[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(joined[0], bases_alone(model, groups_of, xs)[0])
    ((place, b),) = groups_of[0][0].__dict__["_joined_stack"][2]
    widths = [module.out_features for module in groups_of[0]]
    assert place is None and b.shape == (1, 8, sum(widths))  # one B: q's and v's ranks over every column
    assert not b[0, :, widths[0] : widths[0] + widths[1]].any()  # k_proj's columns get nothing
