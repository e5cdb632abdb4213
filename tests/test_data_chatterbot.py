"""The embedded chatterbot corpus as built-in sources, and the prompt-grouped train/eval split."""

from __future__ import annotations

import pytest

from deltatune.data import (
    Conversation,
    KTOExample,
    Message,
    PreferencePair,
    split_records,
    unpair,
)
from deltatune.data.chatterbot import (
    BUILTIN,
    chatterbot_conversations,
    chatterbot_kto_examples,
    chatterbot_preference_pairs,
    chatterbot_topics,
)
from deltatune.runtime.assets import chatterbot_pairs


def qa(question: str, answer: str) -> Conversation:
    return Conversation((Message("user", question), Message("assistant", answer)))


def test_conversations_are_the_corpus_pairs() -> None:
    pairs = chatterbot_pairs()
    assert chatterbot_conversations() == [qa(p.question, p.answer) for p in pairs]


def test_topics_label_questions_with_their_corpus_topic() -> None:
    topics = chatterbot_topics()
    assert len(topics) == len(set(topics)) > 800
    assert {t.label for t in topics} == {p.topic for p in chatterbot_pairs()}
    assert topics[0].text == "What is AI?" and topics[0].label == "AI"


def test_synthetic_preference_pairs_reject_another_questions_answer() -> None:
    pairs, corpus = chatterbot_preference_pairs(), chatterbot_pairs()
    assert len(pairs) == len(corpus)
    answers_of = {}
    for p in corpus:
        answers_of.setdefault(p.question, set()).add(p.answer)
    for pair, source in zip(pairs, corpus):
        assert pair.prompt == (Message("user", source.question),)
        assert pair.chosen == (Message("assistant", source.answer),)
        (rejected,) = pair.rejected
        assert rejected.role == "assistant" and rejected.content not in answers_of[source.question]
    assert chatterbot_preference_pairs(seed=0) == pairs
    assert chatterbot_preference_pairs(seed=1) != pairs


def test_synthetic_kto_examples_unpair_the_preference_pairs() -> None:
    pairs = chatterbot_preference_pairs()
    examples = chatterbot_kto_examples()
    assert examples == unpair(pairs)
    assert examples[:2] == [
        KTOExample(pairs[0].prompt, pairs[0].chosen, True),
        KTOExample(pairs[0].prompt, pairs[0].rejected, False),
    ]


def test_synthetic_sources_say_so_in_their_names() -> None:
    for name, source in BUILTIN.items():
        records = source()
        if isinstance(records[0], (PreferencePair, KTOExample)):
            assert name.endswith("-synthetic"), name


def test_split_groups_prompts_and_is_deterministic() -> None:
    records = chatterbot_conversations()
    train, evaluation = split_records(records, eval_fraction=0.1, seed=0)
    assert len(train) + len(evaluation) == len(records)
    prompts = lambda rs: {r.messages[0].content for r in rs}  # noqa: E731
    assert not prompts(train) & prompts(evaluation)
    assert len(prompts(evaluation)) == round(0.1 * len(prompts(records)))
    assert split_records(records, eval_fraction=0.1, seed=0) == (train, evaluation)
    assert split_records(records, eval_fraction=0.1, seed=1) != (train, evaluation)


def test_split_keeps_every_answer_to_a_prompt_together() -> None:
    records = [qa("q1", "a"), qa("q1", "b"), qa("q2", "c")]
    train, evaluation = split_records(records, eval_fraction=0.1)
    assert evaluation in ([records[2]], records[:2])
    assert split_records(records, eval_fraction=0.0) == (records, [])
    with pytest.raises(ValueError, match="eval_fraction"):
        split_records(records, eval_fraction=1.0)
