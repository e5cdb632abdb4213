"""The tokenizer keys of a GGUF file, from a transformers fast tokenizer.

llama.cpp re-implements byte-level BPE itself (``tokenizer.ggml.model = "gpt2"``): it needs the
token strings in id order, each token's type, the merges, the special ids, whether BOS/EOS are
added, and the name of the pre-tokenizer (the regex that splits text before BPE), which it only
knows by name. The name is read off the tokenizer's own pre-tokenizer; an unknown one is an
error rather than a silently different tokenisation.
"""

from __future__ import annotations

import json

import gguf

from deltatune.errors import ConfigError

T = gguf.TokenType

# Split patterns of byte-level BPE tokenizers, by llama.cpp's name for them.
_SPLIT_PATTERNS = {  # the two differ only in how many digits a number piece may hold
    (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ): "llama-bpe",
    (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ): "qwen2",
}


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer, vocab_size: int, pre: str | None = None) -> None:
    """Write ``tokenizer`` (padded with unused tokens up to the model's ``vocab_size``) into ``writer``."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    _check_byte_level_bpe(backend)
    tokens, types = _tokens(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre or pre_tokenizer_name(backend["pre_tokenizer"]))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([_merge_text(merge) for merge in backend["model"]["merges"]])
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    sample = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and sample[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and sample[-1] == tokenizer.eos_token_id)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def pre_tokenizer_name(pre_tokenizer: dict | None) -> str:
    """llama.cpp's name for a byte-level BPE pre-tokenizer: plain GPT-2, GPT-2 after single-digit
    splitting (SmolLM / StarCoder), or a known split regex (Llama 3, Qwen 2)."""
    steps = (pre_tokenizer or {}).get("pretokenizers", [pre_tokenizer] if pre_tokenizer else [])
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") in _SPLIT_PATTERNS:
        return _SPLIT_PATTERNS[steps[0]["pattern"]["Regex"]]
    raise ConfigError(
        f"pre-tokenizer {json.dumps(pre_tokenizer)[:120]} has no known llama.cpp name; pass the "
        f"name llama.cpp uses for it (--pre-tokenizer, e.g. gpt-2, llama-bpe, qwen2)"
    )


def _check_byte_level_bpe(backend: dict) -> None:
    model, decoder = backend.get("model", {}), (backend.get("decoder") or {}).get("type")
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder != "ByteLevel":
        raise ConfigError(
            f"only byte-level BPE tokenizers (GPT-2 style) can be exported to GGUF yet; this one is "
            f"{model.get('type')} with decoder {decoder}"
        )


def _tokens(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings in id order and their types; ids the tokenizer lacks become unused padding."""
    vocab = tokenizer.get_vocab()
    if len(vocab) > vocab_size:
        raise ConfigError(
            f"the tokenizer has {len(vocab)} tokens but the model only {vocab_size} embeddings; "
            f"resize the model's embeddings before exporting"
        )
    by_id = {token_id: token for token, token_id in vocab.items()}
    added = {token_id: added.special for token_id, added in tokenizer.added_tokens_decoder.items()}
    tokens, types = [], []
    for token_id in range(vocab_size):
        if token_id not in by_id:
            tokens.append(f"[PAD{token_id}]")
            types.append(T.UNUSED)
        else:
            tokens.append(by_id[token_id])
            types.append(T.NORMAL if token_id not in added else T.CONTROL if added[token_id] else T.USER_DEFINED)
    return tokens, types


def _merge_text(merge) -> str:
    """A merge as llama.cpp stores it, "left right" (a space inside a part written as U+0120)."""
    if isinstance(merge, str):
        return merge
    return " ".join(part.replace(" ", "\u0120") for part in merge)
