"""trainable_token_indices (only some embedding rows train) against peft 0.21, on tiny Llamas tied and untied.

Every adapter here is non-trivial: LoRA factors start random (``init_lora_weights=False``) and the
trained rows are perturbed, so a wrong key, a dropped row, an untied head or a row in the wrong
place shows in the logits.
"""

from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors import safe_open
from transformers import LlamaForCausalLM

import deltatune
from deltatune import DeltaModel
from deltatune.errors import ConfigError, TargetError
from deltatune.io import to_file_key
from deltatune.tuners.trainable_tokens import TrainableTokensLayer
from tiny_models import VOCAB, _seeded, perturb_trainable, tiny_llama

pytestmark = [
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:ensure_weight_tying=True but:UserWarning"),
    pytest.mark.filterwarnings("ignore:You have requested `ensure_weight_tying`:UserWarning"),
]

TOKENS = [1, 3, 5, 100]
KEY = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
TIED = [False, True]


def llama(tied: bool, seed: int = 0) -> LlamaForCausalLM:
    return tiny_llama(seed, tied=tied)


def ids() -> torch.Tensor:
    """Two rows that hold every trained token (and others)."""
    batch = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    batch[0, :4] = torch.tensor(TOKENS)
    batch[1, 5] = TOKENS[1]
    return batch


def lora_kwargs(**overrides) -> dict:
    return {
        "target_modules": "all-linear",
        "trainable_token_indices": list(TOKENS),
        "init_lora_weights": False,
        "lora_alpha": 16,
        **overrides,
    }


def delta(tied: bool, **overrides) -> DeltaModel:
    model = _seeded(lambda: deltatune.get_delta_model(llama(tied), deltatune.LoraConfig(**lora_kwargs(**overrides))), 3)
    perturb_trainable(model)
    return model


def peft_side(tied: bool, **overrides):
    model = _seeded(lambda: peft.get_peft_model(llama(tied), peft.LoraConfig(**lora_kwargs(**overrides))), 3)
    perturb_trainable(model)
    return model


def logits(model, batch: torch.Tensor | None = None) -> torch.Tensor:
    return model(input_ids=ids() if batch is None else batch).logits


def effective_weight(model: DeltaModel, name: str) -> torch.Tensor:
    """The weight module ``name`` runs with (its trained rows merged in), read without changing the model."""
    model.merge_adapter()
    weight = model.base_model.get_submodule(name).weight.detach().clone()
    model.unmerge_adapter()
    return weight


def rows_of(model: DeltaModel) -> set[str]:
    return {name for name in model.adapter_state("default") if "trainable_tokens" in name}


def saved(directory) -> dict[str, torch.Tensor]:
    with safe_open(str(directory / "adapter_model.safetensors"), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


# -- what trains --------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", TIED)
def test_only_the_chosen_rows_change_after_an_optimizer_step(tied):
    model = deltatune.get_delta_model(
        llama(tied), deltatune.LoraConfig(target_modules=["q_proj"], trainable_token_indices=TOKENS)
    )
    before_embedding = effective_weight(model, "model.embed_tokens")
    before_head = effective_weight(model, "lm_head")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad and "lora_" not in name}
    assert trainable == {"base_model.model.embed_tokens.token_adapter.trainable_tokens_delta.default"}
    rows = model.adapter_state("default")["model.embed_tokens.token_adapter.trainable_tokens_delta.default"]
    assert rows.shape == (len(TOKENS), 32)
    torch.testing.assert_close(rows.detach(), before_embedding[TOKENS], rtol=0, atol=0)  # starts as the embedding

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    logits(model).square().mean().backward()
    optimizer.step()

    after_embedding = effective_weight(model, "model.embed_tokens")
    changed = sorted((after_embedding != before_embedding).any(dim=1).nonzero().flatten().tolist())
    assert changed == TOKENS
    head_changed = sorted((effective_weight(model, "lm_head") != before_head).any(dim=1).nonzero().flatten().tolist())
    assert head_changed == (TOKENS if tied else [])  # a tied head follows the embedding's rows
    if tied:
        torch.testing.assert_close(effective_weight(model, "lm_head"), after_embedding, rtol=0, atol=0)


# -- numerics and files against peft ------------------------------------------------------------
@pytest.mark.parametrize("tied", TIED)
@pytest.mark.parametrize("direction", ["peft_to_deltatune", "deltatune_to_peft"])
def test_logits_and_files_match_peft(tmp_path, tied, direction):
    if direction == "peft_to_deltatune":
        source = peft_side(tied)
        source.save_pretrained(tmp_path)
        loaded = DeltaModel.from_pretrained(llama(tied), tmp_path)
    else:
        source = delta(tied)
        source.save_pretrained(tmp_path)
        loaded = peft.PeftModel.from_pretrained(llama(tied), tmp_path)
    tensors = saved(tmp_path)
    assert [key for key in tensors if "lora_" not in key] == [KEY]  # the head saves nothing, tied or not
    assert tensors[KEY].shape == (len(TOKENS), 32)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["trainable_token_indices"] == TOKENS
    torch.testing.assert_close(logits(loaded), logits(source), rtol=0, atol=1e-5)


@pytest.mark.parametrize("tied", TIED)
def test_file_keys_and_gradients_equal_peft(tmp_path, tied):
    """Same config both sides: the same file keys and shapes; with the same weights, the same row gradients."""
    ours, theirs = delta(tied), peft_side(tied)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    ours_saved, theirs_saved = saved(tmp_path / "ours"), saved(tmp_path / "theirs")
    assert {k: v.shape for k, v in ours_saved.items()} == {k: v.shape for k, v in theirs_saved.items()}

    ours.load_adapter_weights(tmp_path / "theirs")
    logits(ours).square().mean().backward()
    logits(theirs).square().mean().backward()
    ours_rows = ours.adapter_state("default")["model.embed_tokens.token_adapter.trainable_tokens_delta.default"]
    theirs_rows = theirs.base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta["default"]
    assert ours_rows.grad.abs().sum() > 0
    torch.testing.assert_close(ours_rows.grad, theirs_rows.grad, rtol=1e-4, atol=1e-6)


def test_unsorted_token_ids_from_peft_keep_their_rows(tmp_path):
    source = _seeded(
        lambda: peft.get_peft_model(llama(False), peft.LoraConfig(**lora_kwargs(trainable_token_indices=[5, 1, 3]))), 3
    )
    perturb_trainable(source)
    source.save_pretrained(tmp_path)
    loaded = DeltaModel.from_pretrained(llama(False), tmp_path)
    torch.testing.assert_close(logits(loaded), logits(source), rtol=0, atol=1e-5)


@pytest.mark.parametrize("tied", TIED)
def test_merge_and_unload_matches_and_keeps_the_head_tied(tied):
    model = delta(tied)
    expected = logits(model)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, TrainableTokensLayer) for m in merged.modules())
    torch.testing.assert_close(logits(merged), expected, rtol=0, atol=1e-4)
    assert (merged.lm_head.weight is merged.model.embed_tokens.weight) is tied

    reference = peft_side(tied).merge_and_unload()
    torch.testing.assert_close(merged.model.embed_tokens.weight, reference.model.embed_tokens.weight, rtol=0, atol=0)
    torch.testing.assert_close(merged.lm_head.weight, reference.lm_head.weight, rtol=0, atol=0)


@pytest.mark.parametrize("tied", TIED)
def test_unmerge_and_unload_restore_the_base_exactly(tied):
    base_state = {k: v.clone() for k, v in llama(tied).state_dict().items()}
    model = delta(tied)
    expected = logits(model)
    model.merge_adapter()
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=1e-4)
    model.unmerge_adapter()
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=1e-6)
    plain = model.unload()
    assert type(plain.model.embed_tokens) is torch.nn.Embedding and type(plain.lm_head) is torch.nn.Linear
    for key, value in plain.state_dict().items():  # the token rows come back exactly; LoRA's W +- BA rounds
        exact = key in ("model.embed_tokens.weight", "lm_head.weight")
        torch.testing.assert_close(value, base_state[key], rtol=0, atol=0 if exact else 1e-6)


@pytest.mark.parametrize("tied", TIED)
def test_disable_adapter_gives_the_base_logits(tied):
    base = logits(llama(tied))
    model = delta(tied)
    assert (logits(model) - base).abs().max() > 1e-3
    with model.disable_adapter():
        torch.testing.assert_close(logits(model), base, rtol=0, atol=0)
    model.merge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(logits(model), base, rtol=0, atol=1e-6)


# -- weight tying -----------------------------------------------------------------------------
@pytest.mark.parametrize("ensure", [False, True])
def test_tied_head_follows_with_or_without_ensure_weight_tying(tmp_path, ensure):
    """peft ties the head for trainable tokens either way; ``ensure_weight_tying`` only adds checks."""
    ours, theirs = delta(True, ensure_weight_tying=ensure), peft_side(True, ensure_weight_tying=ensure)
    assert isinstance(ours.base_model.lm_head, TrainableTokensLayer)
    assert type(theirs.base_model.model.lm_head).__name__ == "TrainableTokensWrapper"
    theirs.save_pretrained(tmp_path)
    ours.load_adapter_weights(tmp_path)
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=0, atol=1e-5)


def test_dict_form_naming_both_tied_modules():
    same = deltatune.get_delta_model(
        llama(True),
        deltatune.LoraConfig(
            target_modules=["q_proj"], trainable_token_indices={"embed_tokens": TOKENS, "lm_head": TOKENS}
        ),
    )
    assert rows_of(same) == {"model.embed_tokens.token_adapter.trainable_tokens_delta.default"}

    apart = deltatune.get_delta_model(
        llama(True),
        deltatune.LoraConfig(
            target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [1, 2], "lm_head": [3]}
        ),
    )
    assert rows_of(apart) == {
        "model.embed_tokens.token_adapter.trainable_tokens_delta.default",
        "lm_head.token_adapter.trainable_tokens_delta.default",
    }
    with pytest.raises(ConfigError, match="ensure_weight_tying=True but the tied"):
        deltatune.get_delta_model(
            llama(True),
            deltatune.LoraConfig(
                target_modules=["q_proj"],
                trainable_token_indices={"embed_tokens": [1, 2], "lm_head": [3]},
                ensure_weight_tying=True,
            ),
        )


def test_untied_output_head_trains_its_own_rows_as_in_peft(tmp_path):
    kwargs = lora_kwargs(trainable_token_indices={"lm_head": [2, 7]})
    source = _seeded(lambda: peft.get_peft_model(llama(False), peft.LoraConfig(**kwargs)), 3)
    perturb_trainable(source)
    source.save_pretrained(tmp_path)
    loaded = DeltaModel.from_pretrained(llama(False), tmp_path)
    assert "lm_head.token_adapter.trainable_tokens_delta.default" in loaded.adapter_state("default")
    torch.testing.assert_close(logits(loaded), logits(source), rtol=0, atol=1e-5)


# -- several adapters -------------------------------------------------------------------------
def test_second_adapter_switching_and_deleting():
    model = delta(True)
    first = logits(model)
    model.add_adapter("other", deltatune.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[7, 8]))
    assert set(model.base_model.model.embed_tokens.adapter_names) == {"default", "other"}
    model.set_adapter("other")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "base_model.model.embed_tokens.token_adapter.trainable_tokens_delta.other" in trainable
    assert not any(".default" in n for n in trainable)
    model.set_adapter("default")
    torch.testing.assert_close(logits(model), first, rtol=0, atol=0)
    model.delete_adapter("default")
    assert model.base_model.model.embed_tokens.adapter_names == ["other"]
    assert model.base_model.lm_head.adapter_names == ["other"]  # the tied head follows "other" too

    model.add_adapter("clash", deltatune.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[8]))
    model.set_adapter(["other", "clash"])
    with pytest.raises(ConfigError, match=r"trains token ids \[8\] that another active or merged adapter"):
        logits(model)
    model.delete_adapter("clash")
    model.delete_adapter("other")
    assert type(model.base_model.model.embed_tokens) is torch.nn.Embedding
    assert type(model.base_model.lm_head) is torch.nn.Linear


def test_half_precision_base_keeps_fp32_rows():
    config = deltatune.LoraConfig(target_modules=["q_proj"], trainable_token_indices=TOKENS)
    model = deltatune.get_delta_model(llama(True).to(torch.bfloat16), config)
    rows = model.adapter_state("default")["model.embed_tokens.token_adapter.trainable_tokens_delta.default"]
    assert rows.dtype == torch.float32
    out = logits(model)
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    assert rows.grad is not None and rows.grad.abs().sum() > 0


# -- bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"trainable_token_indices": [3, VOCAB]}, ConfigError, r"\[128\] lie outside model.embed_tokens's vocabulary"),
        ({"trainable_token_indices": {"q_proj": [1]}}, ConfigError, "a Linear, not an embedding"),
        ({"trainable_token_indices": {"no_such": [1]}}, TargetError, "matches no module"),
        ({"target_modules": ["embed_tokens", "q_proj"]}, ConfigError, "already adapted .LoraEmbedding"),
        ({"modules_to_save": ["embed_tokens"]}, ConfigError, "already adapted .ModulesToSaveWrapper"),
        ({"modules_to_save": ["lm_head"]}, ConfigError, "lm_head shares model.embed_tokens's weight"),
    ],
)
def test_bad_input_is_refused_and_leaves_the_model_untouched(kwargs, error, match):
    model = llama(True)
    modules_before = [type(m) for m in model.modules()]
    config = deltatune.LoraConfig(**{"target_modules": ["q_proj"], "trainable_token_indices": TOKENS, **kwargs})
    with pytest.raises(error, match=match) as caught:
        deltatune.get_delta_model(model, config)
    assert "\n" not in str(caught.value)
    assert [type(m) for m in model.modules()] == modules_before


def test_file_keys_are_a_pure_rename():
    name = "model.embed_tokens.token_adapter.trainable_tokens_delta.other"
    assert to_file_key(name, "other") == KEY


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (
            {"target_modules": ["q_proj"], "modules_to_save": ["embed_tokens"]},
            "tied model.embed_tokens in modules_to_save",
        ),
        ({"target_modules": ["embed_tokens", "q_proj"]}, "LoRA on the tied embedding model.embed_tokens"),
    ],
)
def test_ensure_weight_tying_where_deltatune_cannot_tie_is_refused_and_changes_nothing(options, match):
    """peft shares one trained copy (or one LoRA) between a tied embedding and head there; we refuse, never ignore."""
    model = llama(True)
    before = {name: p.clone() for name, p in model.state_dict().items()}
    with pytest.raises(ConfigError, match=match):
        deltatune.get_delta_model(model, deltatune.LoraConfig(r=2, ensure_weight_tying=True, **options))
    assert not any(getattr(m, "is_delta_layer", False) for m in model.modules())
    assert all(torch.equal(model.state_dict()[name], value) for name, value in before.items())
