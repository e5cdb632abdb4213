"""What deltatune assumes about other libraries' private behaviour (``deltatune.compat``): each test fails
loudly when an upgrade changes it, naming what to revisit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deltatune.compat.bitsandbytes import (
    canonical,
    is_packed_for_cpu,
    remember_canonical,
    restore_canonical,
)

bnb = pytest.importorskip("bitsandbytes")


def linear_4bit(quant_type: str, double: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(128, 96, compute_dtype=torch.float32, quant_type=quant_type, compress_statistics=double)
    layer.load_state_dict(torch.nn.Linear(128, 96).state_dict())
    return layer.to("cpu")


def repack(layer: torch.nn.Module) -> None:
    """bitsandbytes' own trigger: an eval-mode forward without gradients, with its CPU kernel switched on."""
    layer.support_avx512bf16_for_cpu = True  # the switch its forward reads (set from the CPU's flags)
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(2, 128))


CASES = [("nf4", False), ("fp4", False), ("nf4", True)]


@pytest.mark.parametrize(("quant_type", "double"), CASES)
def test_bitsandbytes_repacks_a_4bit_weight_on_an_eval_forward_and_canonical_reads_it_back(quant_type, double):
    layer = linear_4bit(quant_type, double)
    weight = layer.weight
    codes, scales = weight.data.clone(), weight.quant_state.absmax.clone()
    remember_canonical(weight)
    repack(layer)
    if not is_packed_for_cpu(weight):
        pytest.fail("bitsandbytes no longer repacks 4-bit weights on an eval forward: compat.bitsandbytes is moot")
    assert weight.data.shape == (96, 64) and weight.quant_state.absmax.dtype == torch.bfloat16  # the packed layout
    read_codes, memo = canonical(weight)
    assert torch.equal(read_codes, codes), "bitsandbytes' CPU packing of the codes changed: update unpack_codes"
    assert torch.equal(memo.absmax, scales) and memo.nested == double
    assert is_packed_for_cpu(weight)  # reading left it as bitsandbytes has it
    restore_canonical(weight)
    assert not is_packed_for_cpu(weight) and torch.equal(weight.data, codes)
    assert torch.equal(weight.quant_state.absmax, scales) and weight.quant_state.nested == double


@pytest.mark.parametrize(("quant_type", "double"), CASES)
def test_bitsandbytes_own_inverse_still_moves_the_scales(quant_type, double):
    """Why deltatune keeps the scales itself: bitsandbytes' inverse (its save and .cuda() call it) leaves them
    transposed and bf16 (re-quantised under double quantisation). When this fails, bitsandbytes fixed it: docs/qlora.md
    says what bitsandbytes does and needs the update."""
    from bitsandbytes.functional import (
        _convert_weight_packed_for_cpu_inverse,
        dequantize_4bit,
    )

    layer = linear_4bit(quant_type, double)
    before = dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    repack(layer)
    codes, state = _convert_weight_packed_for_cpu_inverse(layer.weight.data, layer.weight.quant_state)
    assert (dequantize_4bit(codes, state) - before).abs().max() > 0


def test_a_weight_repacked_before_deltatune_saw_it_is_read_with_its_bf16_scales_and_a_warning(caplog):
    layer = linear_4bit("nf4", False)
    expected = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    repack(layer)  # no remember_canonical first
    with caplog.at_level("WARNING", logger="deltatune.compat.bitsandbytes"):
        codes, scales = canonical(layer.weight)
    assert "rounded to bf16" in caplog.text
    from deltatune.kernels.base_weight import dense

    read = dense(layer.weight, torch.float32)
    assert (read - expected).abs().max() <= expected.abs().max() * 2**-8  # bf16 scales: relative error <= 2^-9


def test_bitsandbytes_cannot_repack_a_layer_narrower_than_a_block_so_deltatune_keeps_it_canonical():
    from deltatune.compat.bitsandbytes import avoid_failing_repacks

    layer = bnb.nn.Linear4bit(32, 32, compute_dtype=torch.float32, quant_type="nf4").to("cpu")
    with pytest.raises(RuntimeError, match="invalid for input"):  # when this passes, bitsandbytes packs these now
        repack(layer)
    layer = bnb.nn.Linear4bit(32, 32, compute_dtype=torch.float32, quant_type="nf4").to("cpu")
    wide = bnb.nn.Linear4bit(128, 96, compute_dtype=torch.float32, quant_type="nf4").to("cpu")
    model = torch.nn.Sequential(layer, wide)
    model.apply(lambda m: setattr(m, "support_avx512bf16_for_cpu", True) if hasattr(m, "compute_dtype") else None)
    avoid_failing_repacks(model)
    assert not layer.support_avx512bf16_for_cpu and wide.support_avx512bf16_for_cpu
    model.eval()
    with torch.no_grad():
        layer(torch.randn(2, 32))
    assert not is_packed_for_cpu(layer.weight)


# -- torch ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_onednn_packed_linear_computes_f_linear_where_the_cpu_packs_its_dtype(dtype):
    """fp32 packs on every x86 CPU; bf16 only on one with AVX-512 BW/VL/DQ or AVX-NE-CONVERT: where ``onednn_packs``
    says no, packing must indeed fail (so the packed path leaves those weights alone)."""
    from deltatune.compat.torch import onednn_linear, onednn_pack, onednn_packing_available, onednn_packs

    assert onednn_packing_available()  # the x86 CPU wheels the project installs have oneDNN
    assert onednn_packs(torch.float32)
    torch.manual_seed(0)
    weight, bias = torch.randn(48, 32, dtype=dtype), torch.randn(48, dtype=dtype)
    if not onednn_packs(dtype):
        with pytest.raises(RuntimeError):
            onednn_linear(torch.randn(2, 32, dtype=dtype), onednn_pack(weight), None)
        return
    packed = onednn_pack(weight)
    inputs = [torch.randn(5, 32), torch.randn(2, 3, 32), torch.randn(32, 6).t(), torch.randn(2, 7, 32)[:, 1:4]]
    for x in inputs:  # 2-D, 3-D, transposed and sliced inputs
        x = x.to(dtype)
        for b in (None, bias):
            expected = F.linear(x.float(), weight.float(), None if b is None else b.float())
            torch.testing.assert_close(onednn_linear(x, packed, b).float(), expected, atol=1e-4, rtol=2e-2)


def test_has_hooks_sees_every_kind_of_hook_torch_keeps():
    from deltatune.compat.torch import has_hooks

    layer = torch.nn.Linear(2, 2)
    assert not has_hooks(layer)
    registrations = [
        lambda: layer.register_forward_hook(lambda *a: None),
        lambda: layer.register_forward_pre_hook(lambda *a: None),
        lambda: layer.register_full_backward_hook(lambda *a: None),
        lambda: layer.register_full_backward_pre_hook(lambda *a: None),
        lambda: torch.nn.modules.module.register_module_forward_hook(lambda *a: None),
        lambda: torch.nn.modules.module.register_module_forward_pre_hook(lambda *a: None),
        lambda: torch.nn.modules.module.register_module_full_backward_hook(lambda *a: None),
        lambda: torch.nn.modules.module.register_module_full_backward_pre_hook(lambda *a: None),
    ]
    for register in registrations:  # fails when torch keeps a kind of hook somewhere deltatune does not look
        handle = register()
        assert has_hooks(layer), handle
        handle.remove()
        assert not has_hooks(layer)
    layer.forward = lambda x: x
    assert has_hooks(layer)


def test_hook_registrations_count_every_kind_of_hook_torch_keeps():
    """What a forward's set-up kept on the strength of "no hooks here" is redone when this count moves."""
    from deltatune.compat.torch import hook_registrations

    layer = torch.nn.Linear(2, 2)
    registrations = [
        lambda: layer.register_forward_hook(lambda *a: None),
        lambda: layer.register_forward_pre_hook(lambda *a: None),
        lambda: layer.register_full_backward_hook(lambda *a: None),
        lambda: torch.nn.modules.module.register_module_forward_hook(lambda *a: None),
        lambda: torch.nn.modules.module.register_module_forward_pre_hook(lambda *a: None),
    ]
    for register in registrations:
        before = hook_registrations()
        register().remove()
        assert hook_registrations() > before


# -- transformers -------------------------------------------------------------------------------------------------
GATED_MLPS = [
    ("llama", "LlamaMLP"),
    ("mistral", "MistralMLP"),
    ("qwen2", "Qwen2MLP"),
    ("qwen3", "Qwen3MLP"),
    ("gemma", "GemmaMLP"),
    ("smollm3", "SmolLM3MLP"),
]


@pytest.mark.parametrize(("family", "name"), GATED_MLPS)
def test_the_gated_mlps_of_common_decoders_are_recognised(family, name):
    """When this fails, transformers rewrote that MLP's forward: the fused MLP kernel no longer applies to it."""
    import importlib

    from deltatune.compat.transformers import forward_input_name
    from deltatune.tuners.lora.mlp import _GATED_EXPRESSION

    cls = getattr(importlib.import_module(f"transformers.models.{family}.modeling_{family}"), name)
    assert forward_input_name(cls, _GATED_EXPRESSION) == "x"


@pytest.mark.parametrize(("key", "name"), [("silu", "silu"), ("gelu", "gelu"), ("gelu_pytorch_tanh", "gelu_tanh")])
def test_transformers_activations_are_named(key, name):
    from transformers.activations import ACT2FN

    from deltatune.compat.transformers import activation_name

    assert activation_name(ACT2FN[key]) == name


def test_the_trainer_accepts_a_quantised_model_once_adapters_are_marked():
    from transformers.trainer_utils import validate_quantization_for_training

    from deltatune.compat.transformers import allow_training_quantized

    class Quantizer:
        is_trainable = True

    model = torch.nn.Linear(2, 2)
    model.is_quantized, model.hf_quantizer = True, Quantizer()
    with pytest.raises(ValueError, match="purely quantized"):
        validate_quantization_for_training(model)
    allow_training_quantized(model)
    validate_quantization_for_training(model)


# -- the fused paths say when they fall back ------------------------------------------------------------------------
def test_a_lora_layer_off_the_fused_path_says_why_once(caplog):
    from deltatune import LoraConfig, get_delta_model
    from deltatune.tuners.lora import fallback

    fallback._said.clear()
    model = get_delta_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), LoraConfig(r=2, target_modules=["0"]))
    from deltatune.tuners.lora.layer import LoraLinear

    next(m for m in model.modules() if isinstance(m, LoraLinear)).base_layer.register_forward_hook(lambda *a: None)
    model.train()
    with caplog.at_level("INFO", logger="deltatune.tuners.lora"):
        model(torch.randn(2, 4))
        model(torch.randn(2, 4))
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "LoRA on Linear trains on the plain (unfused) path: its base layer has hooks (or a patched forward)"
    ]


def test_an_unrecognised_gated_mlp_says_so(caplog):
    from deltatune import LoraConfig, get_delta_model
    from deltatune.tuners.lora import fallback

    class OddMlp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = (torch.nn.Linear(4, 4) for _ in range(3))
            self.act_fn = torch.nn.SiLU()

        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) + self.up_proj(x))  # a sum: not the gated product

    fallback._said.clear()
    with caplog.at_level("INFO", logger="deltatune.tuners.lora"):
        get_delta_model(torch.nn.Sequential(OddMlp()), LoraConfig(r=2, target_modules="all-linear"))
    assert any("the MLP OddMlp" in r.getMessage() for r in caplog.records)


def test_the_command_line_shows_a_fallback_line_once(capsys):
    from deltatune.cli.main import _show_library_log
    from deltatune.tuners.lora import fallback

    _show_library_log()
    _show_library_log()  # one handler, however often commands run in one process
    fallback._said.clear()
    fallback.log_fallback("LoRA on Linear4bit", "its input is torch.float32 and its weight computes in torch.bfloat16")
    err = capsys.readouterr().err
    assert err == (
        "deltatune: LoRA on Linear4bit trains on the plain (unfused) path: its input is torch.float32 and its "
        "weight computes in torch.bfloat16\n"
    )


def test_a_dynamic_cache_is_read_through_its_layers_and_a_buffered_cache_takes_new_columns_in_place():
    import inspect

    from transformers import LlamaForCausalLM

    from deltatune.compat.transformers import CACHE, buffered_cache, cache_tensors
    from tiny_models import tiny_llama

    model = tiny_llama().eval()
    assert CACHE in inspect.signature(LlamaForCausalLM.forward).parameters
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        whole = model(ids).logits[0, -2:]
        pairs = cache_tensors(getattr(model(ids[:, :3], use_cache=True), CACHE))
        assert len(pairs) == model.config.num_hidden_layers and pairs[0][0].shape[2] == 3
        buffers = []
        for keys, values in pairs:
            room = torch.full_like(keys[:, :, :2], float("nan"))  # unused columns must never be read
            buffers.append((torch.cat([keys, room], dim=2), torch.cat([values, room], dim=2)))
        cache = buffered_cache(buffers, 3)
        steps = []
        for column in (3, 4):
            step = model(
                ids[:, column : column + 1], position_ids=torch.tensor([[column]]), use_cache=True, **{CACHE: cache}
            )
            steps.append(step.logits[0, -1])
        assert cache_tensors(cache)[0][0].data_ptr() == buffers[0][0].data_ptr()  # the same storage, widened
        with pytest.raises(ValueError, match="cannot take columns 5..6"):
            model(ids[:, :1], position_ids=torch.tensor([[5]]), use_cache=True, **{CACHE: cache})
    torch.testing.assert_close(torch.stack(steps), whole, atol=1e-5, rtol=0)


def test_logits_to_keep_is_found_through_a_wrapper_and_keeps_the_last_position():
    import deltatune
    from deltatune.compat.transformers import last_logits_only
    from tiny_models import tiny_llama

    model = tiny_llama().eval()
    wrapped = deltatune.get_delta_model(tiny_llama(), deltatune.LoraConfig(r=2, target_modules=["q_proj"]))
    assert last_logits_only(model) == last_logits_only(wrapped) == {"logits_to_keep": 1}
    assert last_logits_only(torch.nn.Linear(2, 2)) == {}
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        last = model(ids, **last_logits_only(model)).logits
    assert last.shape[1] == 1
    torch.testing.assert_close(last[0, -1], model(ids).logits[0, -1])


def _decoder(family: str, **overrides):
    """A tiny seeded causal LM of ``family`` at the tiny decoders' sizes."""
    import transformers

    from tiny_models import DECODER_SIZES

    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel),
    }[family]
    sizes = {} if family == "gpt2" else {**DECODER_SIZES, "attn_implementation": "sdpa"}
    torch.manual_seed(0)
    return model_class(config_class(**{**sizes, **overrides})).eval()


LEAN = {
    "llama": {},
    "llama, biased attention, eager": {"attention_bias": True, "attn_implementation": "eager"},
    "qwen2": {},
    "mistral": {"sliding_window": None},
}


@pytest.mark.parametrize("joined", [False, True], ids=["module by module", "joined on packed weights"])
@pytest.mark.parametrize("case", LEAN)
def test_a_prefill_and_a_decoding_step_through_the_layers_equal_the_models_forward(case, joined):
    """``lean_forward`` on left-padded rows, adapters on some rows (one targeting only q_proj and down_proj): a
    prefill's last logits and its real tokens' keys and values equal the model's forward; then a decoding step's
    logits and new columns equal its forward over a buffered cache. ``joined``: on packed weights, q/k/v and
    gate/up each as one product (``tuners/lora/joined.py``)."""
    import copy

    import deltatune
    from deltatune.compat.transformers import (
        CACHE,
        buffered_cache,
        cache_tensors,
        empty_cache,
        lean_decoder,
        lean_forward,
        projections,
    )
    from deltatune.kernels.packed_linear import PackedWeights
    from deltatune.tuners.lora.joined import JoinedProjections

    family = case.split(",")[0]
    model = deltatune.get_delta_model(
        _decoder(family, **LEAN[case]), deltatune.LoraConfig(r=2, target_modules="all-linear")
    )
    model.add_adapter("other", deltatune.LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.nn.init.normal_(param, std=0.1)
        elif "norm" in name:  # each norm its own weights (they start at one)
            torch.nn.init.normal_(param, mean=1, std=0.3)
    model.eval()
    causal_lm = model.base_model
    assert lean_decoder(causal_lm)
    packed = PackedWeights(model) if joined else None
    ids = torch.tensor([[0, 0, 5, 6, 7], [3, 4, 5, 6, 9], [0, 8, 1, 2, 3]])
    mask = (torch.arange(5) >= torch.tensor([[2], [0], [1]])).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    step = dict(input_ids=torch.tensor([[11], [12], [13]]), position_ids=mask.sum(-1, keepdim=True))
    wide = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1)

    def lean(*args):
        if not joined:
            return lean_forward(causal_lm, *args)
        project = JoinedProjections(projections(causal_lm), packed)
        with packed.applied(project.groups):
            return lean_forward(causal_lm, *args, project)

    with torch.no_grad(), model.adapter_rows(["default", None, "other"]):
        prefill = model(ids, attention_mask=mask, position_ids=positions, use_cache=True)
        pairs = cache_tensors(getattr(prefill, CACHE))
        lean_pairs = empty_cache(causal_lm, 3, 5)
        torch.testing.assert_close(lean(ids, positions, mask, lean_pairs, 0), prefill.logits[:, -1])
        real = mask.bool()
        for (k, v), (k2, v2) in zip(lean_pairs, pairs):  # a padding column's key is never read
            torch.testing.assert_close(k.transpose(1, 2)[real], k2.transpose(1, 2)[real], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(v.transpose(1, 2)[real], v2.transpose(1, 2)[real], atol=1e-5, rtol=1e-5)
        room = [(torch.cat([k, k[:, :, :2] * 0], 2), torch.cat([v, v[:, :, :2] * 0], 2)) for k, v in pairs]
        theirs, ours = copy.deepcopy(room), copy.deepcopy(room)
        expected = model(**step, attention_mask=wide, use_cache=True, **{CACHE: buffered_cache(theirs, 5)}).logits
        got = lean(step["input_ids"], step["position_ids"], wide, ours, 5)
    if joined:  # the joinable layers ran from packs of their groups, not packs of their own
        groups = JoinedProjections(projections(causal_lm), packed).groups
        assert len(groups) == 4 * len(causal_lm.model.layers) and all(group in packed._packs for group in groups)
        assert not any(layer in packed._packs for group in groups for layer in group)
    torch.testing.assert_close(got, expected[:, -1], atol=1e-5, rtol=1e-5)
    for (k, v), (k2, v2) in zip(ours, theirs):
        torch.testing.assert_close(k[:, :, :6], k2[:, :, :6])
        torch.testing.assert_close(v[:, :, :6], v2[:, :, :6])


def test_only_full_attention_decoders_without_hooks_decode_through_their_layers():
    from deltatune.compat.transformers import lean_decoder

    assert lean_decoder(_decoder("llama")) and lean_decoder(_decoder("mistral", sliding_window=None))
    assert not lean_decoder(_decoder("gpt2", n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    assert not lean_decoder(_decoder("mistral"))  # a 4096-token sliding window
    windowed = _decoder("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=0)
    assert not lean_decoder(windowed)
    hooked = _decoder("llama")
    handle = hooked.model.layers[1].self_attn.register_forward_hook(lambda *args: None)
    assert not lean_decoder(hooked)
    handle.remove()
    assert lean_decoder(hooked)
