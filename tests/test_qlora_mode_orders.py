"""A quantised base gives the same numbers in every order of train / eval / save / load / merge.

bitsandbytes repacks a 4-bit weight for its CPU inference kernel on the first eval-mode, no-grad forward
(block scales transposed and rounded to bf16) and its own inverse leaves the scales scrambled; an adapter
over such a base must still train, save and merge on the weight as it was quantised
(``deltatune.compat.bitsandbytes``). Each order of modes is its own test, for nf4, fp4, nf4 with double
quantisation and int8, LoRA and DoRA. References: peft where it is right (training mode; eval mode for
LoRA), and a plain fp32 model holding the dequantised weights where it is not (peft's DoRA in eval mode
over a repacked 4-bit weight takes its norm from the packed storage).
"""

from __future__ import annotations

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

from deltatune import DeltaModel, LoraConfig, get_delta_model
from deltatune.compat.bitsandbytes import is_packed_for_cpu
from deltatune.kernels.base_weight import dense, is_quantized
from quantised_models import quantised
from tiny_models import perturb_trainable, token_inputs

pytestmark = [
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:.*re-quantises its weight:UserWarning"),
]

QUANTISATIONS = ["nf4", "fp4", "nf4-double", "int8"]
VARIANTS = {"lora": False, "dora": True}
EVALUATIONS = 3


@pytest.fixture(params=QUANTISATIONS)
def mode(request) -> str:
    return request.param


@pytest.fixture(params=list(VARIANTS))
def variant(request) -> str:
    return request.param


def adapter_config(variant: str) -> LoraConfig:
    return LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, use_dora=VARIANTS[variant]
    )


def adapted(folder, mode: str, variant: str) -> DeltaModel:
    """A deltatune model over a fresh quantised load, with a seeded random adapter (the same every call)."""
    torch.manual_seed(0)
    model = get_delta_model(quantised(folder, mode), adapter_config(variant))
    perturb_trainable(model)
    return model


def train_logits(model) -> torch.Tensor:
    model.train()
    with torch.no_grad():
        return model(**token_inputs()).logits


def eval_logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():  # eval mode without gradients: where bitsandbytes repacks a 4-bit weight on CPU
        return model(**token_inputs()).logits


def gradients(model) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    model(**token_inputs()).logits.square().mean().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def evaluate(model, times: int = EVALUATIONS) -> None:
    for _ in range(times):
        eval_logits(model)
    repacking = [m for m in model.modules() if getattr(m, "support_avx512bf16_for_cpu", False)]  # such CPUs only
    assert all(is_packed_for_cpu(m.weight) for m in repacking), "the evaluation did not take the CPU kernel"


def dequantised_reference(folder, quantised_model, adapter_dir) -> peft.PeftModel:
    """peft over a plain fp32 model whose linear weights are the quantised model's, dequantised."""
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    for name, module in quantised_model.named_modules():
        weight = getattr(module, "weight", None)
        if weight is not None and is_quantized(weight):
            plain.get_submodule(name).weight.data = dense(weight, torch.float32)
    return peft.PeftModel.from_pretrained(plain, adapter_dir)


# -- orders ------------------------------------------------------------------------------------------------
def test_train_eval_train_gives_the_same_training_logits_and_gradients(llama_dir, mode, variant):
    model = adapted(llama_dir, mode, variant)
    logits, grads = train_logits(model), gradients(model)
    evaluate(model)
    torch.testing.assert_close(train_logits(model), logits, atol=0, rtol=0)
    after = gradients(model)
    for name, grad in grads.items():
        torch.testing.assert_close(after[name], grad, atol=0, rtol=0, msg=f"gradient of {name}")


def test_eval_first_then_train_equals_a_model_never_evaluated(llama_dir, mode, variant):
    evaluated, fresh = adapted(llama_dir, mode, variant), adapted(llama_dir, mode, variant)
    evaluate(evaluated)
    torch.testing.assert_close(train_logits(evaluated), train_logits(fresh), atol=0, rtol=0)


def test_eval_gives_the_same_logits_every_time(llama_dir, mode, variant):
    model = adapted(llama_dir, mode, variant)
    first = eval_logits(model)
    train_logits(model)  # back to training mode (4-bit: the canonical layout again), then evaluate again
    torch.testing.assert_close(eval_logits(model), first, atol=0, rtol=0)


def test_an_adapter_saved_after_an_evaluation_reloads_to_the_same_numbers(llama_dir, mode, variant, tmp_path):
    model = adapted(llama_dir, mode, variant)
    logits, evaluated = train_logits(model), eval_logits(model)
    model.save_pretrained(tmp_path)
    reloaded = DeltaModel.from_pretrained(quantised(llama_dir, mode), tmp_path)
    torch.testing.assert_close(train_logits(reloaded), logits, atol=0, rtol=0)
    torch.testing.assert_close(eval_logits(reloaded), evaluated, atol=0, rtol=0)


def test_a_merge_after_an_evaluation_equals_a_merge_before_it(llama_dir, mode, variant):
    evaluated, fresh = adapted(llama_dir, mode, variant), adapted(llama_dir, mode, variant)
    evaluate(evaluated)
    merged, reference = evaluated.merge_and_unload(), fresh.merge_and_unload()
    layers = [(n, m) for n, m in reference.named_modules() if is_quantized(getattr(m, "weight", None))]
    assert len(layers) == 14
    for name, layer in layers:
        torch.testing.assert_close(dense(merged.get_submodule(name).weight), dense(layer.weight), atol=0, rtol=0)
    torch.testing.assert_close(train_logits(merged), train_logits(reference), atol=0, rtol=0)


def test_training_after_evaluations_matches_the_dequantised_fp32_reference(llama_dir, mode, variant, tmp_path):
    model = adapted(llama_dir, mode, variant)
    model.save_pretrained(tmp_path)
    evaluate(model)
    reference = dequantised_reference(llama_dir, quantised(llama_dir, mode), tmp_path)
    torch.testing.assert_close(train_logits(model), train_logits(reference), atol=1e-5, rtol=0)


def test_training_after_evaluations_matches_peft_before_any(llama_dir, mode, variant, tmp_path):
    model = adapted(llama_dir, mode, variant)
    model.save_pretrained(tmp_path)
    evaluate(model)
    peft_side = peft.PeftModel.from_pretrained(quantised(llama_dir, mode), tmp_path)
    torch.testing.assert_close(train_logits(model), train_logits(peft_side), atol=1e-5, rtol=0)


def test_eval_logits_match_peft_where_peft_is_right(llama_dir, mode, variant, tmp_path):
    """LoRA: peft's eval forward is bitsandbytes' kernel plus the LoRA term, as here. DoRA over a repacked 4-bit
    weight: peft takes the norm from the packed storage, so the reference is the dequantised fp32 model (within
    what bitsandbytes' bf16-scaled CPU kernel changes). DoRA over int8 fails in peft's eval on CPU."""
    model = adapted(llama_dir, mode, variant)
    model.save_pretrained(tmp_path)
    logits = eval_logits(model)
    if variant == "lora":
        peft_side = peft.PeftModel.from_pretrained(quantised(llama_dir, mode), tmp_path)
        torch.testing.assert_close(logits, eval_logits(peft_side), atol=1e-5, rtol=0)
    else:
        reference = dequantised_reference(llama_dir, quantised(llama_dir, mode), tmp_path)
        expected = eval_logits(reference)
        assert (logits - expected).abs().max() < 0.02 * expected.abs().max()


def test_a_prepared_base_evaluates_with_peft_numbers(llama_dir, mode, tmp_path):
    """``prepare_for_kbit_training`` (what ``deltatune train`` runs) keeps bitsandbytes' eval kernel: a peft
    adapter loaded over a prepared base gives peft's eval logits (switching the kernel off, as it once did,
    moved SmolLM2's eval logits 0.6 away from peft's)."""
    from deltatune.runtime.quantization import prepare_for_kbit_training

    peft_side = peft.get_peft_model(quantised(llama_dir, mode), peft.LoraConfig(**adapter_config("lora").to_dict()))
    perturb_trainable(peft_side)
    peft_side.save_pretrained(tmp_path)
    delta_side = DeltaModel.from_pretrained(prepare_for_kbit_training(quantised(llama_dir, mode)), tmp_path)
    torch.testing.assert_close(eval_logits(delta_side), eval_logits(peft_side), atol=1e-5, rtol=0)
