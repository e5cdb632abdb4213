"""peft 0.21.2's own LoRA rows (``tests/test_custom_models.py``: its small models and LoraConfigs), rebuilt here.

Each row runs both file directions against peft (same tensors under the same keys, same outputs 1e-5,
same gradients: ``test_lora_conv.assert_same_model``), then both libraries merge and the merged
outputs must agree with each other and with the unmerged ones (1e-4). Where peft cannot merge (grouped
convolutions) both refuse. Rows whose option deltatune does not have are refused by name, from peft's
saved folder and from deltatune's own config. peft adds MultiheadAttention's out_proj update twice
(huggingface/peft#3774), so the two MHA rows check deltatune against the plain attention module run on
W + s·BA instead, and pin peft's doubling.

The models have peft's layer names, shapes and data flow; the input is peft's ``arange(90)`` divided by 10
(undivided, its large logits would make a 1e-5 comparison mean little).
"""

from __future__ import annotations

import re

import peft
import pytest
import torch
from torch import nn
from torch.func import functional_call

import deltatune
from deltatune import DeltaModel
from deltatune.errors import ConfigError, MergeError
from deltatune.tuners.lora.layer import LoraLayer
from peft_models import example, maker
from test_lora_conv import (
    DIRECTIONS,
    MERGE_ATOL,
    assert_same_model,
    first,
    save_and_load,
)
from test_peft_parity import delta_trainable, peft_trainable
from tiny_models import _seeded

pytestmark = [
    pytest.mark.filterwarnings("ignore:LoRA adapter added to ConvNd layer with groups > 1:UserWarning"),
    pytest.mark.filterwarnings("ignore:r=.* is larger than:UserWarning"),
    pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning"),
    pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`:UserWarning"),
    pytest.mark.filterwarnings("ignore:Adapter 'default'.*have invalid shape"),
]


# -- peft's LoRA rows: name -> (model, LoraConfig kwargs) ------------------------------------------

DORA = {"use_dora": True}
ROWS: dict[str, tuple[str, dict]] = {
    "Vanilla MLP 1 LoRA": ("MLP", {"target_modules": "lin0"}),
    "Vanilla MLP 2 LoRA": ("MLP", {"target_modules": ["lin0"]}),
    "Vanilla MLP 3 LoRA": ("MLP", {"target_modules": ["lin1"]}),
    "Vanilla MLP 4 LoRA": ("MLP", {"target_modules": ["lin0", "lin1"]}),
    "Vanilla MLP 5 LoRA": ("MLP", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    "Vanilla MLP 6 LoRA": ("MLP", {"target_modules": ["lin0"], "lora_alpha": 4, "lora_dropout": 0.1}),
    "Vanilla MLP 7 LoRA with DoRA": ("MLP", {"target_modules": ["lin0"], **DORA}),
    "Vanilla MLP 8 LoRA with DoRA": ("MLP", {"target_modules": ["lin0", "lin1"], **DORA}),
    "Vanilla MLP 1 LoRA with KaSA": (
        "MLP",
        {"target_modules": ["lin0"], "kasa_config": {"beta": 1e-4, "gamma": 1e-3}, "r": 4},
    ),
    "Vanilla MLP 1 LoRA with MiCA": ("MLP", {"target_modules": ["lin0"], "init_lora_weights": "mica", "r": 4}),
    "Vanilla MLP 9 LoRA with DoRA": ("MLP", {"target_modules": "lin1", "lora_alpha": 32, **DORA}),
    "Vanilla MLP 10 LoRA with VeLoRA random": (
        "MLP",
        {"target_modules": ["lin0"], "velora_config": {"num_groups": 2, "init_type": "random"}},
    ),
    "Vanilla MLP 11 LoRA with VeLoRA batch_average": (
        "MLP",
        {"target_modules": ["lin0", "lin1"], "velora_config": {"num_groups": 2, "init_type": "batch_average"}},
    ),
    "Vanilla MLP 12 LoRA with VeLoRA batch_average_once": (
        "MLP",
        {"target_modules": ["lin0"], "velora_config": {"num_groups": 2, "init_type": "batch_average_once"}},
    ),
    "Embedding + transformers Conv1D 1 LoRA": ("EmbConv1D", {"target_modules": ["conv1d"]}),
    "Embedding + transformers Conv1D 2 LoRA": ("EmbConv1D", {"target_modules": ["emb"]}),
    "Embedding + transformers Conv1D 3 LoRA": ("EmbConv1D", {"target_modules": ["emb", "conv1d"]}),
    "Embedding + transformers Conv1D 1 DoRA": ("EmbConv1D", {"target_modules": ["conv1d"], **DORA}),
    "Embedding + transformers Conv1D 2 DoRA": ("EmbConv1D", {"target_modules": ["emb"], **DORA}),
    "Embedding + transformers Conv1D 3 DoRA": ("EmbConv1D", {"target_modules": ["emb", "conv1d"], **DORA}),
    "Embedding + transformers Conv1D 1 LoRA trainable_tokens": (
        "EmbConv1D",
        {"target_modules": ["conv1d"], "trainable_token_indices": {"emb": [0, 10]}},
    ),
    "Conv1d LoRA": ("Conv1d", {"target_modules": ["conv1d"]}),
    "Conv1d LoRA with DoRA": ("Conv1d", {"target_modules": ["conv1d"], **DORA}),
    "Conv2d 1 LoRA": ("Conv2d", {"target_modules": ["conv2d"]}),
    "Conv2d 2 LoRA": ("Conv2d", {"target_modules": ["conv2d", "lin0"]}),
    "Conv2d 1 LoRA with DoRA": ("Conv2d", {"target_modules": ["conv2d"], **DORA}),
    "Conv2d 2 LoRA with DoRA": ("Conv2d", {"target_modules": ["conv2d", "lin0"], **DORA}),
    "Conv2d Groups LoRA": ("Conv2dGroups", {"target_modules": ["conv2d"]}),
    "Conv2d Groups2 LoRA": ("Conv2dGroups2", {"target_modules": ["conv2d"]}),
    "Conv2d Groups LoRA with DoRA": ("Conv2dGroups", {"target_modules": ["conv2d"], **DORA}),
    "Conv2d Groups2 LoRA with DoRA": ("Conv2dGroups2", {"target_modules": ["conv2d"], **DORA}),
    "Conv3d 1 LoRA": ("Conv3d", {"target_modules": ["conv3d"]}),
    "Conv3d 2 LoRA": ("Conv3d", {"target_modules": ["conv3d", "lin0"]}),
    "Conv3d 1 LoRA with DoRA": ("Conv3d", {"target_modules": ["conv3d"], **DORA}),
    "Conv3d 2 LoRA with DoRA": ("Conv3d", {"target_modules": ["conv3d", "lin0"], **DORA}),
    "Vanilla MLP 1 LoRA with lora_b bias": (
        "MLP",
        {"target_modules": ["lin0", "lin1"], "lora_bias": True, "lora_alpha": 32},
    ),
    "Conv2d 1 LoRA with lora_b bias": ("Conv2d", {"target_modules": ["conv2d"], "lora_bias": True, "lora_alpha": 32}),
    "Conv3d 1 LoRA with lora_b bias": ("Conv3d", {"target_modules": ["conv3d"], "lora_bias": True, "lora_alpha": 32}),
    "MHA 1 LoRA": ("MHA", {"target_modules": ["mha"]}),
    "MHA 2 LoRA": ("MHA", {"target_modules": ["mha", "lin0"]}),
    "MLP 1 using nn.Parameter LoRA": ("MlpUsingParameters", {"target_parameters": ["lin0.weight"]}),
    "MLP 2 using nn.Parameter LoRA": ("MLP", {"target_modules": ["lin0"], "target_parameters": ["lin1.weight"]}),
    "Vanilla MLP 1 LoRA with Monteclora": (
        "MLP",
        {"target_modules": ["lin0"], "monteclora_config": {"num_samples": 2}},
    ),
    "BD-LoRA A only": (
        "MLP",
        {"target_modules": ["lin0", "lin1"], "use_bdlora": {"target_modules_bd_a": ["lin0"], "match_strict": False}},
    ),
    "BD-LoRA B only": (
        "MLP",
        {
            "target_modules": ["lin0", "lin1"],
            "use_bdlora": {"target_modules_bd_b": ["lin1"], "nblocks": 2, "match_strict": False},
        },
    ),
    "BD-LoRA both A and B": (
        "MLP",
        {
            "target_modules": ["lin0", "lin1"],
            "use_bdlora": {"target_modules_bd_a": ["lin0"], "target_modules_bd_b": ["lin1"], "nblocks": 2},
        },
    ),
}

# rows whose option deltatune does not have -> the option its refusal names
REFUSED = {
    "Vanilla MLP 1 LoRA with KaSA": "kasa_config",
    "Vanilla MLP 1 LoRA with MiCA": "init_lora_weights='mica'",
    "Vanilla MLP 10 LoRA with VeLoRA random": "velora_config",
    "Vanilla MLP 11 LoRA with VeLoRA batch_average": "velora_config",
    "Vanilla MLP 12 LoRA with VeLoRA batch_average_once": "velora_config",
    "Vanilla MLP 1 LoRA with Monteclora": "monteclora_config",
    "BD-LoRA A only": "use_bdlora",
    "BD-LoRA B only": "use_bdlora",
    "BD-LoRA both A and B": "use_bdlora",
}
ATTENTION = {"MHA 1 LoRA", "MHA 2 LoRA"}  # peft adds out_proj's update twice: checked against the plain module
GROUPED = {name for name, (model_id, _) in ROWS.items() if model_id.startswith("Conv2dGroups")}  # peft cannot merge
PARITY = [name for name in ROWS if name not in REFUSED and name not in ATTENTION]


def test_the_table_holds_all_of_peft_0_21_2_lora_rows():
    assert (len(ROWS), len(REFUSED), len(ATTENTION), len(GROUPED)) == (46, 9, 2, 4)
    assert peft.__version__ == "0.21.2"


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("row", PARITY)
def test_row_matches_peft_both_ways_and_merges_as_peft_does(row, direction, tmp_path):
    model_id, lora = ROWS[row]
    make, x = maker(model_id), example(model_id)
    peft_side, delta_side = save_and_load(make, lora, direction, tmp_path)
    assert_same_model(peft_side, delta_side, make, (x,))
    with torch.no_grad():
        unmerged = delta_side(x)
        if row in GROUPED:
            with pytest.raises(NotImplementedError, match="groups > 1"):
                peft_side.merge_adapter()
            with pytest.raises(MergeError, match="grouped convolution"):
                delta_side.merge_adapter()
            return
        peft_side.merge_adapter()
        delta_side.merge_adapter()
        merged = delta_side(x)
        torch.testing.assert_close(merged, peft_side(x), atol=MERGE_ATOL, rtol=0)
        torch.testing.assert_close(merged, unmerged, atol=MERGE_ATOL, rtol=0)


@pytest.mark.parametrize("row", sorted(REFUSED))
def test_row_deltatune_lacks_is_refused_by_name_both_ways(row, tmp_path):
    model_id, lora = ROWS[row]
    make = maker(model_id)
    _seeded(lambda: peft.get_peft_model(make(), peft.LoraConfig(**lora))).save_pretrained(tmp_path)
    message = rf"^{re.escape(REFUSED[row])}.* is not supported by deltatune"
    with pytest.raises(ConfigError, match=message):
        DeltaModel.from_pretrained(make(), tmp_path)
    with pytest.raises(ConfigError, match=message):
        deltatune.get_delta_model(make(), deltatune.LoraConfig(**lora))


# -- MultiheadAttention: the plain module on W + s·BA is the oracle ---------------------------------


def adapted_weights(delta_side: DeltaModel, out_proj_times: int = 1) -> dict[str, torch.Tensor]:
    """Plain-model parameter name -> W + s·B A from each LoRA layer's factors (out_proj's ``out_proj_times``
    times), written out with torch ops rather than the layers' own ``delta_weight``."""
    weights = {}
    for name, layer in delta_side.base_model.named_modules():
        if isinstance(layer, LoraLayer):
            attribute = "in_proj_weight" if isinstance(layer.base_layer, nn.MultiheadAttention) else "weight"
            times = out_proj_times if name.endswith("out_proj") else 1
            update = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
            key = f"{name.replace('.base_layer', '')}.{attribute}"
            weights[key] = getattr(layer.base_layer, attribute) + times * layer.scaling["default"] * update
    return weights


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("row", sorted(ATTENTION))
def test_attention_row_is_the_plain_module_on_adapted_weights(row, direction, tmp_path):
    """Same tensors as peft; output and gradients those of the plain model on W + s·BA; merge keeps the
    output; peft's own output is the plain model with out_proj's update added twice."""
    model_id, lora = ROWS[row]
    make, x = maker(model_id), example(model_id)
    peft_side, delta_side = save_and_load(make, lora, direction, tmp_path)
    p_params, d_params = peft_trainable(peft_side, "default"), delta_trainable(delta_side, "default")
    assert sorted(p_params) == sorted(d_params) and any(".out_proj." in key for key in d_params)
    for key, param in p_params.items():
        torch.testing.assert_close(d_params[key], param, atol=0, rtol=0, msg=f"{key} differs")
    plain = make()
    functional_call(plain, adapted_weights(delta_side), (x,)).square().mean().backward()
    expected_grads = {key: param.grad.clone() for key, param in d_params.items()}
    delta_side.zero_grad(set_to_none=True)
    output = first(delta_side(x))
    output.square().mean().backward()
    for key, param in d_params.items():
        torch.testing.assert_close(param.grad, expected_grads[key], atol=1e-6, rtol=1e-5, msg=f"gradient of {key}")
    with torch.no_grad():
        torch.testing.assert_close(output, functional_call(plain, adapted_weights(delta_side), (x,)), atol=1e-5, rtol=0)
        assert (output - plain(x)).abs().max() > 1e-3
        doubled = functional_call(plain, adapted_weights(delta_side, out_proj_times=2), (x,))
        torch.testing.assert_close(peft_side(x), doubled, atol=1e-5, rtol=0)
        delta_side.merge_adapter()
        torch.testing.assert_close(delta_side(x), output, atol=MERGE_ATOL, rtol=0)


# -- the wrapped layer shows its base layer's weight and bias, as peft's layers do -----------------

# layer type -> (row whose model has it, module name)
WRAPPED = {
    "linear": ("Vanilla MLP 1 LoRA", "lin0"),
    "gpt2_conv1d": ("Embedding + transformers Conv1D 1 LoRA", "conv1d"),
    "embedding": ("Embedding + transformers Conv1D 2 LoRA", "emb"),
    "conv1d": ("Conv1d LoRA", "conv1d"),
    "grouped_conv2d": ("Conv2d Groups2 LoRA", "conv2d"),
    "conv3d": ("Conv3d 1 LoRA", "conv3d"),
    "attention": ("MHA 1 LoRA", "mha"),
    "attention_out_proj": ("MHA 1 LoRA", "mha.base_layer.out_proj"),
    "parameter": ("MLP 1 using nn.Parameter LoRA", "lin0"),
}


@pytest.mark.parametrize("kind", list(WRAPPED))
def test_wrapped_layer_shows_the_base_weight_and_bias_as_peft_does(kind):
    row, name = WRAPPED[kind]
    model_id, lora = ROWS[row]
    peft_model = peft.get_peft_model(maker(model_id)(), peft.LoraConfig(**lora))
    delta_model = deltatune.get_delta_model(maker(model_id)(), deltatune.LoraConfig(**lora))
    peft_layer = peft_model.base_model.model.get_submodule(name)
    delta_layer = delta_model.base_model.get_submodule(name)
    assert isinstance(delta_layer, LoraLayer)
    for attribute in ("weight", "bias"):
        base = getattr(delta_layer.base_layer, attribute, None)
        assert hasattr(delta_layer, attribute) == hasattr(peft_layer, attribute) == (base is not None), attribute
        assert getattr(delta_layer, attribute, None) is base
