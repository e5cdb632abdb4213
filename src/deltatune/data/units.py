"""A SYNTHETIC prompt set that the project generates itself, for GRPO: unit conversions with exact answers.

Each row asks for a conversion between two units of one kind (length, time, mass, counts) whose answer is a
whole number, and tells the model to answer with the number alone; its ``solution`` column holds the answer, so
a reward can check it exactly (``reward_funcs=accuracy``, or ``examples/rewards.py``)::

    {"prompt": [{"role": "user", "content": "How many minutes are in 7 hours? Answer with the number only."}],
     "solution": "420"}

The embedded SmolLM2-135M-Instruct answers few of them right, and rarely with the number alone.

The same prompts as SYNTHETIC preference pairs (``units-preference-synthetic``): both answers give the right
number, the chosen one alone as the prompt asks, the rejected one in a sentence ("There are 420 minutes in 7
hours."). The base model prefers the sentence (a higher mean log-probability) on every pair, so these pairs
show a preference stage learning to follow the instruction.
"""

from __future__ import annotations

from deltatune.data.records import Message, PreferencePair, PromptOnly

# (larger unit, smaller unit, how many smaller units one larger holds)
CONVERSIONS = (
    ("metres", "centimetres", 100),
    ("kilometres", "metres", 1000),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("days", "hours", 24),
    ("weeks", "days", 7),
    ("kilograms", "grams", 1000),
    ("feet", "inches", 12),
    ("dozens", "eggs", 12),
    ("years", "months", 12),
)
QUANTITIES = range(2, 21)
INSTRUCTION = "Answer with the number only."


def _questions():
    """(question, answer, the answer as a sentence) for every conversion and quantity, in a fixed order."""
    for larger, smaller, factor in CONVERSIONS:
        for quantity in QUANTITIES:
            answer = str(quantity * factor)
            question = f"How many {smaller} are in {quantity} {larger}? {INSTRUCTION}"
            yield question, answer, f"There are {answer} {smaller} in {quantity} {larger}."


def unit_conversion_preferences() -> list[PreferencePair]:
    """SYNTHETIC pairs on the same 190 prompts: chosen = the number alone, rejected = the number in a sentence."""
    return [
        PreferencePair((Message("user", q),), (Message("assistant", a),), (Message("assistant", sentence),))
        for q, a, sentence in _questions()
    ]


def unit_conversion_prompts() -> list[PromptOnly]:
    """Every conversion of ``CONVERSIONS`` for each quantity in ``QUANTITIES`` (190 prompts), in a fixed order."""
    return [PromptOnly((Message("user", q),), None, (("solution", a),)) for q, a, _ in _questions()]
