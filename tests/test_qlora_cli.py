"""QLoRA from the CLI: ``quantization=nf4|fp4|int8`` trains over a quantised base (prepared automatically),
``merge --dtype`` writes a full-precision model from that adapter, and each misuse is a one-line error."""

from __future__ import annotations

import contextlib
import importlib.util
import io
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from deltatune import DeltaModel
from deltatune.cli.main import main
from deltatune.errors import ConfigError
from deltatune.runtime.loading import load_causal_lm
from deltatune.runtime.quantization import (
    base_memory,
    check_quantization,
    loading_options,
    prepare_for_kbit_training,
)
from deltatune.train.config import TrainConfig
from deltatune.train.run import run_training
from deltatune.tuners.lora.quantized import LoraQuantLinear
from sft_helpers import TINY_RUN, save_tiny_chat_model, write_arithmetic_jsonl

bnb = pytest.importorskip("bitsandbytes")

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("qlora")
    return {
        "root": root,
        "model": save_tiny_chat_model(root / "model"),
        "data": write_arithmetic_jsonl(root / "d.jsonl"),
    }


@pytest.fixture(scope="module")
def nf4_run(files):
    keys = {
        **TINY_RUN,
        "model": str(files["model"]),
        "data": str(files["data"]),
        "quantization": "nf4",
        "output_dir": str(files["root"] / "nf4"),
    }
    return run_training(TrainConfig.from_dict(keys), log=lambda line: None)


def test_a_quantised_run_trains_and_its_adapter_reloads(nf4_run):
    assert nf4_run.eval_after["eval_loss"] < nf4_run.eval_before["eval_loss"]
    assert nf4_run.reloaded_max_logit_diff < 1e-5
    assert nf4_run.merged_max_logit_diff is None  # no merge check: merging would re-quantise the 4-bit base


def test_the_adapter_of_a_quantised_run_is_fp32_lora_over_4bit_layers(files, nf4_run):
    model = load_causal_lm(files["model"], quantization="nf4")
    delta = DeltaModel.from_pretrained(model, nf4_run.adapter_dir)
    layers = [m for m in delta.modules() if isinstance(m, LoraQuantLinear)]
    assert layers and all(type(m.base_layer) is bnb.nn.Linear4bit for m in layers)
    assert all(m.lora_A["default"].weight.dtype == torch.float32 for m in layers)


def test_merge_writes_a_full_precision_model_from_a_quantised_run(files, nf4_run, tmp_path):
    out = tmp_path / "merged"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["merge", nf4_run.adapter_dir, str(out), "--model", str(files["model"]), "--dtype", "bf16"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert getattr(merged.config, "quantization_config", None) is None
    # the same adapter over the fp32 base, merged by hand
    reference = DeltaModel.from_pretrained(load_causal_lm(files["model"]), nf4_run.adapter_dir).merge_and_unload()
    torch.testing.assert_close(
        merged.model.layers[1].mlp.down_proj.weight, reference.model.layers[1].mlp.down_proj.weight.bfloat16()
    )


def test_merge_into_a_quantised_model_folder_is_refused(files, nf4_run, tmp_path, capsys):
    quantised = load_causal_lm(files["model"], quantization="nf4")
    quantised.save_pretrained(tmp_path / "nf4-model")
    capsys.readouterr()
    assert main(["merge", nf4_run.adapter_dir, str(tmp_path / "out"), "--model", str(tmp_path / "nf4-model")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "quantised (nf4)" in lines[0] and "full-precision base" in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_quantising_a_quantised_model_differently_is_refused(files, tmp_path):
    load_causal_lm(files["model"], quantization="int8").save_pretrained(tmp_path / "int8-model")
    with pytest.raises(ConfigError, match="already quantised as int8.*cannot be quantised again as nf4"):
        load_causal_lm(tmp_path / "int8-model", quantization="nf4")
    assert isinstance(
        load_causal_lm(tmp_path / "int8-model", quantization="int8").model.layers[0].mlp.up_proj, bnb.nn.Linear8bitLt
    )


def test_bad_quantization_values_and_devices_fail_in_one_line(monkeypatch):
    with pytest.raises(ConfigError, match="quantization='nf8' is unknown; use one of none, nf4, fp4, int8"):
        TrainConfig.from_dict({"quantization": "nf8"})
    with pytest.raises(ConfigError, match="does not run on mps"):
        check_quantization("nf4", "mps")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"needs bitsandbytes: pip install deltatune\[qlora\]"):
        check_quantization("nf4")
    check_quantization("none")  # no bitsandbytes needed


def test_loading_options_follow_the_mode():
    class Plain:
        quantization_config = None

    options = loading_options("fp4", Plain(), torch.bfloat16)["quantization_config"]
    assert isinstance(options, BitsAndBytesConfig) and options.bnb_4bit_quant_type == "fp4"
    assert options.bnb_4bit_compute_dtype == torch.bfloat16
    assert loading_options("int8", Plain())["quantization_config"].load_in_8bit
    assert loading_options("none", Plain()) == {}


def test_prepare_for_kbit_training_freezes_upcasts_and_feeds_input_gradients(files):
    model = load_causal_lm(files["model"], dtype=torch.bfloat16, quantization="nf4")
    prepare_for_kbit_training(model, gradient_checkpointing=True)
    assert not any(p.requires_grad for p in model.parameters())
    assert model.model.norm.weight.dtype == torch.float32 and model.model.embed_tokens.weight.dtype == torch.float32
    assert model.is_gradient_checkpointing
    embedded = model.get_input_embeddings()(torch.tensor([[1, 2]]))
    assert embedded.requires_grad


def test_inspect_shows_the_base_memory_in_each_mode(files):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["inspect", str(files["model"])]) == 0
    line = next(line for line in out.getvalue().splitlines() if line.startswith("base weights by quantization="))
    assert all(f"{mode} " in line for mode in ("none", "nf4", "fp4", "int8"))
    model = load_causal_lm(files["model"])
    linear = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    saved = base_memory(model, "none") - base_memory(model, "nf4")
    assert saved == linear * 4 - (linear // 2 + linear // 64 * 4)  # 4 bytes -> half a byte + a scale per 64


def test_the_bench_quant_section_measures_every_base(capsys):
    from deltatune.bench import step as bench
    from deltatune.bench.options import shape_of

    args = [
        "--device",
        "cpu",
        "--shapes",
        "tiny",
        "--sections",
        "quant",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--no-isolate",
    ]
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    assert all(f"| {base} |" in out for base in bench.QUANT_BASES), out
    shape = shape_of("tiny")
    linear = shape.layers * (
        2 * shape.hidden**2 + 2 * shape.hidden * shape.hidden // 2 + 3 * shape.hidden * shape.intermediate
    )
    # the bytes themselves: nf4 is half a byte a weight plus one fp32 scale per 64
    fp32 = bench.quant_job(shape, "fp32", "cpu", 1, 0, 4)
    nf4 = bench.quant_job(shape, "nf4", "cpu", 1, 0, 4)
    assert fp32["linear_mib"] * bench.MIB == linear * 4
    assert nf4["linear_mib"] * bench.MIB >= linear // 2 + linear // 64 * 4
    assert nf4["linear_mib"] < 0.2 * fp32["linear_mib"]
