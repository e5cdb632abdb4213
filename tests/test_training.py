"""A few dozen AdamW steps on tiny models: the loss falls, and only the adapter's parameters move."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from deltatune import LoraConfig, get_delta_model
from test_model_semantics import single_thread  # noqa: F401  (autouse fixture)
from tiny_models import VOCAB, token_inputs

BATCH = token_inputs(batch=4, length=16, seed=3)["input_ids"]
# tiny_models keeps transformers' init (std 0.02): with a frozen head that small behind the final
# norm, the logits are bounded near zero and no adapter can lower the loss much. A wider init
# gives the adapter room to memorise the batch.
INIT_STD = 0.2


def tiny(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "llama":
        config = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            initializer_range=INIT_STD,
            attn_implementation="eager",
        )
        return LlamaForCausalLM(config).eval()
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        initializer_range=INIT_STD,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
    )
    return GPT2LMHeadModel(config).eval()


def train(model: nn.Module, steps: int = 30, lr: float = 1e-2) -> list[float]:
    """``steps`` AdamW steps on the fixed batch; the losses before each step."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=BATCH, labels=BATCH).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=BATCH).logits


CASES = [
    ("llama", {"target_modules": "all-linear"}),
    ("llama", {"target_modules": "all-linear", "lora_dropout": 0.1, "use_rslora": True}),
    ("llama", {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]}),
    ("gpt2", {"target_modules": "all-linear"}),  # Conv1D, fan_in_fan_out
    ("gpt2", {"target_modules": ["c_attn", "c_fc"], "bias": "lora_only"}),
    ("gpt2", {"target_modules": ["c_attn"], "bias": "all"}),
]


@pytest.mark.parametrize(("kind", "kwargs"), CASES, ids=[f"{kind}-{kwargs}" for kind, kwargs in CASES])
def test_training_lowers_the_loss_and_moves_only_adapter_parameters(kind: str, kwargs: dict) -> None:
    model = get_delta_model(tiny(kind), LoraConfig(r=8, lora_alpha=16, **kwargs))
    adapter = {id(p) for p in model.adapter_state("default").values()}
    assert adapter == {id(p) for p in model.parameters() if p.requires_grad}
    frozen_before = {name: p.detach().clone() for name, p in model.named_parameters() if id(p) not in adapter}
    adapter_before = {name: p.detach().clone() for name, p in model.named_parameters() if id(p) in adapter}

    losses = train(model)
    assert losses[-1] < 0.5 * losses[0], losses

    for name, param in model.named_parameters():
        if id(param) in adapter:
            assert param.grad is not None, name
        else:
            assert param.grad is None, f"{name} received a gradient"
            assert torch.equal(param, frozen_before[name]), f"{name} changed"
    moved = [name for name, before in adapter_before.items() if not torch.equal(before, model.get_parameter(name))]
    assert moved == list(adapter_before)

    trained = logits(model)
    if model.peft_config["default"].bias == "none":  # trained biases stay in place when disabled, as in peft
        with model.disable_adapter():
            assert torch.equal(logits(model), logits(tiny(kind)))  # base weights and modules intact
    plain = model.merge_and_unload()
    assert torch.allclose(logits(plain), trained, atol=1e-4)


def test_modules_to_save_trains_a_copy_and_keeps_the_original() -> None:
    model = get_delta_model(tiny("llama"), LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    wrapper = model.base_model.lm_head
    original = wrapper.original_module.weight.detach().clone()
    losses = train(model)
    assert losses[-1] < 0.5 * losses[0]
    assert wrapper.original_module.weight.grad is None
    assert torch.equal(wrapper.original_module.weight, original)
    copy = wrapper.modules_to_save["default"].weight
    assert copy.grad is not None and not torch.allclose(copy, original, atol=1e-3)
    assert copy.data_ptr() != wrapper.original_module.weight.data_ptr()
