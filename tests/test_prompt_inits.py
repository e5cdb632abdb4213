"""Prompt methods started from real tokens (``prompt_tuning_init`` "TEXT" / "SAMPLE_VOCAB"): the untrained
adapter is the base model reading those tokens first, for prompt tuning (peft's init), P-tuning (a residual
encoder) and prefix tuning (the frozen model's own keys and values; with or without the projection MLP);
their files still load in peft with the same outputs, and the embedded SmolLM2 starts near its base loss.
"""

from __future__ import annotations

import json
import shutil

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import deltatune
from deltatune import DeltaModel, get_delta_model
from deltatune.errors import ConfigError
from prompt_cases import (
    INIT_TEXT,
    MODELS,
    N_VIRTUAL,
    batch,
    config,
    outputs,
    tokenizer_dir,
)
from tiny_models import VOCAB, _seeded, perturb_trainable

pytestmark = [
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:Unexpected keyword arguments:UserWarning"),  # peft, on deltatune's init keys
]

FROM_TOKENS = ["prompt", "ptuning_mlp", "ptuning_lstm", "prefix", "prefix_projection"]
TEXT_IDS = list(range(2, 2 + N_VIRTUAL))  # the test tokenizer numbers INIT_TEXT's words from 2
ATOL = 1e-5


def text_init() -> dict:
    return {
        "prompt_tuning_init": "TEXT",
        "prompt_tuning_init_text": INIT_TEXT,
        "tokenizer_name_or_path": tokenizer_dir(),
    }


def started(method: str, kind: str, seed: int = 0, init: dict | None = None) -> DeltaModel:
    """A new adapter of ``method`` started from tokens (``text_init()`` unless ``init`` is given; {} for
    peft's random start)."""
    name = "prompt_random" if method == "prompt" else method
    cfg = config(deltatune, name, kind, **(text_init() if init is None else init))
    return _seeded(lambda: get_delta_model(MODELS[kind].build(), cfg), seed)


def base_reading_first(kind: str, ids: list[int]) -> torch.Tensor:
    """The base model's logits for the batch's tokens, with ``ids`` read before every row."""
    inputs, count = batch(), len(ids)
    prefix = torch.tensor(ids).expand(inputs["input_ids"].shape[0], -1)
    with torch.no_grad():
        logits = (
            MODELS[kind]
            .build()(
                input_ids=torch.cat([prefix, inputs["input_ids"]], 1),
                attention_mask=torch.cat([torch.ones_like(prefix), inputs["attention_mask"]], 1),
            )
            .logits
        )
    return logits[:, count:]


@pytest.mark.parametrize("method", FROM_TOKENS)
@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_started_from_text_the_adapter_is_the_base_model_reading_the_text(method, kind):
    model = started(method, kind)
    expected = base_reading_first(kind, TEXT_IDS)
    torch.testing.assert_close(outputs(model, kind)["output"], expected, atol=ATOL, rtol=0)
    random = started(method, kind, init={})
    assert (outputs(random, kind)["output"] - expected).abs().max() > 100 * ATOL, "peft's random start is elsewhere"


@pytest.mark.parametrize("method", ["prefix", "ptuning_mlp"])
def test_sampled_vocabulary_is_n_uniform_draws_read_first(method):
    model = started(method, "llama", seed=3, init={"prompt_tuning_init": "SAMPLE_VOCAB"})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)  # the adapter's first draw
        ids = torch.randint(0, VOCAB, (N_VIRTUAL,)).tolist()
    torch.testing.assert_close(outputs(model, "llama")["output"], base_reading_first("llama", ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", ["ptuning_mlp", "ptuning_lstm", "prefix_projection"])
def test_a_head_started_from_tokens_still_trains_every_weight(method):
    model = started(method, "llama")
    encoder = model.base_model.prompt_encoder["default"]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):  # the first step moves the zeroed last layer, the second reaches the layers before it
        optimizer.zero_grad(set_to_none=True)
        model(**batch(), labels=batch()["input_ids"]).loss.backward()
        optimizer.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())


@pytest.mark.parametrize("method", ["ptuning_mlp", "ptuning_lstm", "prefix", "prefix_projection"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_files_of_adapters_started_from_text_load_in_peft_with_the_same_outputs(method, kind, tmp_path):
    ours = started(method, kind)
    perturb_trainable(ours)
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["prompt_tuning_init"] == "TEXT" and saved["prompt_tuning_init_text"] == INIT_TEXT
    in_peft = peft.PeftModel.from_pretrained(MODELS[kind].build(), tmp_path)
    cut = 0 if method.startswith("prefix") else N_VIRTUAL  # peft keeps the virtual positions in its outputs
    expected, got = outputs(in_peft, kind, cut, labels=True), outputs(ours, kind, labels=True)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=ATOL, rtol=0)
    again = DeltaModel.from_pretrained(MODELS[kind].build(), tmp_path)
    assert again.peft_config["default"].prompt_tuning_init == "TEXT"
    torch.testing.assert_close(outputs(again, kind)["output"], got["output"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["PromptEncoderConfig", "PrefixTuningConfig"])
def test_init_keys_are_written_only_when_set(name):
    plain = getattr(deltatune, name)(num_virtual_tokens=2).to_dict()
    assert not {"prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path"} & set(plain)
    sampled = getattr(deltatune, name)(num_virtual_tokens=2, prompt_tuning_init="sample_vocab").to_dict()
    assert sampled["prompt_tuning_init"] == "SAMPLE_VOCAB" and "prompt_tuning_init_text" not in sampled
    assert deltatune.PromptTuningConfig(num_virtual_tokens=2).to_dict()["prompt_tuning_init"] == "RANDOM"


def test_a_second_prefix_started_from_text_ignores_the_first_adapter():
    model = started("prefix", "llama")
    perturb_trainable(model)
    model.add_adapter("second", config(deltatune, "prefix", "llama", **text_init()))
    fresh = started("prefix", "llama").base_model.prompt_encoder["default"].value()
    torch.testing.assert_close(model.base_model.prompt_encoder["second"].value(), fresh, atol=0, rtol=0)
    assert model.base_model.training is False and model.base_model.prompt_encoder.disabled is False


def test_text_reads_the_tokenizer_of_the_model_folder_by_default(tmp_path):
    shutil.copytree(tokenizer_dir(), tmp_path, dirs_exist_ok=True)
    MODELS["llama"].build().save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    cfg = deltatune.PrefixTuningConfig(
        num_virtual_tokens=N_VIRTUAL, prompt_tuning_init="TEXT", prompt_tuning_init_text=INIT_TEXT
    )
    model = get_delta_model(loaded, cfg)
    assert model.peft_config["default"].tokenizer_name_or_path == str(tmp_path)
    torch.testing.assert_close(
        outputs(model, "llama")["output"], base_reading_first("llama", TEXT_IDS), atol=ATOL, rtol=0
    )
    with pytest.raises(ConfigError, match="not loaded from a local folder; set it"):
        get_delta_model(
            MODELS["llama"].build(),
            deltatune.PromptEncoderConfig(
                num_virtual_tokens=2, prompt_tuning_init="TEXT", prompt_tuning_init_text=INIT_TEXT
            ),
        )


def test_init_errors_name_the_fix():
    with pytest.raises(ConfigError, match="set one of them"):
        deltatune.PrefixTuningConfig(num_virtual_tokens=2, init_weights="zero", prompt_tuning_init="SAMPLE_VOCAB")
    with pytest.raises(ConfigError, match="needs prompt_tuning_init_text"):
        deltatune.PromptEncoderConfig(num_virtual_tokens=2, prompt_tuning_init="TEXT")
    with pytest.raises(ConfigError, match="prompt_tuning_init"):
        deltatune.PrefixTuningConfig(num_virtual_tokens=2, prompt_tuning_init="WORDS")
    with pytest.raises(ConfigError, match="no key/value cache.*use prompt_tuning_init='RANDOM'"):
        get_delta_model(MODELS["bert_features"].build(), config(deltatune, "prefix", "bert_features", **text_init()))


@pytest.mark.slow
def test_embedded_smollm2_started_from_text_is_near_its_base_loss_where_random_prefixes_are_far(smollm2_dir):
    """Measured on four held-out chatterbot pairs: base 3.99; prefix from text 3.82 (with or without the
    projection), P-tuning from text the same; peft's random prefix 14.4."""
    from test_prompt_smollm2 import qa_batches

    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, local_files_only=True).eval()
    _, heldout = qa_batches(AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True))
    init = {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "Answer the question in one short sentence."}

    def loss(cfg) -> float:
        model = _seeded(lambda: get_delta_model(base, cfg))
        try:
            with torch.no_grad():
                return model(**heldout).loss.item()
        finally:
            model.unload()

    with torch.no_grad():
        plain = base(**heldout).loss.item()
    for cfg in (
        deltatune.PrefixTuningConfig(num_virtual_tokens=20, **init),
        deltatune.PrefixTuningConfig(num_virtual_tokens=20, prefix_projection=True, **init),
        deltatune.PromptEncoderConfig(num_virtual_tokens=20, **init),
    ):
        assert abs(loss(cfg) - plain) < 0.3, (type(cfg).__name__, plain)
    assert loss(deltatune.PrefixTuningConfig(num_virtual_tokens=20)) > plain + 3


def test_a_fused_optimizer_step_reaches_inference_and_the_saved_prompt():
    """Fused optimizers update weights without bumping their version counters: P must not be cached on them."""
    model = get_delta_model(
        MODELS["llama"].build(),
        deltatune.PromptEncoderConfig(num_virtual_tokens=3, task_type="CAUSAL_LM", prompt_tuning_init="SAMPLE_VOCAB"),
    )
    encoder = next(m for m in model.modules() if hasattr(m, "value") and hasattr(m, "head"))
    ids = torch.tensor([[3, 4, 5, 6]])
    model.eval()
    with torch.no_grad():
        before, saved_before = model(input_ids=ids).logits, encoder.value()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, fused=True)
    model.train()
    model(input_ids=ids).logits.square().mean().backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        after, saved_after = model(input_ids=ids).logits, encoder.value()
    assert (after - before).abs().max() > 1e-4 and (saved_after - saved_before).abs().max() > 1e-4
