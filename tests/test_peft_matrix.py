"""Every LoRA layer type against every option, with peft as the oracle, both file directions.

For each (layer type, option) pair one library builds a random adapter (``init_lora_weights=False``,
then every trainable parameter perturbed), saves it, and the other loads it: the adapted modules, the
trainable parameters, the logits (1e-5, fp32) and every gradient (DoRA's magnitudes included) must be
peft's (``test_peft_parity.assert_same_model``); then both merge, and the merged outputs must agree
within 1e-4 with each other and with the unmerged ones.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from test_peft_parity import DIRECTIONS, assert_same_model, save_and_load
from tiny_models import Scenario, inputs_for, output_tensor

pytestmark = [
    pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning"),
    pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`:UserWarning"),
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:r=40 is larger than:UserWarning"),
    # peft 0.21.2 takes a 1-D lora_B.bias (lora_bias=True) for an unsharded ZeRO-3 tensor: its own false alarm
    pytest.mark.filterwarnings("ignore:Adapter 'default'.*have invalid shape"),
]

# layer type -> (tiny model, targets of that type)
LAYER_TYPES = {
    "linear": ("bert", ["query", "value"]),
    "gpt2_conv1d": ("gpt2", ["c_attn", "c_fc"]),
    "embedding": ("llama", ["embed_tokens"]),
    "conv2d": ("conv", ["conv3", "conv1"]),
}
OPTIONS = {
    "plain": {},
    "rslora": {"use_rslora": True, "lora_alpha": 16},
    "dora": {"use_dora": True},
    "lora_bias": {"lora_bias": True},
    "rank_and_alpha_pattern": {"rank_pattern": {"{first}": 2}, "alpha_pattern": {"{last}": 3}},
    "rank_above_the_layer": {"r": 40},  # above every tiny layer's smaller dimension: allowed, as in peft
}
# peft refuses these pairs, and so does deltatune (tests/test_lora_conv.py checks the refusal)
REFUSED = {("embedding", "lora_bias")}
CASES = [(layer, option) for layer, option in itertools.product(LAYER_TYPES, OPTIONS) if (layer, option) not in REFUSED]


def scenario(layer: str, option: str) -> Scenario:
    kind, targets = LAYER_TYPES[layer]
    lora = {"target_modules": targets, "r": 4, "lora_alpha": 8}
    for key, value in OPTIONS[option].items():
        if isinstance(value, dict):
            value = {pattern.format(first=targets[0], last=targets[-1]): v for pattern, v in value.items()}
        lora[key] = value
    return Scenario(kind, lora)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize(("layer", "option"), CASES, ids=[f"{layer}-{option}" for layer, option in CASES])
def test_layer_type_and_option_match_peft_and_merge_alike(layer, option, direction, tmp_path):
    case = scenario(layer, option)
    peft_side, delta_side = save_and_load(case, direction, tmp_path)
    assert_same_model(peft_side, delta_side, case.kind, case.adapter)
    inputs = inputs_for(case.kind)
    with torch.no_grad():
        unmerged = output_tensor(delta_side(**inputs))
        peft_side.merge_adapter()
        delta_side.merge_adapter()
        merged = output_tensor(delta_side(**inputs))
        torch.testing.assert_close(merged, output_tensor(peft_side(**inputs)), atol=1e-4, rtol=0)
        torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=0)
