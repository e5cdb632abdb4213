"""LoRA on Conv1d/Conv2d/Conv3d (plain and grouped, with and without bias), ``lora_bias`` and DoRA on them,
checked against peft (the installed package is the oracle).

Each adapter is trained (random factors, then perturbed) and saved by one library and loaded by the
other, both ways; the two models must hold the same tensors under the same file keys, give the same
outputs and the same gradients. Merging must reproduce the unmerged output and unmerging the base
weights; grouped convolutions (LoRA or DoRA) refuse to merge, as peft does. ``assert_same_model`` and the
file-key helpers are shared with ``test_lora_mha.py`` and ``test_peft_custom_rows.py``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import peft
import pytest
import torch
from torch import nn

import deltatune
from deltatune import DeltaModel
from deltatune.errors import ConfigError, MergeError
from deltatune.tuners.lora.layer import LoraLinear
from test_peft_parity import DIRECTIONS, delta_trainable, peft_trainable
from tiny_models import _seeded, perturb_trainable

pytestmark = [
    pytest.mark.filterwarnings("ignore:LoRA adapter added to ConvNd layer with groups > 1:UserWarning"),
    pytest.mark.filterwarnings("ignore:r=.* is larger than:UserWarning"),
    # peft 0.21.2 takes a 1-D lora_B.bias (lora_bias=True) for an unsharded FSDP/ZeRO tensor when saving.
    pytest.mark.filterwarnings("ignore:Adapter 'default'.*have invalid shape"),
]

ATOL = 1e-5
MERGE_ATOL = 1e-4
CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
LORA = {"target_modules": ["conv_a", "conv_b"], "r": 4, "lora_alpha": 6}  # scaling 1.5


class ConvNet(nn.Module):
    """conv_a: 4 → 8 channels, kernel 3, stride 2, padding 1 (``groups``) → relu → conv_b: 8 → 6, kernel 1."""

    def __init__(self, dims: int, groups: int = 1, bias: bool = True, **conv_a: object) -> None:
        super().__init__()
        conv = CONVS[dims]
        self.dims = dims
        self.conv_a = conv(4, 8, 3, stride=2, padding=1, groups=groups, bias=bias, **conv_a)
        self.conv_b = conv(8, 6, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_b(torch.relu(self.conv_a(x)))

    def example(self) -> torch.Tensor:
        return torch.randn((2, 4) + (6,) * self.dims, generator=torch.Generator().manual_seed(1))


def save_and_load(
    make: Callable[[], nn.Module],
    options: dict,
    direction: str,
    root,
    method: str = "LoraConfig",
    random_init: dict | None = None,
) -> tuple[nn.Module, DeltaModel]:
    """(peft model, deltatune model) with one adapter of ``method`` (a config class name both libraries
    export): trained and saved by one side, loaded by the other; both in eval mode (peft's
    ``from_pretrained(is_trainable=True)`` trains, which would turn dropout on). ``random_init`` is the
    config field that starts the adapter away from the identity (LoRA's ``init_lora_weights=False``)."""
    random_init = {"init_lora_weights": False} if random_init is None else random_init
    if direction == "peft_to_deltatune":
        config = getattr(peft, method)(**options, **random_init)
        peft_side = _seeded(lambda: peft.get_peft_model(make(), config))
        perturb_trainable(peft_side)
        peft_side.save_pretrained(root)
        return peft_side.eval(), DeltaModel.from_pretrained(make(), root, is_trainable=True).eval()
    config = getattr(deltatune, method)(**options, **random_init)
    delta_side = _seeded(lambda: deltatune.get_delta_model(make(), config))
    perturb_trainable(delta_side)
    delta_side.save_pretrained(root)
    return peft.PeftModel.from_pretrained(make(), root, is_trainable=True).eval(), delta_side.eval()


def assert_same_model(
    peft_side: nn.Module,
    delta_side: DeltaModel,
    make: Callable[[], nn.Module],
    inputs: tuple,
    peft_grad_scale: Callable[[str], float] = lambda key: 1.0,
) -> None:
    """Same tensors under the same file keys, same outputs (1e-5), same gradients (peft's times
    ``peft_grad_scale(key)``, for a peft layer known to scale them)."""
    p_params, d_params = peft_trainable(peft_side, "default"), delta_trainable(delta_side, "default")
    assert sorted(d_params) == sorted(p_params)
    for key, param in p_params.items():
        torch.testing.assert_close(d_params[key], param, atol=0, rtol=0, msg=f"{key} differs")
    with torch.no_grad():
        base = first(make()(*inputs))
    p_out, d_out = first(peft_side(*inputs)), first(delta_side(*inputs))
    assert (p_out - base).abs().max() > 1e-3, "the adapter does not change the output; the comparison is void"
    torch.testing.assert_close(d_out, p_out, atol=ATOL, rtol=0)
    p_out.square().mean().backward()
    d_out.square().mean().backward()
    for key, param in p_params.items():
        expected = param.grad * peft_grad_scale(key)
        torch.testing.assert_close(d_params[key].grad, expected, atol=ATOL, rtol=1e-5, msg=f"gradient of {key}")
    assert all(param.grad.abs().max() > 0 for param in p_params.values())


def first(output) -> torch.Tensor:
    """A module's output tensor (MultiheadAttention returns (output, weights))."""
    return output[0] if isinstance(output, tuple) else output


def random_delta_model(make: Callable[[], nn.Module], **lora) -> DeltaModel:
    config = deltatune.LoraConfig(**{**LORA, **lora}, init_lora_weights=False)
    model = _seeded(lambda: deltatune.get_delta_model(make(), config))
    perturb_trainable(model)
    return model


def merge_keeps_the_output(model: DeltaModel) -> torch.Tensor:
    """Merging the adapter leaves the model's output on its example input as it was (within MERGE_ATOL);
    returns that (unmerged) output."""
    x = model.base_model.example()
    with torch.no_grad():
        unmerged = model(x)
        model.merge_adapter()
        torch.testing.assert_close(model(x), unmerged, atol=MERGE_ATOL, rtol=0)
    return unmerged


def base_tensors(model: DeltaModel) -> dict[str, torch.Tensor]:
    """Copies of the wrapped model's own tensors (adapter tensors left out)."""
    return {name: t.detach().clone() for name, t in model.base_model.state_dict().items() if ".lora_" not in name}


CASES = {
    f"conv{dims}d{'_grouped' if groups > 1 else ''}{'' if bias else '_nobias'}": (dims, groups, bias)
    for dims in (1, 2, 3)
    for groups in (1, 2)
    for bias in (True, False)
}


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("case", list(CASES))
def test_conv_adapter_matches_peft_both_ways(case, direction, tmp_path):
    dims, groups, bias = CASES[case]
    make = lambda: _seeded(lambda: ConvNet(dims, groups, bias))  # noqa: E731
    peft_side, delta_side = save_and_load(make, LORA, direction, tmp_path)
    assert_same_model(peft_side, delta_side, make, (make().example(),))


@pytest.mark.parametrize("case", [case for case, (_, groups, _) in CASES.items() if groups == 1])
def test_conv_merge_matches_and_unmerge_restores(case):
    dims, groups, bias = CASES[case]
    model = random_delta_model(lambda: _seeded(lambda: ConvNet(dims, groups, bias)))
    before = base_tensors(model)
    merge_keeps_the_output(model)
    assert (base_tensors(model)["conv_a.base_layer.weight"] - before["conv_a.base_layer.weight"]).abs().max() > 1e-3
    model.unmerge_adapter()
    for name, tensor in base_tensors(model).items():
        torch.testing.assert_close(tensor, before[name], atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("safe_merge", [True, False])
def test_grouped_conv_refuses_to_merge_and_changes_nothing(safe_merge, use_dora):
    """peft 0.21.2 refuses too (NotImplementedError), LoRA and DoRA alike: tests/test_peft_custom_rows.py."""
    model = random_delta_model(lambda: _seeded(lambda: ConvNet(2, groups=2)), use_dora=use_dora)
    before = base_tensors(model)
    with pytest.raises(MergeError, match="grouped convolution"):
        model.merge_adapter(safe_merge=safe_merge)
    assert not model.merged_adapters
    for name, tensor in base_tensors(model).items():
        torch.testing.assert_close(tensor, before[name], atol=0, rtol=0, msg=name)


def test_dilation_and_padding_mode_forward_equals_the_merged_convolution():
    """A takes the base's dilation and padding mode, so the forward is the convolution with W0 + ΔW."""
    make = lambda: _seeded(lambda: ConvNet(2, dilation=2, padding_mode="reflect"))  # noqa: E731
    model = random_delta_model(make)
    unmerged = merge_keeps_the_output(model)
    with torch.no_grad():
        assert (unmerged - make()(model.base_model.example())).abs().max() > 1e-3


# -- lora_bias: B gets a bias, merged as s · b into the base bias --------------------------------


class LinearNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_a, self.conv_b = nn.Linear(6, 8), nn.Linear(8, 5)  # named like ConvNet's, to share LORA

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_b(torch.relu(self.conv_a(x)))

    def example(self) -> torch.Tensor:
        return torch.randn(3, 6, generator=torch.Generator().manual_seed(1))


BIAS_MODELS = {
    "linear": LinearNet,
    **{f"conv{dims}d": (lambda dims=dims: ConvNet(dims)) for dims in (1, 2, 3)},
}


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("kind", list(BIAS_MODELS))
def test_lora_bias_matches_peft_both_ways(kind, direction, tmp_path):
    make = lambda: _seeded(BIAS_MODELS[kind])  # noqa: E731
    peft_side, delta_side = save_and_load(make, {**LORA, "lora_bias": True}, direction, tmp_path)
    assert any(key.endswith("lora_B.bias") for key in delta_trainable(delta_side, "default"))
    assert_same_model(peft_side, delta_side, make, (make().example(),))


@pytest.mark.parametrize("kind", list(BIAS_MODELS))
def test_lora_bias_merges_into_the_base_bias(kind):
    model = random_delta_model(lambda: _seeded(BIAS_MODELS[kind]), lora_bias=True)
    layer = model.base_model.conv_a
    before = base_tensors(model)
    merge_keeps_the_output(model)
    expected_bias = before["conv_a.base_layer.bias"] + layer.scaling["default"] * layer.lora_B["default"].bias
    torch.testing.assert_close(layer.base_layer.bias, expected_bias, atol=1e-6, rtol=0)
    model.unmerge_adapter()
    for name, tensor in base_tensors(model).items():
        torch.testing.assert_close(tensor, before[name], atol=1e-6, rtol=0, msg=name)


def test_lora_bias_takes_linear_off_the_fused_path():
    model = random_delta_model(lambda: _seeded(LinearNet), lora_bias=True)
    layer = model.base_model.conv_a
    assert isinstance(layer, LoraLinear)
    assert not layer.fusable(model.base_model.example(), ["default"])
    plain = random_delta_model(lambda: _seeded(LinearNet))
    assert plain.base_model.conv_a.fusable(plain.base_model.example(), ["default"])


# -- DoRA on convolutions ---------------------------------------------------------------------


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("case", [case for case, (_, _, bias) in CASES.items() if bias])
def test_conv_dora_matches_peft_both_ways(case, direction, tmp_path):
    """Grouped too: the norm is then peft's reading of B A as a kernel (``LoraConvNd.delta_weight``)."""
    dims, groups, bias = CASES[case]
    make = lambda: _seeded(lambda: ConvNet(dims, groups, bias))  # noqa: E731
    peft_side, delta_side = save_and_load(make, {**LORA, "use_dora": True}, direction, tmp_path)
    assert (
        delta_trainable(delta_side, "default")["base_model.model.conv_a.lora_magnitude_vector"].shape
        == (1, 8) + (1,) * dims
    )
    assert_same_model(peft_side, delta_side, make, (make().example(),))


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_conv_dora_merge_matches_and_unmerge_restores(dims):
    model = random_delta_model(lambda: _seeded(lambda: ConvNet(dims)), use_dora=True)
    before = base_tensors(model)
    merge_keeps_the_output(model)
    model.unmerge_adapter()
    for name, tensor in base_tensors(model).items():
        torch.testing.assert_close(tensor, before[name], atol=1e-5, rtol=0, msg=name)


# -- refusals ---------------------------------------------------------------------------------

REFUSALS = {
    "rank_not_divisible_by_groups": (lambda: ConvNet(2, groups=2), {"r": 3}, r"Conv2d conv_a has groups=2.*r=3"),
    "lora_bias_without_base_bias": (lambda: ConvNet(3, bias=False), {"lora_bias": True}, r"lora_bias.*Conv3d conv_a"),
    "lora_bias_on_embedding": (
        lambda: nn.Sequential(nn.Embedding(10, 4)),
        {"target_modules": ["0"], "lora_bias": True},
        r"lora_bias.*Embedding 0",
    ),
}


@pytest.mark.parametrize("refusal", list(REFUSALS))
def test_refusals_name_the_module_and_leave_the_model_alone(refusal):
    make, lora, message = REFUSALS[refusal]
    model = _seeded(make)
    pristine = copy.deepcopy(model)
    with pytest.raises(ConfigError, match=message):
        deltatune.get_delta_model(model, deltatune.LoraConfig(**{**LORA, **lora}))
    assert [type(m) for m in model.modules()] == [type(m) for m in pristine.modules()]


def test_a_grouped_convolution_refuses_to_merge_before_any_other_layer_merges():
    """The grouped conv comes after an adapted Linear: the refusal leaves the Linear unmerged too."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Unflatten(1, (4, 1)), nn.Conv1d(4, 4, 1, groups=2))
    delta = deltatune.get_delta_model(
        model, deltatune.LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False)
    )
    before = {name: p.clone() for name, p in delta.base_model.state_dict().items()}
    with pytest.raises(deltatune.MergeError, match="grouped convolution"):
        delta.merge_adapter()
    assert not delta.merged_adapters
    assert all(torch.equal(delta.base_model.state_dict()[name], value) for name, value in before.items())
