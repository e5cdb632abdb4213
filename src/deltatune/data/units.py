"""A SYNTHETIC prompt set that the project generates itself, for GRPO: unit conversions with exact answers.

Each row asks for a conversion between two units of one kind (length, time, mass, counts) whose answer is a
whole number, and tells the model to answer with the number alone; its ``solution`` column holds the answer, so
a reward can check it exactly (``reward_funcs=accuracy``, or ``examples/rewards.py``)::

    {"prompt": [{"role": "user", "content": "How many minutes are in 7 hours? Answer with the number only."}],
     "solution": "420"}

The embedded SmolLM2-135M-Instruct answers few of them right, and rarely with the number alone.
"""

from __future__ import annotations

from deltatune.data.records import Message, PromptOnly

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


def unit_conversion_prompts() -> list[PromptOnly]:
    """Every conversion of ``CONVERSIONS`` for each quantity in ``QUANTITIES`` (190 prompts), in a fixed order."""
    rows = []
    for larger, smaller, factor in CONVERSIONS:
        for quantity in QUANTITIES:
            question = f"How many {smaller} are in {quantity} {larger}? {INSTRUCTION}"
            rows.append(PromptOnly((Message("user", question),), None, (("solution", str(quantity * factor)),)))
    return rows
