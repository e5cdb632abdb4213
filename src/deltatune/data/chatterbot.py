"""The built-in data sources (nothing is downloaded): the embedded chatterbot corpus, and one generated task.

* ``chatterbot``: real question/answer pairs as one-turn conversations (SFT).
* ``chatterbot-topics``: each question labelled with its corpus topic (sequence classification).
* ``chatterbot-preference-synthetic``: SYNTHETIC preference pairs. chosen = the question's real
  answer, rejected = the answer to another, randomly drawn question. No real preference data ships
  with the corpus; these pairs only teach "answer the question that was asked".
* ``chatterbot-kto-synthetic``: the same SYNTHETIC pairs unpaired: (question, chosen) desirable,
  (question, rejected) undesirable.
* ``units-synthetic``: SYNTHETIC unit-conversion prompts with exact answers, for GRPO (``units``).
* ``units-preference-synthetic``: the same prompts as SYNTHETIC preference pairs: the number alone (as asked)
  over the number in a sentence.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from deltatune.data.records import (
    Conversation,
    KTOExample,
    LabelledText,
    Message,
    PreferencePair,
    Record,
)
from deltatune.data.units import unit_conversion_preferences, unit_conversion_prompts

if TYPE_CHECKING:
    from deltatune.runtime import assets


def chatterbot_conversations() -> list[Conversation]:
    """Every unique chatterbot pair as (user question, assistant answer), in corpus order."""
    return [_conversation(p.question, p.answer) for p in _pairs()]


def chatterbot_topics() -> list[LabelledText]:
    """Each distinct (question, topic) of the corpus, for topic classification."""
    seen = dict.fromkeys(LabelledText(p.question, p.topic) for p in _pairs())
    return list(seen)


def chatterbot_preference_pairs(seed: int = 0) -> list[PreferencePair]:
    """SYNTHETIC pairs: chosen = the real answer, rejected = a different question's answer (seeded draw)."""
    pairs = _pairs()
    rng = random.Random(seed)
    out = []
    for pair in pairs:
        while True:
            other = pairs[rng.randrange(len(pairs))]
            if other.question != pair.question and other.answer != pair.answer:
                break
        user = (Message("user", pair.question),)
        out.append(PreferencePair(user, (Message("assistant", pair.answer),), (Message("assistant", other.answer),)))
    return out


def unpair(pairs: Sequence[PreferencePair]) -> list[KTOExample]:
    """Preference pairs -> KTO examples: each pair gives a desirable and an undesirable example."""
    out = []
    for pair in pairs:
        out += [
            KTOExample(pair.prompt, answer, label, pair.tools, pair.origin)
            for answer, label in ((pair.chosen, True), (pair.rejected, False))
        ]
    return out


def chatterbot_kto_examples(seed: int = 0) -> list[KTOExample]:
    """SYNTHETIC KTO examples: ``unpair(chatterbot_preference_pairs(seed))``."""
    return unpair(chatterbot_preference_pairs(seed))


BUILTIN: dict[str, Callable[[], list[Record]]] = {
    "chatterbot": chatterbot_conversations,
    "chatterbot-topics": chatterbot_topics,
    "chatterbot-preference-synthetic": chatterbot_preference_pairs,
    "chatterbot-kto-synthetic": chatterbot_kto_examples,
    "units-synthetic": unit_conversion_prompts,
    "units-preference-synthetic": unit_conversion_preferences,
}


@functools.cache
def _pairs() -> tuple[assets.QAPair, ...]:
    """The corpus pairs, parsed once per process (the YAML files take ~0.5 s)."""
    from deltatune.runtime import assets  # imports torch: only when the corpus is read

    return tuple(assets.chatterbot_pairs())


def _conversation(question: str, answer: str) -> Conversation:
    return Conversation((Message("user", question), Message("assistant", answer)))
