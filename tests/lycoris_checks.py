"""The checks ``test_loha.py`` and ``test_lokr.py`` share: peft's rows of a LyCORIS family both ways and merged,
training-time dropout against peft, adapter switching, refusals and a tiny Llama that trains and round-trips.

Each check takes the method's config class name (``"LoHaConfig"`` / ``"LoKrConfig"``, exported by both
libraries); ``init_weights=False`` starts the adapters random, as ``save_and_load`` needs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from unittest import mock

import peft
import peft.tuners.loha.layer
import pytest
import torch

import deltatune
from deltatune import DeltaModel
from deltatune.errors import ConfigError
from deltatune.train.config import TrainConfig
from deltatune.train.methods import build_config
from family_checks import merges_as_peft_does
from peft_models import example, maker
from test_lora_conv import MERGE_ATOL, assert_same_model, save_and_load
from test_peft_parity import delta_trainable, peft_trainable
from tiny_models import LLAMA_LINEAR, _seeded, perturb_trainable, tiny_llama, token_inputs

RANDOM = {"init_weights": False}


def tucker_by_autograd(core: torch.Tensor, out_factor: torch.Tensor, in_factor: torch.Tensor) -> torch.Tensor:
    return torch.einsum("pqkl,po,qi->oikl", core, out_factor, in_factor)


@contextlib.contextmanager
def peft_loha_tucker_by_autograd() -> Iterator[None]:
    """peft's LoHa Tucker form (``use_effective_conv2d``) with torch's gradients: its hand-written backward
    (``HadaWeightCP``) gives ``hada_w1_a`` the gradient built from the *other* product's factors (and
    ``hada_w2_a`` likewise), which ``test_loha.py`` pins. Its forward is kept: the same einsums."""

    def make_weight_cp(t1, w1a, w1b, t2, w2a, w2b, scale):
        return tucker_by_autograd(t1, w1a, w1b) * tucker_by_autograd(t2, w2a, w2b) * scale

    with mock.patch.object(peft.tuners.loha.layer, "make_weight_cp", make_weight_cp):
        yield


def check_row_both_ways_and_merged(method: str, model_id: str, options: dict, direction: str, root) -> None:
    """Same tensors under the same keys, outputs (1e-5) and gradients as peft; then both merge, and the merged
    outputs agree with each other and with the unmerged one. A LoHa Tucker-form row takes its gradients from
    peft's forward under torch's autograd (``peft_loha_tucker_by_autograd``)."""
    make, x = maker(model_id), example(model_id)
    peft_side, delta_side = save_and_load(make, options, direction, root, method=method, random_init=RANDOM)
    tucker = method == "LoHaConfig" and options.get("use_effective_conv2d", False)
    with peft_loha_tucker_by_autograd() if tucker else contextlib.nullcontext():
        assert_same_model(peft_side, delta_side, make, (x,))
    merges_as_peft_does(peft_side, delta_side, x)


def check_training_dropout_matches_peft(method: str, model_id: str, options: dict, root) -> None:
    """In training mode (rank and module dropout on) a seeded forward and its gradients are peft's: the random
    draws come in the same order."""
    make, x = maker(model_id), example(model_id)
    peft_side, delta_side = save_and_load(make, options, "peft_to_deltatune", root, method=method, random_init=RANDOM)
    outputs = []
    for model in (peft_side.train(), delta_side.train()):
        torch.manual_seed(3)
        steps = torch.stack([model(x) for _ in range(20)])  # module dropout 0.1 skips the update in some of them
        steps.square().mean().backward()
        outputs.append(steps)
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=0)
    p_params, d_params = peft_trainable(peft_side, "default"), delta_trainable(delta_side, "default")
    for key, param in p_params.items():
        torch.testing.assert_close(d_params[key].grad, param.grad, atol=1e-5, rtol=1e-5, msg=f"gradient of {key}")
    with torch.no_grad():
        evaluated = delta_side.eval()(x)
        assert any(not torch.allclose(step, evaluated, atol=1e-4) for step in outputs[1]), "dropout changed nothing"


def check_one_op_forward(method: str, root) -> None:
    """The forward is one op with W0 + ΔW, the scale (here 3/7, not a power of two) on a small factor: the
    output and gradients of peft's two ops, W0 x + b + s·ΔW x, within float rounding (a Conv2d and a Linear,
    both with a bias). The one op is taken only where the sum keeps the arithmetic: not under autocast (a bf16
    W0 + ΔW would round the update at W0's scale), not for an input in another dtype than the factors', not
    for a call with more than the input."""
    make, x = maker("Conv2d"), example("Conv2d")
    options = {"target_modules": ["conv2d", "lin0"], "r": 7, "alpha": 3}
    peft_side, delta_side = save_and_load(make, options, "peft_to_deltatune", root, method=method, random_init=RANDOM)
    outputs = [model(x) for model in (peft_side, delta_side)]
    assert (outputs[0] - make()(x)).abs().max() > 1e-3
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-6, rtol=0)
    for output in outputs:
        output.square().sum().backward()
    p_params, d_params = peft_trainable(peft_side, "default"), delta_trainable(delta_side, "default")
    for key, param in p_params.items():
        torch.testing.assert_close(d_params[key].grad, param.grad, atol=1e-5, rtol=1e-5, msg=f"gradient of {key}")
    layer = delta_side.base_model.lin0
    deltas, features = layer.step_deltas(), torch.ones(2, layer.base_layer.in_features)
    assert layer.folds(features, deltas, (), {})
    assert not layer.folds(features.bfloat16(), deltas, (), {})
    assert not layer.folds(features, deltas, (features,), {})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not layer.folds(features, deltas, (), {})


def check_module_dropout_one_gives_the_base_in_training(method: str, target: str) -> None:
    make, x = maker("MLP"), example("MLP")
    config = getattr(deltatune, method)(target_modules=[target], module_dropout=1.0, **RANDOM)
    model = _seeded(lambda: deltatune.get_delta_model(make(), config))
    with torch.no_grad():
        base = make()(x)
        assert torch.equal(model.train()(x), base)
        assert (model.eval()(x) - base).abs().max() > 1e-3


def check_rank_dropout_drops_rows_while_training(method: str, extra: dict) -> tuple[float, int, int]:
    """rank_dropout zeroes whole output rows of ΔW while training and scales the kept ones by one factor;
    returns (that factor, rows kept, rows) for the family's own rule of rescaling."""
    make = maker("MLP")
    config = getattr(deltatune, method)(target_modules=["lin0"], rank_dropout=0.5, **RANDOM, **extra)
    model = _seeded(lambda: deltatune.get_delta_model(make(), config))
    layer = model.base_model.lin0
    x = example("MLP")
    with torch.no_grad():
        torch.manual_seed(3)
        dropped = model.train().base_model.lin0(x) - layer.base_layer(x)
        full = model.eval().base_model.lin0(x) - layer.base_layer(x)
    zero = dropped.abs().amax(0) == 0
    assert 0 < int(zero.sum()) < dropped.shape[1]
    ratio = dropped[:, ~zero] / full[:, ~zero]
    torch.testing.assert_close(ratio, torch.full_like(ratio, ratio[0, 0].item()), atol=1e-4, rtol=1e-4)
    return ratio[0, 0].item(), int((~zero).sum()), dropped.shape[1]


def check_adapters_switch_delete_disable_and_unmerge(method: str, root) -> None:
    """A second adapter gives what it gives alone; deleting it brings the first back; disabling gives the
    base; merge then unmerge restores the base weights; merge_and_unload leaves plain modules."""
    make, x = maker("Conv2d"), example("Conv2d")
    cls = getattr(deltatune, method)
    first = cls(target_modules=["conv2d", "lin0"], **RANDOM)
    second = cls(target_modules=["conv2d"], r=4, alpha=6, use_effective_conv2d=True, **RANDOM)
    with torch.no_grad():
        base = make()(x)
        model = _seeded(lambda: deltatune.get_delta_model(make(), first))
        only_first = model(x)
        model.add_adapter("other", second)
        assert torch.equal(model(x), only_first)  # "other" is inactive until set
    model.set_adapter("other")
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == {"other"}
    perturb_trainable(model)  # moves "other" only
    model.save_pretrained(root, selected_adapters=["other"])
    alone = DeltaModel.from_pretrained(make(), root / "other")
    with torch.no_grad():
        torch.testing.assert_close(model(x), alone(x), atol=1e-6, rtol=0)
        assert (model(x) - only_first).abs().max() > 1e-3
        with model.disable_adapter():
            torch.testing.assert_close(model(x), base, atol=1e-6, rtol=0)
        weights = {name: t.clone() for name, t in model.base_model.state_dict().items() if "base_layer" in name}
        model.merge_adapter(["default", "other"])
        both = model(x)
        model.unmerge_adapter()
        for name, tensor in model.base_model.state_dict().items():
            if name in weights:
                torch.testing.assert_close(tensor, weights[name], atol=1e-6, rtol=0, msg=name)
        model.set_adapter(["default", "other"])
        torch.testing.assert_close(model(x), both, atol=MERGE_ATOL, rtol=0)
        model.delete_adapter("other")
        assert model.active_adapters == ["default"]
        torch.testing.assert_close(model(x), only_first, atol=1e-6, rtol=0)
        plain = model.merge_and_unload()
        assert type(plain.conv2d) is torch.nn.Conv2d and type(plain.lin0) is torch.nn.Linear
        torch.testing.assert_close(plain(x), only_first, atol=MERGE_ATOL, rtol=0)


def check_refuses_layers_peft_cannot_adapt(method: str) -> None:
    """An embedding, GPT-2's Conv1D and a 3-d convolution are refused by name, the model left alone."""
    cls = getattr(deltatune, method)
    for model_id, target, kind in (
        ("EmbConv1D", "emb", "Embedding"),
        ("EmbConv1D", "conv1d", "Conv1D"),
        ("Conv3d", "conv3d", "Conv3d"),
    ):
        model = maker(model_id)()
        before = {name: type(m) for name, m in model.named_modules()}
        with pytest.raises(ConfigError, match=rf"cannot wrap {kind} {target}: it adapts nn.Linear"):
            deltatune.get_delta_model(model, cls(target_modules=["lin0", target]))
        assert {name: type(m) for name, m in model.named_modules()} == before


def check_config_matches_peft(method: str, root) -> None:
    """Same fields and defaults as peft's config; a file written here reads back in peft, and peft's here."""
    ours = getattr(deltatune, method)().to_dict()
    theirs = getattr(peft, method)().to_dict()
    for key in ("peft_version", "auto_mapping"):
        theirs.pop(key)
    assert ours == {**theirs, "peft_type": theirs["peft_type"].value}
    options = {"r": 4, "alpha": 2, "target_modules": ["lin0"], "rank_dropout": 0.1, "module_dropout": 0.2}
    getattr(deltatune, method)(**options).save(root)
    assert getattr(peft, method).from_pretrained(root).to_dict() == getattr(peft, method)(**options).to_dict()
    getattr(peft, method)(**options).save_pretrained(root)
    assert deltatune.DeltaConfig.from_pretrained(root) == getattr(deltatune, method)(**options)


def check_tiny_llama_trains_and_round_trips(method: str, root, lr: float) -> None:
    """On the tiny Llama: the default targets, loss falls over a few Adam steps, only the adapter moves, and the
    saved adapter loads back to the same logits."""
    model = deltatune.get_delta_model(tiny_llama(), getattr(deltatune, method)(target_modules="all-linear"))
    batch = token_inputs(batch=4, length=12)["input_ids"]
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    model.train()
    for _ in range(8):
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.15, losses
    model.eval()
    model.save_pretrained(root)
    loaded = DeltaModel.from_pretrained(tiny_llama(), root).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=batch).logits, model(input_ids=batch).logits)
        with model.disable_adapter():
            assert torch.equal(model(input_ids=batch).logits, tiny_llama()(input_ids=batch).logits)


def check_train_defaults(method: str) -> None:
    """``deltatune train method=<name>``: every linear layer but the head, at a learning rate of 1e-2."""
    name = getattr(deltatune, method).peft_type.lower()
    config = build_config(name, {}, "CAUSAL_LM", None)
    assert type(config) is getattr(deltatune, method) and config.target_modules == "all-linear"
    assert TrainConfig.from_dict({"method": name}).learning_rate == 1e-2
    assert TrainConfig.from_dict({"method": name, "learning_rate": 3e-3}).learning_rate == 3e-3
    model = deltatune.get_delta_model(tiny_llama(), config)
    adapted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if getattr(m, "is_delta_layer", False)}
    assert adapted == set(LLAMA_LINEAR)
