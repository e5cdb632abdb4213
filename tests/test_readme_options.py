"""docs/lora-options.md's "Every peft LoRA option" table names every field of peft's LoraConfig, and
every refusal deltatune gives appears there word for word, so the table cannot drift from the code."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import peft

from deltatune.tuners.lora.config import LORA_INIT_REFUSALS, LORA_REFUSALS

README = Path(__file__).resolve().parent.parent / "docs" / "lora-options.md"
BOOKKEEPING = {"peft_type", "auto_mapping", "peft_version"}  # written by peft itself, not options


def _options_table() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Every peft LoRA option", 1)[1].split("\n## ", 1)[0]
    return "\n".join(line for line in section.splitlines() if line.startswith("| "))


def test_every_peft_field_has_a_row():
    named = set(re.findall(r"`([a-z_]+)`", _options_table()))
    fields = {f.name for f in dataclasses.fields(peft.LoraConfig) if f.init} - BOOKKEEPING
    assert fields <= named, sorted(fields - named)


def test_every_refusal_is_in_the_table_with_its_reason():
    table = _options_table()
    for reason in [*LORA_REFUSALS.values(), *LORA_INIT_REFUSALS.values()]:
        assert f"refused: {reason} |" in table, reason
