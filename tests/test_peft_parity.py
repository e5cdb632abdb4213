"""Numerical parity with peft (the installed package is the oracle): same weights, same outputs, same gradients.

Every scenario is saved by one library and loaded by the other, both ways. The source model is
built with ``init_lora_weights=False`` (B is not zero) and every trainable parameter is then
perturbed as training would (so trained biases and head copies differ from the base model too),
which makes a wrong key, a dropped tensor or a wrong scaling show in the logits.
Parameters are paired by their file key: peft's side through peft's own
``get_peft_model_state_dict``, deltatune's through ``deltatune.io.to_file_key``.
"""

from __future__ import annotations

import peft
import pytest
import torch
from peft.tuners.lora import LoraLayer as PeftLoraLayer
from torch import nn

import deltatune
from deltatune import DeltaModel
from deltatune.io import to_file_key
from deltatune.tuners.lora.layer import LoraLayer as DeltaLoraLayer
from tiny_models import (
    SCENARIOS,
    Scenario,
    adapter_path,
    build,
    delta_model,
    inputs_for,
    output_tensor,
    peft_model,
    perturb_trainable,
)

pytestmark = [
    # peft's own notices, not failures: it switches fan_in_fan_out on for GPT-2's Conv1D, and turns
    # save_embedding_layers on when a target is named like an embedding layer.
    pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning"),
    pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`:UserWarning"),
    # peft 0.21.2 calls transformers 5's deprecated `is_gradient_checkpointing`.
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

DIRECTIONS = ["peft_to_deltatune", "deltatune_to_peft"]
ATOL = 1e-5


def peft_adapted(model: nn.Module) -> set[str]:
    """Names (relative to the transformers model) of the modules peft wrapped with LoRA."""
    return {name.removeprefix("base_model.model.") for name, m in model.named_modules() if isinstance(m, PeftLoraLayer)}


def delta_adapted(model: DeltaModel) -> set[str]:
    return {name for name, m in model.base_model.named_modules() if isinstance(m, DeltaLoraLayer)}


def peft_trainable(model: nn.Module, adapter: str) -> dict[str, nn.Parameter]:
    """File key -> trainable parameter, with peft's own mapping (a state-dict value shares its parameter's memory)."""
    key_at = {t.data_ptr(): key for key, t in peft.get_peft_model_state_dict(model, adapter_name=adapter).items()}
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    unsaved = [name for name, p in trainable.items() if p.data_ptr() not in key_at]
    assert not unsaved, f"peft trains parameters it does not save: {unsaved}"
    return {key_at[p.data_ptr()]: p for p in trainable.values()}


def delta_trainable(model: DeltaModel, adapter: str) -> dict[str, nn.Parameter]:
    """File key -> trainable parameter; every trainable parameter must belong to the saved adapter state."""
    state = model.adapter_state(adapter)
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in state.values()}
    return {to_file_key(name, adapter): param for name, param in state.items()}


def loss_of(output: torch.Tensor) -> torch.Tensor:
    return output.square().mean()


def assert_same_model(peft_side: nn.Module, delta_side: DeltaModel, kind: str, adapter: str) -> None:
    """Same adapted modules, same trainable parameters (values), same logits, same gradients."""
    assert peft_adapted(peft_side) == delta_adapted(delta_side) != set()
    p_params, d_params = peft_trainable(peft_side, adapter), delta_trainable(delta_side, adapter)
    assert sorted(d_params) == sorted(p_params)
    for key, param in p_params.items():
        torch.testing.assert_close(d_params[key], param, atol=0, rtol=0, msg=f"{key} differs")

    inputs = inputs_for(kind)
    with torch.no_grad():
        base = output_tensor(build(kind)(**inputs))
    p_out, d_out = output_tensor(peft_side(**inputs)), output_tensor(delta_side(**inputs))
    assert (p_out - base).abs().max() > 1e-3, "the adapter does not change the output; the comparison is void"
    torch.testing.assert_close(d_out, p_out, atol=ATOL, rtol=0)

    loss_of(p_out).backward()
    loss_of(d_out).backward()
    for key, param in p_params.items():
        assert param.grad is not None and d_params[key].grad is not None, key
        torch.testing.assert_close(d_params[key].grad, param.grad, atol=ATOL, rtol=1e-5, msg=f"gradient of {key}")
    assert any(param.grad.abs().max() > 0 for param in p_params.values())


def save_and_load(scenario: Scenario, direction: str, root) -> tuple[nn.Module, DeltaModel]:
    """(peft model, deltatune model) holding the same adapter: one trained and saved, the other loaded."""
    kind, adapter = scenario.kind, scenario.adapter
    if direction == "peft_to_deltatune":
        peft_side = peft_model(scenario, init_lora_weights=False)
        perturb_trainable(peft_side)
        peft_side.save_pretrained(root)
        delta_side = DeltaModel.from_pretrained(
            build(kind), adapter_path(root, adapter), adapter_name=adapter, is_trainable=True
        )
    else:
        delta_side = delta_model(scenario, init_lora_weights=False)
        perturb_trainable(delta_side)
        delta_side.save_pretrained(root)
        peft_side = peft.PeftModel.from_pretrained(
            build(kind), adapter_path(root, adapter), adapter_name=adapter, is_trainable=True
        )
    return peft_side, delta_side


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("scenario_id", list(SCENARIOS))
def test_saved_adapter_loads_with_identical_outputs_and_gradients(scenario_id, direction, tmp_path):
    scenario = SCENARIOS[scenario_id]
    peft_side, delta_side = save_and_load(scenario, direction, tmp_path)
    assert_same_model(peft_side, delta_side, scenario.kind, scenario.adapter)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_two_adapters_in_one_folder_switch_identically(direction, tmp_path):
    """One folder holds adapter "default" at its root and "other" in ``other/``; each loads under its name."""
    first = SCENARIOS["llama_linear"]
    other = {"target_modules": ["k_proj", "v_proj", "down_proj"], "r": 4, "lora_alpha": 12, "init_lora_weights": False}
    if direction == "peft_to_deltatune":
        peft_side = peft_model(first, init_lora_weights=False)
        peft_side.add_adapter("other", peft.LoraConfig(**other))
        peft_side.save_pretrained(tmp_path)
        delta_side = DeltaModel.from_pretrained(build("llama"), tmp_path, is_trainable=True)
        delta_side.load_adapter(tmp_path / "other", "other", is_trainable=True)
    else:
        delta_side = delta_model(first, init_lora_weights=False)
        delta_side.add_adapter("other", deltatune.LoraConfig(**other))
        delta_side.save_pretrained(tmp_path)
        peft_side = peft.PeftModel.from_pretrained(build("llama"), tmp_path, is_trainable=True)
        peft_side.load_adapter(tmp_path / "other", adapter_name="other", is_trainable=True)
    assert {p.name for p in tmp_path.iterdir() if p.is_dir()} == {"other"}
    for name in ("other", "default"):
        peft_side.set_adapter(name)
        delta_side.set_adapter(name)
        for model in (peft_side, delta_side):
            model.zero_grad(set_to_none=True)
        assert_same_model(peft_side, delta_side, "llama", name)


# (model kind, extra LoraConfig kwargs, the head "all-linear" must leave alone)
ALL_LINEAR_MODELS = {
    "llama": ("llama", {}, "lm_head"),
    "gpt2": ("gpt2", {}, "lm_head"),
    # No modules_to_save given: the classifier is excluded by "all-linear" itself (and both
    # libraries add "classifier"/"score" to modules_to_save for SEQ_CLS, so the head trains in full).
    "bert_seq_cls": ("bert", {"task_type": "SEQ_CLS"}, "classifier"),
}


@pytest.mark.parametrize("model_id", list(ALL_LINEAR_MODELS))
def test_all_linear_selects_the_modules_peft_selects(model_id):
    kind, extra, head = ALL_LINEAR_MODELS[model_id]
    scenario = Scenario(kind, {"target_modules": "all-linear", **extra})
    selected = delta_adapted(delta_model(scenario))
    assert selected == peft_adapted(peft_model(scenario))
    assert head not in selected and len(selected) > 2
