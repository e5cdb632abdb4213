"""LoraConfig: validation at construction, normalisation, and the adapter_config.json round trip."""

from __future__ import annotations

import json
import math
from pathlib import Path

import peft
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deltatune import ConfigError, DeltaConfig, LoraConfig
from deltatune.config import CONFIG_NAME, TASK_TYPES


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"r": 0}, "r"),
        ({"r": -4}, "r"),
        ({"r": 2.0}, "r"),
        ({"r": "8"}, "r"),
        ({"r": True}, "r"),
        ({"lora_alpha": 0}, "lora_alpha"),
        ({"lora_alpha": -1.5}, "lora_alpha"),
        ({"lora_alpha": math.nan}, "lora_alpha"),
        ({"lora_alpha": math.inf}, "lora_alpha"),
        ({"lora_alpha": "16"}, "lora_alpha"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"lora_dropout": -0.1}, "lora_dropout"),
        ({"lora_dropout": math.nan}, "lora_dropout"),
        ({"lora_dropout": "0.1"}, "lora_dropout"),
        ({"bias": "some"}, "bias"),
        ({"bias": None}, "bias"),
        ({"init_lora_weights": "pissa_niter_0"}, "init_lora_weights"),
        ({"init_lora_weights": "mica"}, "init_lora_weights"),
        ({"use_dora": "yes"}, "use_dora"),
        ({"lora_bias": 1}, "lora_bias"),
        ({"use_dora": True, "lora_bias": True}, "lora_bias"),
        ({"lora_bias": True, "init_lora_weights": "gaussian"}, "lora_bias"),
        ({"trainable_token_indices": []}, "trainable_token_indices"),
        ({"trainable_token_indices": [1, -2]}, "trainable_token_indices"),
        ({"trainable_token_indices": {"embed_tokens": "1"}}, "trainable_token_indices"),
        ({"target_parameters": "experts.down_proj"}, "target_parameters"),
        ({"target_parameters": [""]}, "target_parameters"),
        ({"use_qalora": True}, "use_qalora"),
        ({"layer_replication": [[0, 2], [1, 3]]}, "layer_replication"),
        ({"alora_invocation_tokens": [5, 6]}, "alora_invocation_tokens"),
        ({"megatron_config": {"tensor_model_parallel_size": 2}}, "megatron_config"),
        ({"runtime_config": {"ephemeral_gpu_offload": True}}, "runtime_config"),
        ({"init_lora_weights": 1}, "init_lora_weights"),
        ({"init_lora_weights": None}, "init_lora_weights"),
        ({"task_type": "CAUSAL"}, "task_type"),
        ({"task_type": "text-generation"}, "task_type"),
        ({"layers_pattern": "layers"}, "layers_pattern"),
        ({"layers_pattern": ["layers", "h"]}, "layers_pattern"),
        ({"target_modules": r".*q_proj", "layers_to_transform": [0]}, "layers_to_transform"),
        ({"target_modules": "all-linear", "layers_to_transform": 1}, "layers_to_transform"),
        ({"layers_to_transform": -1}, "layers_to_transform"),
        ({"layers_to_transform": [0, -1]}, "layers_to_transform"),
        ({"layers_to_transform": [True]}, "layers_to_transform"),
        ({"layers_to_transform": "0"}, "layers_to_transform"),
        ({"rank_pattern": {"q_proj": 0}}, "rank_pattern"),
        ({"rank_pattern": {"q_proj": 2.0}}, "rank_pattern"),
        ({"rank_pattern": {"q_proj": "4"}}, "rank_pattern"),
        ({"rank_pattern": {"(": 4}}, "rank_pattern"),
        ({"alpha_pattern": {"q_proj": -1}}, "alpha_pattern"),
        ({"alpha_pattern": {"q_proj": math.inf}}, "alpha_pattern"),
        ({"target_modules": [""]}, "target_modules"),
        ({"target_modules": ["q_proj", 3]}, "target_modules"),
        ({"target_modules": {"q_proj": 1}}, "target_modules"),
        ({"target_modules": "(q_proj"}, "target_modules"),
        ({"exclude_modules": 5}, "exclude_modules"),
        ({"exclude_modules": "[bad"}, "exclude_modules"),
        ({"modules_to_save": "lm_head"}, "modules_to_save"),
        ({"modules_to_save": ["lm_head", ""]}, "modules_to_save"),
        ({"use_rslora": "yes"}, "use_rslora"),
        ({"fan_in_fan_out": 1}, "fan_in_fan_out"),
        ({"inference_mode": "no"}, "inference_mode"),
    ],
)
def test_invalid_value_raises_one_line_config_error(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        LoraConfig(**kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert field in message


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        LoraConfig(r=0)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"task_type": "causal_lm"}, {"task_type": "CAUSAL_LM"}),
        ({"init_lora_weights": "Gaussian"}, {"init_lora_weights": "gaussian"}),
        ({"target_modules": {"v_proj", "q_proj"}}, {"target_modules": ["q_proj", "v_proj"]}),
        ({"target_modules": ("q_proj", "q_proj", "k_proj")}, {"target_modules": ["k_proj", "q_proj"]}),
        ({"layers_to_transform": (0, 2)}, {"layers_to_transform": [0, 2]}),
        ({"modules_to_save": ("lm_head",)}, {"modules_to_save": ["lm_head"]}),
        ({"layers_to_transform": [1], "layers_pattern": "layers"}, {"layers_pattern": "layers"}),
        ({"lora_dropout": 0}, {"lora_dropout": 0}),
    ],
)
def test_valid_values_are_normalised(kwargs: dict, expected: dict) -> None:
    data = LoraConfig(**kwargs).to_dict()
    assert {key: data[key] for key in expected} == expected


@pytest.mark.parametrize(("use_rslora", "expected"), [(False, 16 / 4), (True, 16 / 2)])
def test_scaling_is_alpha_over_r_or_sqrt_r(use_rslora: bool, expected: float) -> None:
    assert LoraConfig(r=4, lora_alpha=16, use_rslora=use_rslora).scaling(4, 16) == expected


def _rich_config() -> LoraConfig:
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=4,
        lora_alpha=32,
        lora_dropout=0.05,
        target_modules=["q_proj", "v_proj"],
        exclude_modules=r".*\.0\..*",
        bias="lora_only",
        modules_to_save=["lm_head"],
        init_lora_weights="gaussian",
        use_rslora=True,
        layers_to_transform=[0, 1],
        layers_pattern="layers",
        rank_pattern={"q_proj": 2},
        alpha_pattern={"v_proj": 8.0},
    )


def test_dict_json_and_file_round_trips(tmp_path: Path) -> None:
    config = _rich_config()
    assert LoraConfig.from_dict(config.to_dict()) == config
    assert DeltaConfig.from_dict(json.loads(config.to_json())) == config
    config.save(tmp_path)
    text = (tmp_path / CONFIG_NAME).read_text()
    assert text == config.to_json()
    assert list(json.loads(text)) == sorted(json.loads(text))
    assert DeltaConfig.from_pretrained(tmp_path) == config
    assert json.loads(text)["peft_type"] == "LORA"


def test_reads_an_adapter_config_written_by_peft(tmp_path: Path) -> None:
    peft.LoraConfig(
        r=4,
        lora_alpha=16,
        lora_dropout=0.1,
        target_modules=["v_proj", "q_proj"],
        task_type="CAUSAL_LM",
        rank_pattern={"q_proj": 2},
        modules_to_save=["lm_head"],
    ).save_pretrained(str(tmp_path))
    config = DeltaConfig.from_pretrained(tmp_path)
    assert isinstance(config, LoraConfig)
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 16, 0.1)
    assert config.target_modules == ["q_proj", "v_proj"]
    assert (config.task_type, config.rank_pattern, config.modules_to_save) == ("CAUSAL_LM", {"q_proj": 2}, ["lm_head"])


def test_peft_reads_an_adapter_config_written_here(tmp_path: Path) -> None:
    config = _rich_config()
    config.save(tmp_path)
    theirs = peft.LoraConfig.from_pretrained(str(tmp_path))
    for name in ("r", "lora_alpha", "lora_dropout", "bias", "use_rslora", "layers_to_transform", "rank_pattern"):
        assert getattr(theirs, name) == getattr(config, name), name
    assert set(theirs.target_modules) == set(config.target_modules)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("layer_replication", [[0, 1]]),
        ("loftq_config", {"loftq_bits": 4}),
        ("use_qalora", True),
        ("alora_invocation_tokens", [3, 4]),
        ("velora_config", {"rank": 2}),
    ],
)
def test_peft_file_with_an_unsupported_feature_is_refused(tmp_path: Path, key: str, value) -> None:
    peft.LoraConfig(r=4, target_modules=["q_proj"]).save_pretrained(str(tmp_path))
    path = tmp_path / CONFIG_NAME
    data = json.loads(path.read_text())
    assert key in data
    data[key] = value
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=rf"{key}=.*is not supported by deltatune\b") as info:
        DeltaConfig.from_pretrained(tmp_path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"peft_type": "FOURIERFT", "n_frequency": 1000}, "FOURIERFT"),
        ({"peft_type": "LORA", "r": 0}, "r=0"),
        ({"peft_type": "LORA", "init_lora_weights": "mica"}, "mica"),
        ({"peft_type": "LORA", "use_bdlora": {"target_modules_bd_a": ["q_proj"]}}, "use_bdlora"),
        ({"peft_type": "LORA", "made_up_switch": 1}, "made_up_switch"),
    ],
)
def test_from_dict_refuses_bad_dicts(data: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        DeltaConfig.from_dict(data)


def test_lora_from_dict_refuses_another_peft_type() -> None:
    with pytest.raises(ConfigError, match="peft_type='IA3'"):
        LoraConfig.from_dict({"peft_type": "IA3"})


@pytest.mark.parametrize(
    "content",
    [b"{not json", b'{"r": 4,', b"", b'["r", 4]', b"\xff\xfe\x00garbage"],
    ids=["garbage", "truncated", "empty", "not-an-object", "not-utf8"],
)
def test_unreadable_config_file_raises_config_error_naming_it(tmp_path: Path, content: bytes) -> None:
    (tmp_path / CONFIG_NAME).write_bytes(content)
    with pytest.raises(ConfigError) as info:
        DeltaConfig.from_pretrained(tmp_path)
    assert str(tmp_path / CONFIG_NAME) in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_config_file_raises_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=CONFIG_NAME):
        DeltaConfig.from_pretrained(tmp_path)


_names = st.sampled_from(["q_proj", "k_proj", "v_proj", "o_proj", "self_attn.q_proj", "mlp.up_proj", "c_attn"])
_finite_positive = st.floats(min_value=1e-6, max_value=1e6, allow_nan=False, allow_infinity=False)


@st.composite
def _valid_fields(draw) -> dict:
    fields = {
        "task_type": draw(st.sampled_from([None, *TASK_TYPES])),
        "base_model_name_or_path": draw(st.one_of(st.none(), st.text(min_size=1, max_size=12))),
        "revision": draw(st.one_of(st.none(), st.text(min_size=1, max_size=8))),
        "inference_mode": draw(st.booleans()),
        "r": draw(st.integers(min_value=1, max_value=512)),
        "lora_alpha": draw(st.one_of(st.integers(min_value=1, max_value=1024), _finite_positive)),
        "lora_dropout": draw(st.floats(min_value=0.0, max_value=0.999, allow_nan=False)),
        "exclude_modules": draw(st.one_of(st.none(), st.lists(_names, min_size=1, unique=True))),
        "bias": draw(st.sampled_from(["none", "all", "lora_only"])),
        "fan_in_fan_out": draw(st.booleans()),
        "modules_to_save": draw(st.one_of(st.none(), st.lists(st.sampled_from(["lm_head", "score"]), unique=True))),
        "init_lora_weights": draw(st.sampled_from([True, False, "gaussian"])),
        "use_rslora": draw(st.booleans()),
        "rank_pattern": draw(st.dictionaries(_names, st.integers(min_value=1, max_value=64), max_size=3)),
        "alpha_pattern": draw(st.dictionaries(_names, _finite_positive, max_size=3)),
    }
    if draw(st.booleans()):  # a regex (or all-linear), which rules out layers_to_transform
        fields["target_modules"] = draw(st.sampled_from([None, "all-linear", r".*\.(q|v)_proj", r"model\..*"]))
    else:
        fields["target_modules"] = draw(st.one_of(st.none(), st.lists(_names, min_size=1, unique=True)))
        fields["layers_to_transform"] = draw(
            st.one_of(st.none(), st.integers(min_value=0, max_value=40), st.lists(st.integers(0, 40), max_size=4))
        )
        if fields["layers_to_transform"] is not None:
            patterns = st.one_of(st.none(), st.sampled_from(["layers", "h"]), st.just(["layers", "h"]))
            fields["layers_pattern"] = draw(patterns)
    return fields


@settings(max_examples=150, deadline=None)
@given(_valid_fields())
def test_property_valid_configs_round_trip_exactly(fields: dict) -> None:
    config = LoraConfig(**fields)
    data = config.to_dict()
    assert LoraConfig.from_dict(data) == config
    assert LoraConfig.from_dict(data).to_dict() == data
    again = DeltaConfig.from_dict(json.loads(config.to_json()))
    assert again == config and again.to_json() == config.to_json()


def test_every_peft_lora_field_is_accepted_by_name() -> None:
    """Each field of peft's LoraConfig is a LoraConfig keyword here: at peft's default value it builds, never a
    TypeError."""
    import dataclasses

    ours = {f.name for f in dataclasses.fields(LoraConfig)}
    theirs = {f.name for f in dataclasses.fields(peft.LoraConfig) if f.init} - {
        "peft_type",
        "auto_mapping",
        "peft_version",
    }
    assert theirs <= ours, sorted(theirs - ours)
    for f in dataclasses.fields(peft.LoraConfig):
        if f.init and f.name in ours and f.name != "runtime_config":
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            LoraConfig(**{f.name: default})


def test_files_keep_new_keys_out_unless_set() -> None:
    """Older peft versions refuse unknown keys: the fields added after peft 0.13 are written only when set."""
    plain = LoraConfig().to_dict()
    assert "use_dora" not in plain and "target_parameters" not in plain and "lora_bias" not in plain
    dora = LoraConfig(use_dora=True).to_dict()
    assert dora["use_dora"] is True
    assert LoraConfig.from_dict(dora) == LoraConfig(use_dora=True)


def test_a_peft_written_config_reads_back_with_every_key(tmp_path: Path) -> None:
    peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True).save_pretrained(tmp_path)
    config = DeltaConfig.from_pretrained(tmp_path)
    assert isinstance(config, LoraConfig) and config.use_dora and config.r == 4
