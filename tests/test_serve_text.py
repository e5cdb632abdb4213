"""The server's incremental text: pieces concatenate to exactly the decoded answer (multi-byte characters split
across tokens are held back, never sent as U+FFFD), and stop strings cut it where the first one starts, even
when a stop string spans several tokens."""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from deltatune.runtime.assets import smollm2_path
from deltatune.serve.text import TextStream


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(smollm2_path(), local_files_only=True)


def pieces(tokenizer, ids: list[int], stop=()) -> tuple[list[str], TextStream]:
    text = TextStream(tokenizer, stop)
    out = [text.push(i) for i in ids]
    return [*out, text.finish()], text


def test_multi_byte_characters_split_across_tokens_come_out_whole(tokenizer):
    sentence = "naïve café — 中文字符 🙂🎉 ok"
    ids = tokenizer(sentence)["input_ids"]
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # some token holds part of a character
    out, text = pieces(tokenizer, ids)
    assert "".join(out) == text.text == sentence
    assert not any("\ufffd" in piece for piece in out)


@pytest.mark.parametrize("seed", range(5))
def test_pieces_of_random_tokens_concatenate_to_the_whole_decode(tokenizer, seed):
    rng = random.Random(seed)
    ids = [rng.randrange(len(tokenizer)) for _ in range(300)]
    out, _ = pieces(tokenizer, ids)
    assert "".join(out) == tokenizer.decode(ids, skip_special_tokens=True)


def test_a_stop_string_spanning_tokens_cuts_the_text_before_it(tokenizer):
    ids = tokenizer("Hello world. Goodbye world.")["input_ids"]
    out, text = pieces(tokenizer, ids, stop=["o w", "zzz"])
    assert "".join(out) == text.text == "Hell" and text.stopped
    seen = next(k for k in range(len(ids) + 1) if "o w" in tokenizer.decode(ids[:k]))
    assert len(text.ids) == seen < len(ids)  # it stopped taking tokens at the one that completed "o w"


def test_text_that_may_start_a_stop_string_waits_until_the_next_tokens_tell(tokenizer):
    text = TextStream(tokenizer, stop=["END!"])
    ids = tokenizer("abc EN")["input_ids"]
    sent = "".join(text.push(i) for i in ids)
    assert "abc EN".startswith(sent) and not sent.endswith("EN")  # "EN" could be the start of "END!"
    sent += "".join(text.push(i) for i in tokenizer("Ds here")["input_ids"])
    assert sent + text.finish() == "abc ENDs here" and not text.stopped


def test_a_stop_string_at_the_very_start_leaves_no_text(tokenizer):
    out, text = pieces(tokenizer, tokenizer("Stop right there")["input_ids"], stop=["Stop"])
    assert "".join(out) == "" and text.stopped
