"""The adapter files themselves, compared with the files peft writes for the same config.

Pure file inspection: tensor keys, shapes, dtypes and safetensors metadata; ``adapter_config.json``
layout, keys and values; the folder layout of a non-default adapter; the rules vLLM applies
before it loads a LoRA directory; and the refusal of a peft file that does not fit.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import peft
import pytest
import torch
from peft.tuners.lora import Embedding as PeftLoraEmbedding
from safetensors import safe_open

from deltatune import AdapterLoadError, DeltaModel
from tiny_models import (
    SCENARIOS,
    Scenario,
    adapter_path,
    build,
    delta_model,
    inputs_for,
    output_tensor,
    peft_model,
)

pytestmark = [
    # peft's own notices, not failures (see test_peft_parity.py).
    pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning"),
    pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`:UserWarning"),
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

PEFT_LORA_KEYS = {f.name for f in dataclasses.fields(peft.LoraConfig)}
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
VLLM_TENSOR_SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B")

# Config values both libraries must write alike for the same LoraConfig. Left out on purpose:
# target_modules (peft rewrites "all-linear" as the full names it found, in set order; deltatune
# keeps "all-linear", which peft reads back to the same modules), modules_to_save (compared below)
# and peft_version / the keys of features deltatune does not have.
SAME_VALUES = (
    "alpha_pattern",
    "base_model_name_or_path",
    "bias",
    "exclude_modules",
    "fan_in_fan_out",
    "inference_mode",
    "init_lora_weights",
    "layers_pattern",
    "layers_to_transform",
    "lora_alpha",
    "lora_dropout",
    "peft_type",
    "r",
    "rank_pattern",
    "revision",
    "task_type",
    "use_rslora",
)


def unordered(value):
    """A list as a sorted list: peft writes its name sets (target_modules, exclude_modules) in set order."""
    return sorted(value) if isinstance(value, list) else value


def save_both(scenario: Scenario, root: Path) -> tuple[Path, Path, set[str]]:
    """Save ``scenario`` with peft and with deltatune; return both roots and peft's embedding base-weight keys."""
    peft_side = peft_model(scenario)
    peft_side.save_pretrained(root / "peft")
    delta_model(scenario).save_pretrained(root / "delta")
    embedding_keys = {
        f"{name}.base_layer.weight" for name, m in peft_side.named_modules() if isinstance(m, PeftLoraEmbedding)
    }
    return root / "peft", root / "delta", embedding_keys


def read_tensors(directory: Path) -> tuple[dict[str, str] | None, dict[str, tuple]]:
    """(metadata, key -> (shape, dtype)) of an adapter's safetensors file."""
    with safe_open(str(directory / "adapter_model.safetensors"), framework="pt") as handle:
        return handle.metadata(), {
            key: (tuple(handle.get_slice(key).get_shape()), handle.get_slice(key).get_dtype()) for key in handle.keys()
        }


def adapter_files(root: Path) -> list[str]:
    """The adapter files under ``root``, relative (peft's README.md model card aside)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name in ADAPTER_FILES)


@pytest.mark.parametrize("scenario_id", list(SCENARIOS))
def test_tensor_file_matches_peft(scenario_id, tmp_path):
    scenario = SCENARIOS[scenario_id]
    peft_root, delta_root, embedding_keys = save_both(scenario, tmp_path)
    assert adapter_files(delta_root) == adapter_files(peft_root)
    assert adapter_files(delta_root) == sorted(str(adapter_path(Path(), scenario.adapter) / f) for f in ADAPTER_FILES)

    peft_meta, peft_tensors = read_tensors(adapter_path(peft_root, scenario.adapter))
    delta_meta, delta_tensors = read_tensors(adapter_path(delta_root, scenario.adapter))
    assert delta_meta == {"format": "pt"} == peft_meta
    # peft also writes the full base weight of every adapted embedding ("<path>.base_layer.weight",
    # as save_embedding_layers="auto" turns on for a target named like an embedding layer) to carry
    # a resized vocabulary. deltatune writes only the adapter and reads that key when present.
    assert set(peft_tensors) - set(delta_tensors) == embedding_keys
    assert set(delta_tensors) <= set(peft_tensors)
    assert delta_tensors == {key: peft_tensors[key] for key in delta_tensors}  # same shapes and dtypes
    if scenario_id == "llama_embedding":
        assert embedding_keys == {"base_model.model.model.embed_tokens.base_layer.weight"}


@pytest.mark.parametrize("scenario_id", list(SCENARIOS))
def test_adapter_config_is_json_peft_reads(scenario_id, tmp_path):
    scenario = SCENARIOS[scenario_id]
    peft_root, delta_root, _ = save_both(scenario, tmp_path)
    directory = adapter_path(delta_root, scenario.adapter)
    text = (directory / "adapter_config.json").read_text(encoding="utf-8")
    written = json.loads(text)
    assert text.rstrip("\n") == json.dumps(written, indent=2, sort_keys=True)
    assert set(written) <= PEFT_LORA_KEYS, f"keys peft does not know: {set(written) - PEFT_LORA_KEYS}"

    for parsed in (peft.PeftConfig.from_pretrained(directory), peft.LoraConfig.from_pretrained(directory)):
        assert isinstance(parsed, peft.LoraConfig)
        assert (parsed.r, parsed.lora_alpha, parsed.bias) == (written["r"], written["lora_alpha"], written["bias"])
        assert parsed.rank_pattern == written["rank_pattern"] and parsed.alpha_pattern == written["alpha_pattern"]

    peft_written = json.loads((adapter_path(peft_root, scenario.adapter) / "adapter_config.json").read_text())
    assert {k: unordered(written[k]) for k in SAME_VALUES} == {k: unordered(peft_written[k]) for k in SAME_VALUES}
    if isinstance(written["target_modules"], list):
        assert sorted(written["target_modules"]) == sorted(peft_written["target_modules"])
    # Both libraries append "classifier" and "score" to modules_to_save of every SEQ_CLS adapter,
    # so the new head trains (peft also mutates the caller's list to do it).
    named = set(scenario.lora.get("modules_to_save") or [])
    head_names = {"classifier", "score"} if scenario.lora.get("task_type") == "SEQ_CLS" else set()
    assert set(written["modules_to_save"] or []) == named | head_names
    assert set(peft_written["modules_to_save"] or []) == named | head_names


def test_conv1d_config_records_fan_in_fan_out_like_peft(tmp_path):
    """GPT-2's Conv1D stores [in, out]; both libraries switch fan_in_fan_out on even when it was left False."""
    scenario = SCENARIOS["gpt2_conv1d"]
    peft_root, delta_root, _ = save_both(scenario, tmp_path)
    for root in (peft_root, delta_root):
        assert json.loads((root / "adapter_config.json").read_text())["fan_in_fan_out"] is True


def vllm_problems(directory: Path) -> list[str]:
    """Why vLLM would refuse this LoRA directory; empty when it loads it."""
    config = json.loads((directory / "adapter_config.json").read_text())
    problems = [f"no {key}" for key in ("r", "lora_alpha", "target_modules") if config.get(key) in (None, "", [])]
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save={config['modules_to_save']}")
    if config.get("use_dora"):
        problems.append("use_dora")
    if config.get("bias") != "none":
        problems.append(f"bias={config.get('bias')!r}")
    _, tensors = read_tensors(directory)
    problems += [f"tensor {key}" for key in tensors if not key.endswith(VLLM_TENSOR_SUFFIXES)]
    return problems


@pytest.mark.parametrize("scenario_id", list(SCENARIOS))
def test_vllm_accepts_plain_lora_saves(scenario_id, tmp_path):
    """A plain LoRA save passes vLLM's checks; a save with trained heads or biases is flagged (vLLM refuses those).

    With an embedding target this is where deltatune's file is the better one: peft's extra
    ``embed_tokens.base_layer.weight`` key fails vLLM's tensor-key rule.
    """
    scenario = SCENARIOS[scenario_id]
    delta_model(scenario).save_pretrained(tmp_path)
    problems = vllm_problems(adapter_path(tmp_path, scenario.adapter))
    if scenario.plain:
        assert problems == []
    else:
        assert problems, "the checker must flag modules_to_save / trained biases"


def delta_layers(model) -> dict[str, list[str]]:
    """Full name -> adapter names of every deltatune layer in ``model``."""
    return {name: list(m.adapter_names) for name, m in model.named_modules() if getattr(m, "is_delta_layer", False)}


@pytest.mark.parametrize("loader", ["from_pretrained", "load_adapter"])
def test_peft_file_that_does_not_fit_is_refused_and_rolled_back(loader, tmp_path):
    """A peft file whose config lies about r is refused naming the key; the half-added adapter is removed again."""
    scenario = SCENARIOS["llama_lm_head"]
    peft_model(scenario).save_pretrained(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "r": 4}))

    model = build("llama") if loader == "from_pretrained" else delta_model(SCENARIOS["llama_linear"])
    layers_before = delta_layers(model)
    with torch.no_grad():
        before = output_tensor(model(**inputs_for("llama")))
    with pytest.raises(AdapterLoadError, match=r"lora_A\.weight has shape"):
        if loader == "from_pretrained":
            DeltaModel.from_pretrained(model, tmp_path)
        else:
            model.load_adapter(tmp_path, "broken")
    assert delta_layers(model) == layers_before
    if loader == "load_adapter":
        assert list(model.peft_config) == ["default"]
    with torch.no_grad():
        torch.testing.assert_close(output_tensor(model(**inputs_for("llama"))), before, atol=0, rtol=0)
