"""Prompt tuning, P-tuning and prefix tuning: peft parity both ways, peft's file layout, parameter counts,
training, initialisation, several adapters, disabling/unloading and clear errors.

peft keeps the n virtual positions in a prompt-tuned model's outputs; deltatune cuts them so outputs
line up with the caller's tokens, so peft's outputs are compared from position n on (its loss, which
counts the first token predicted from the last virtual one, is compared whole).
"""

from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors import safe_open

import deltatune
from deltatune import DeltaModel, get_delta_model
from deltatune.errors import AdapterLoadError, ConfigError, InputError, MergeError
from deltatune.tuners.prompt.learning import attention_shape
from prompt_cases import (
    INIT_TEXT,
    METHODS,
    MODELS,
    N_VIRTUAL,
    VIRTUAL_TOKEN_METHODS,
    batch,
    config,
    delta_model,
    outputs,
    peft_model,
)
from tiny_models import _seeded, perturb_trainable, tiny_bert

pytestmark = [
    # peft's own notices under transformers 5, not failures of the code under test.
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning"),
]

ATOL = 1e-5
PARITY = [(m, k) for m in METHODS for k in ("llama", "qwen2", "gpt2", "bert_features")] + [
    (m, "bert") for m in VIRTUAL_TOKEN_METHODS
]


def peft_cut(method: str) -> int:
    """How many leading virtual positions peft's sequence outputs have that deltatune's lack."""
    return N_VIRTUAL if method in VIRTUAL_TOKEN_METHODS else 0


def assert_same(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=ATOL, rtol=0)


def prompt_of(model: DeltaModel, adapter: str = "default") -> torch.Tensor:
    return model.base_model.prompt_encoder[adapter].value()


@pytest.mark.parametrize("method,kind", PARITY)
def test_peft_file_loads_here_and_ours_loads_in_peft(method, kind, tmp_path):
    cut = peft_cut(method)
    theirs = peft_model(method, kind)
    perturb_trainable(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    loaded = DeltaModel.from_pretrained(MODELS[kind].build(), tmp_path / "peft")
    assert_same(outputs(theirs.eval(), kind, cut, labels=True), outputs(loaded, kind, labels=True))

    ours = delta_model(method, kind)
    perturb_trainable(ours)
    ours.save_pretrained(tmp_path / "ours")
    in_peft = peft.PeftModel.from_pretrained(MODELS[kind].build(), tmp_path / "ours")
    assert_same(outputs(in_peft, kind, cut, labels=True), outputs(ours, kind, labels=True))


@pytest.mark.parametrize("method", ["prefix", "prefix_projection"])
def test_bert_classifier_with_prefix_matches_peft_backbone(method):
    """peft 0.21 cannot prefix-tune BertForSequenceClassification under transformers 5 (it looks for a
    ``past_key_values`` parameter); its FEATURE_EXTRACTION path runs the same backbone, so the
    trained classifier applied to that backbone's pooled output is the reference."""
    ours = delta_model(method, "bert")
    perturb_trainable(ours)
    reference = peft.get_peft_model(
        tiny_bert().bert,
        peft.PrefixTuningConfig(num_virtual_tokens=N_VIRTUAL, task_type="FEATURE_EXTRACTION", inference_mode=True),
    )
    with torch.no_grad():
        reference.prompt_encoder["default"].embedding.weight.copy_(prompt_of(ours))
        expected = ours.base_model.classifier(reference(**batch()).pooler_output)
    assert_same({"output": expected}, outputs(ours, "bert"))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["qwen2", "gpt2"])
def test_saved_files_have_peft_keys_shapes_and_config(method, kind, tmp_path):
    delta_model(method, kind).save_pretrained(tmp_path / "ours")
    peft_model(method, kind).save_pretrained(tmp_path / "peft")
    shapes = {}
    for side in ("ours", "peft"):
        with safe_open(str(tmp_path / side / "adapter_model.safetensors"), framework="pt") as handle:
            assert handle.metadata() == {"format": "pt"}
            shapes[side] = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    shape = attention_shape(MODELS[kind].build())
    kv_dim = shape.kv_heads * shape.head_dim
    width = shape.layers * 2 * kv_dim if method.startswith("prefix") else shape.hidden
    assert shapes["ours"] == shapes["peft"] == {"prompt_embeddings": (N_VIRTUAL, width)}
    ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert set(ours) <= set(theirs), "deltatune wrote a key peft does not know"
    assert {key: theirs[key] for key in ours} == ours


def expected_trainable(method: str, kind: str) -> int:
    """The method's parameter-count formula (n = N_VIRTUAL; h = the case's encoder_hidden_size)."""
    shape = attention_shape(MODELS[kind].build())
    n, d, layers = N_VIRTUAL, shape.hidden, shape.layers
    kv = shape.kv_heads * shape.head_dim
    if method.startswith("prompt"):
        return n * d
    if method == "ptuning_mlp":
        h = 24
        return n * d + (d * h + h) + (h * h + h) + (h * d + d)
    if method == "ptuning_lstm":
        h = 12
        lstm = 2 * ((4 * h * (d + h) + 8 * h) + (4 * h * (2 * h + h) + 8 * h))  # 2 directions x 2 layers
        return n * d + lstm + (2 * h * 2 * h + 2 * h) + (2 * h * d + d)
    if method == "prefix":
        return n * layers * 2 * kv
    h = 20  # prefix_projection: the embedding is kv wide (peft's grouped-query token_dim)
    return n * kv + (kv * h + h) + (h * layers * 2 * kv + layers * 2 * kv)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_trainable_counts_match_the_formula_and_peft(method, kind):
    ours = delta_model(method, kind).get_nb_trainable_parameters()
    theirs = peft_model(method, kind).get_nb_trainable_parameters()
    assert ours[0] == expected_trainable(method, kind) == theirs[0]
    assert ours[1] == theirs[1]


TRAIN_BATCH = {"input_ids": torch.randint(2, 128, (4, 12), generator=torch.Generator().manual_seed(3))}


@pytest.mark.parametrize("method", METHODS)
def test_training_moves_only_the_prompt_and_survives_save_load(method, tmp_path):
    model = delta_model(method, "llama_train")
    trainable = {id(p) for p in model.adapter_state("default").values()}
    base_before = {n: p.detach().clone() for n, p in model.base_model.named_parameters() if id(p) not in trainable}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    model.train()
    losses = []
    for _ in range(30):
        optimizer.zero_grad(set_to_none=True)
        loss = model(**TRAIN_BATCH, labels=TRAIN_BATCH["input_ids"]).loss
        loss.backward()
        with_grad = {id(p) for p in model.parameters() if p.grad is not None}
        assert with_grad == trainable
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    assert losses[-1] < 0.9 * losses[0], losses
    for name, param in model.base_model.named_parameters():
        if name in base_before:
            assert torch.equal(param, base_before[name]), f"base weight {name} changed"
    model.save_pretrained(tmp_path)
    again = DeltaModel.from_pretrained(MODELS["llama_train"].build(), tmp_path)
    assert_same(outputs(model, "llama_train", labels=True), outputs(again, "llama_train", labels=True))


def test_init_from_text_and_vocabulary():
    text = delta_model("prompt_text", "llama")
    table = text.base_model.get_input_embeddings().weight
    ids = list(range(2, 2 + len(INIT_TEXT.split())))  # the tokenizer numbers the text's words from 2
    torch.testing.assert_close(prompt_of(text), table[ids[:N_VIRTUAL]], atol=0, rtol=0)
    torch.testing.assert_close(
        prompt_of(text), peft_model("prompt_text", "llama").prompt_encoder["default"].embedding.weight
    )
    repeated = delta_model("prompt_text", "llama", num_virtual_tokens=8)  # 6 words, repeated to 8
    torch.testing.assert_close(prompt_of(repeated), table[(ids * 2)[:8]], atol=0, rtol=0)
    sampled = prompt_of(delta_model("prompt_sample_vocab", "llama"))
    assert all((table == row).all(dim=1).any() for row in sampled), "every sampled row is a token embedding"
    random = prompt_of(
        _seeded(
            lambda: get_delta_model(MODELS["llama"].build(), deltatune.PromptTuningConfig(num_virtual_tokens=64)), 0
        )
    )
    assert abs(random.mean().item()) < 0.1 and 0.9 < random.std().item() < 1.1  # N(0, 1), 2048 draws


@pytest.mark.parametrize("method", ["prompt_random", "prefix"])
def test_two_active_adapters_concatenate_their_prompts(method):
    model = delta_model(method, "llama")
    model.add_adapter("second", config(deltatune, method, "llama"))
    model.set_adapter(["default", "second"])
    perturb_trainable(model)
    joined = delta_model(method, "llama", num_virtual_tokens=2 * N_VIRTUAL)
    with torch.no_grad():
        joined.base_model.prompt_encoder["default"].embedding.weight.copy_(
            torch.cat([prompt_of(model), prompt_of(model, "second")])
        )
    assert_same(outputs(joined, "llama", labels=True), outputs(model, "llama", labels=True))


@pytest.mark.parametrize("method", METHODS)
def test_disable_adapter_and_unload_give_the_base_model(method):
    model = delta_model(method, "qwen2")
    perturb_trainable(model)
    base = outputs(MODELS["qwen2"].build(), "qwen2", labels=True)
    adapted = outputs(model, "qwen2", labels=True)
    assert not torch.allclose(adapted["output"], base["output"], atol=1e-3)
    with model.disable_adapter():
        assert_same(base, outputs(model, "qwen2", labels=True))
    assert_same(adapted, outputs(model, "qwen2", labels=True))
    plain = model.unload()
    assert not hasattr(plain, "prompt_encoder") and not plain._forward_pre_hooks and not plain._forward_hooks
    assert not any("_can_checkpoint_with_cache" in vars(m) for m in plain.modules())
    assert_same(base, outputs(plain, "qwen2", labels=True))


@pytest.mark.parametrize("method", ["ptuning_mlp", "ptuning_lstm", "prefix_projection"])
def test_loading_a_reparameterised_adapter_gives_its_embeddings(method, tmp_path):
    """The file holds f(E) only: the loaded adapter is those embeddings, without the encoder (as in peft)."""
    ours = delta_model(method, "llama")
    perturb_trainable(ours)
    ours.save_pretrained(tmp_path)
    trainable = DeltaModel.from_pretrained(MODELS["llama"].build(), tmp_path, is_trainable=True)
    encoder = trainable.base_model.prompt_encoder["default"]
    assert encoder.head is None
    assert trainable.get_nb_trainable_parameters()[0] == prompt_of(ours).numel()
    assert_same(outputs(ours, "llama", labels=True), outputs(trainable, "llama", labels=True))


def test_inference_sees_every_update_of_a_projected_prompt():
    """P = f(E) is recomputed on every call: an in-place update is seen at once (and see
    test_prompt_inits for a fused optimizer, whose updates leave version counters alone)."""
    model = delta_model("prefix_projection", "llama").eval()
    with torch.no_grad():
        before = model(**batch()).logits
        perturb_trainable(model)
        changed = model(**batch()).logits
    assert (changed - before).abs().max() > 1e-4
    torch.testing.assert_close(model(**batch()).logits.detach(), changed)


def test_config_errors_name_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="num_virtual_tokens"):
        deltatune.PromptTuningConfig()
    with pytest.raises(ConfigError, match="tokenizer_name_or_path"):
        deltatune.PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="TEXT", prompt_tuning_init_text="hi")
    with pytest.raises(ConfigError, match="encoder-decoder"):
        deltatune.PrefixTuningConfig(num_virtual_tokens=2, task_type="SEQ_2_SEQ_LM")
    with pytest.raises(ConfigError, match="encoder_reparameterization_type"):
        deltatune.PromptEncoderConfig(num_virtual_tokens=2, encoder_reparameterization_type="GRU")
    missing = deltatune.PromptTuningConfig(
        num_virtual_tokens=2,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text="hi",
        tokenizer_name_or_path=str(tmp_path / "none"),
    )
    with pytest.raises(ConfigError, match="cannot be read from local files"):
        get_delta_model(MODELS["llama"].build(), missing)
    with pytest.raises(ConfigError, match="wrong base model"):
        get_delta_model(MODELS["llama"].build(), deltatune.PrefixTuningConfig(num_virtual_tokens=2, num_layers=3))
    with pytest.raises(ConfigError, match="wrong base model"):
        get_delta_model(MODELS["llama"].build(), deltatune.PromptTuningConfig(num_virtual_tokens=2, token_dim=16))
    assert (
        deltatune.PromptEncoderConfig(
            num_virtual_tokens=3, encoder_reparameterization_type="lstm"
        ).encoder_reparameterization_type
        == "LSTM"
    )


def test_runtime_errors_name_the_fix(tmp_path):
    model = delta_model("prompt_random", "llama")
    with pytest.raises(MergeError, match="cannot be merged"):
        model.merge_and_unload()
    with pytest.raises(InputError, match="2-D attention_mask"):
        model(input_ids=batch()["input_ids"], attention_mask=torch.ones(2, 1, 7, 7))
    with pytest.raises(InputError, match="return_dict=False"):
        model(**batch(), return_dict=False)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**saved, "num_virtual_tokens": N_VIRTUAL + 1}))
    with pytest.raises(AdapterLoadError, match="prompt_embeddings has shape"):
        DeltaModel.from_pretrained(MODELS["llama"].build(), tmp_path)


def test_labels_are_padded_for_the_virtual_tokens():
    """The loss is the base model's own loss over [-100 x n; labels] on the prompted sequence."""
    model = delta_model("prompt_random", "llama")
    inputs = batch()
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad():
        loss = model(**inputs, labels=labels).loss
        embeds = torch.cat([prompt_of(model).expand(2, -1, -1), model.get_input_embeddings()(inputs["input_ids"])], 1)
        mask = torch.cat([torch.ones(2, N_VIRTUAL, dtype=torch.long), inputs["attention_mask"]], 1)
        full = torch.cat([torch.full((2, N_VIRTUAL), -100), labels], 1)
        with model.disable_adapter():
            expected = model(inputs_embeds=embeds, attention_mask=mask, labels=full).loss
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=0)
