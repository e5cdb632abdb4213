"""Untrusted input: pickles never run code, adapter files that do not fit change nothing, configs are data,
and non-finite weights never reach a merged model."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from deltatune import (
    AdapterLoadError,
    ConfigError,
    DeltaModel,
    LoraConfig,
    MergeError,
    TargetError,
    get_delta_model,
)
from deltatune.cli.main import main
from deltatune.io import PICKLE_WEIGHTS_NAME, WEIGHTS_NAME, read_adapter_weights
from deltatune.train.config import TrainConfig
from tiny_models import tiny_gpt2, tiny_llama


class Exploit:
    """Unpickling this calls ``open(marker, "w")``: code chosen by whoever wrote the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.fixture
def adapter(tmp_path: Path) -> Path:
    """A llama q/v LoRA (r=4) with non-zero weights, saved in tmp_path/"adapter"."""
    model = get_delta_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def _snapshot(model: torch.nn.Module) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Every module's type and every parameter and buffer, by name."""
    types = [f"{name}:{type(module).__name__}" for name, module in model.named_modules()]
    return types, {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _assert_unchanged(before: tuple[list[str], dict[str, torch.Tensor]], model: torch.nn.Module) -> None:
    types, state = _snapshot(model)
    assert types == before[0]
    assert state.keys() == before[1].keys()
    assert all(torch.equal(state[name], before[1][name]) for name in state)


# -- pickles -----------------------------------------------------------------------------------


def _pickled_adapter(adapter: Path, payload) -> None:
    (adapter / WEIGHTS_NAME).unlink()
    torch.save(payload, adapter / PICKLE_WEIGHTS_NAME)


def test_the_exploit_is_live(adapter: Path, tmp_path: Path) -> None:
    """Control: a plain unpickle of the file runs the payload, so the tests below would notice if we did."""
    marker = tmp_path / "pwned"
    _pickled_adapter(adapter, {"x": Exploit(marker)})
    torch.load(adapter / PICKLE_WEIGHTS_NAME, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("allow_pickle", [False, True], ids=["default", "opted-in"])
def test_a_malicious_pickle_never_runs(adapter: Path, tmp_path: Path, allow_pickle: bool) -> None:
    marker = tmp_path / "pwned"
    _pickled_adapter(adapter, {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": Exploit(marker)})
    base = tiny_llama()
    before = _snapshot(base)
    expected = (
        r"torch.load\(weights_only=True\) accepts" if allow_pickle else "can run code when loaded.*allow_pickle=True"
    )
    with pytest.raises(AdapterLoadError, match=expected) as info:
        DeltaModel.from_pretrained(base, adapter, allow_pickle=allow_pickle)
    assert "\n" not in str(info.value) and PICKLE_WEIGHTS_NAME in str(info.value)
    assert not marker.exists()
    _assert_unchanged(before, base)


def test_an_opted_in_pickle_must_hold_a_dict_of_tensors(adapter: Path) -> None:
    _pickled_adapter(adapter, [torch.zeros(2)])
    with pytest.raises(AdapterLoadError, match="is not a dict of tensors"):
        read_adapter_weights(adapter, allow_pickle=True)


# -- adapter files that do not fit -----------------------------------------------------------


def _rewrite(adapter: Path, change) -> None:
    tensors = load_file(adapter / WEIGHTS_NAME)
    change(tensors)
    save_file(tensors, adapter / WEIGHTS_NAME, metadata={"format": "pt"})


Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
V_B = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"


def _set(key: str, value_of: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict], None]:
    """A change to a file's tensors: replace ``key``'s tensor by ``value_of(tensor)``."""
    return lambda tensors: tensors.__setitem__(key, value_of(tensors[key]))


def _truncate(adapter: Path) -> None:
    data = (adapter / WEIGHTS_NAME).read_bytes()
    (adapter / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])


def _huge_header(adapter: Path) -> None:
    """A header length of 2**40 bytes: must be refused, not allocated."""
    data = (adapter / WEIGHTS_NAME).read_bytes()
    (adapter / WEIGHTS_NAME).write_bytes((2**40).to_bytes(8, "little") + data[8:])


CASES = {
    # name: (how the file is damaged, the message it must give)
    "two-shapes-wrong": (
        lambda a: _rewrite(
            a, lambda t: (_set(Q_A, lambda x: torch.zeros(2, 32))(t), _set(V_B, lambda x: x.T.contiguous())(t))
        ),
        rf"{Q_A} has shape \(2, 32\) but the model expects \(4, 32\)",  # the first of the two, both shapes
    ),
    "unknown-module": (
        lambda a: _rewrite(a, lambda t: t.__setitem__(Q_A.replace("layers.0", "layers.7"), t[Q_A].clone())),
        r"model\.layers\.7\.self_attn\.q_proj\.lora_A\.weight has no matching parameter in the model",
    ),
    "another-architecture": (
        lambda a: _rewrite(
            a, lambda t: t.update({k.replace("model.model.layers", "model.transformer.h"): t.pop(k) for k in list(t)})
        ),
        r"the file lacks base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight",
    ),
    "bool-dtype": (lambda a: _rewrite(a, _set(V_B, lambda x: x > 0)), rf"{V_B} has dtype torch\.bool"),
    "nan": (
        lambda a: _rewrite(a, _set(V_B, lambda x: x.index_fill(0, torch.tensor([3]), float("nan")))),
        rf"{V_B} holds NaN or Inf values",
    ),
    "inf": (
        lambda a: _rewrite(a, _set(Q_A, lambda x: x.index_fill(1, torch.tensor([0]), float("-inf")))),
        rf"{Q_A} holds NaN or Inf values",
    ),
    "truncated": (_truncate, r"adapter_model\.safetensors is not a readable safetensors file"),
    "huge-header": (_huge_header, r"adapter_model\.safetensors is not a readable safetensors file"),
    "not-safetensors": (
        lambda a: (a / WEIGHTS_NAME).write_bytes(b"<html>404 Not Found</html>"),
        r"adapter_model\.safetensors is not a readable safetensors file",
    ),
}


@pytest.mark.parametrize("loader", ["from_pretrained", "load_adapter"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_an_adapter_file_that_does_not_fit_is_refused_and_changes_nothing(
    adapter: Path, case: str, loader: str
) -> None:
    damage, message = CASES[case]
    damage(adapter)
    if loader == "from_pretrained":
        model = tiny_llama()
    else:
        model = get_delta_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    before = _snapshot(model)
    with pytest.raises(AdapterLoadError, match=message) as info:
        if loader == "from_pretrained":
            DeltaModel.from_pretrained(model, adapter)
        else:
            model.load_adapter(adapter, "downloaded")
    assert "\n" not in str(info.value)
    _assert_unchanged(before, model)
    if loader == "load_adapter":
        assert list(model.peft_config) == ["default"] and model.active_adapters == ["default"]


def test_a_half_precision_file_is_cast_not_refused(adapter: Path) -> None:
    """peft saves bf16/fp16 adapters for fp32 models too; the values are cast to the parameter's dtype."""
    _rewrite(adapter, lambda t: t.update({k: v.to(torch.bfloat16) for k, v in t.items()}))
    model = DeltaModel.from_pretrained(tiny_llama(), adapter)
    loaded = model.adapter_state("default")
    assert all(p.dtype == torch.float32 for p in loaded.values())
    expected = load_file(adapter / WEIGHTS_NAME)
    assert torch.equal(loaded["model.layers.0.self_attn.q_proj.lora_A.default.weight"], expected[Q_A].float())


def test_a_gpt2_adapter_does_not_load_into_a_llama(tmp_path: Path) -> None:
    get_delta_model(tiny_gpt2(), LoraConfig(target_modules=["c_attn"])).save_pretrained(tmp_path)
    model = tiny_llama()
    before = _snapshot(model)
    with pytest.raises(TargetError, match=r"target_modules=\['c_attn'\] matched no module"):
        DeltaModel.from_pretrained(model, tmp_path)
    _assert_unchanged(before, model)


# -- configs are data --------------------------------------------------------------------------


YAML_PAYLOADS = [
    "seed: !!python/object/apply:builtins.open ['{marker}', 'w']\n",
    "seed: !!python/object/new:builtins.open ['{marker}', 'w']\n",
    "model: !!python/name:os.system\n",
]


@pytest.mark.parametrize("payload", YAML_PAYLOADS)
def test_a_yaml_config_with_python_tags_is_refused_without_running_them(tmp_path: Path, payload: str) -> None:
    marker = tmp_path / "pwned"
    config = tmp_path / "run.yaml"
    config.write_text(payload.format(marker=marker))
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_sources(str(config), [])
    assert str(config) in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()


def test_a_python_tag_in_an_override_never_runs(tmp_path: Path) -> None:
    """``key=value`` values are YAML scalars, parsed with safe loading too: the tag is refused, never run."""
    marker = tmp_path / "pwned"
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_sources(None, [f"seed=!!python/object/apply:builtins.open ['{marker}', 'w']"])
    assert "python/object/apply" in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("model_type", ["llama", "evil"], ids=["known-architecture", "unknown-architecture"])
def test_a_model_folder_with_custom_code_is_not_run(tmp_path: Path, model_type: str) -> None:
    """A model folder may ask for its own Python code (``auto_map``): it is never imported without an opt-in.
    A known architecture loads with transformers' own class; an unknown one is refused."""
    from deltatune.runtime.loading import load_causal_lm

    marker = tmp_path / "pwned"
    folder = tmp_path / "model"
    tiny_llama().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w')\n")
    if model_type == "llama":
        assert type(load_causal_lm(folder)).__name__ == "LlamaForCausalLM"
    else:
        with pytest.raises(ValueError, match="trust_remote_code"):
            load_causal_lm(folder)
    assert not marker.exists()


# -- non-finite weights never reach a merged model -------------------------------------------


def test_an_adapter_that_overflows_the_base_weights_is_not_merged() -> None:
    """Finite adapter weights whose product is Inf in fp32: the merged weight would be Inf."""
    model = get_delta_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    layer = model.base_model.model.layers[1].self_attn.q_proj
    with torch.no_grad():
        layer.lora_A["default"].weight.fill_(1e30)
        layer.lora_B["default"].weight.fill_(1e30)
    base = model.base_model
    before = _snapshot(base)
    with pytest.raises(MergeError, match="NaN/Inf"):
        model.merge_and_unload(safe_merge=True)
    _assert_unchanged(before, base)


def test_the_merge_command_refuses_a_nan_adapter_in_one_line(adapter: Path, tmp_path: Path, capsys) -> None:
    _rewrite(adapter, _set(V_B, lambda x: torch.full_like(x, float("nan"))))
    tiny_llama().save_pretrained(tmp_path / "base")
    capsys.readouterr()
    code = main(["merge", str(adapter), str(tmp_path / "merged"), "--model", str(tmp_path / "base")])
    err = capsys.readouterr().err  # after the base model's loading progress bar
    assert code == 2 and "Traceback" not in err
    assert err.endswith(
        f"deltatune merge: error: {adapter}: {V_B} holds NaN or Inf values; the adapter is corrupt "
        f"(did training diverge?), re-train or pick an earlier checkpoint\n"
    )
    assert not (tmp_path / "merged").exists()
