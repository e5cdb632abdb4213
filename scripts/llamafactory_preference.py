"""Write the SYNTHETIC chatterbot and unit-conversion preference pairs as LLaMA-Factory preference data:
alpaca-style and sharegpt-style files with a dataset_info.json naming them (``ranking: true``), for measuring
the preference stages on LLaMA-Factory's layout.

    python scripts/llamafactory_preference.py outputs/lf-preference
    deltatune train examples/orpo.yaml data=outputs/lf-preference/dataset_info.json#chatterbot_alpaca
    deltatune train examples/orpo.yaml data=outputs/lf-preference/dataset_info.json#units_sharegpt
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from deltatune.data.chatterbot import chatterbot_preference_pairs
from deltatune.data.units import unit_conversion_preferences


def write(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    info = {}
    # chatterbot: other rejected answers than the built-in set (seed 0)
    for name, pairs in (("chatterbot", chatterbot_preference_pairs(seed=1)), ("units", unit_conversion_preferences())):
        info.update(write_pairs(folder, name, pairs))
    (folder / "dataset_info.json").write_text(json.dumps(info, indent=1), encoding="utf-8")


def write_pairs(folder: Path, name: str, pairs) -> dict:
    """``pairs`` as ``{name}_alpaca.json`` and ``{name}_sharegpt.json``; their dataset_info entries."""
    alpaca = [
        {"instruction": p.prompt[-1].content, "chosen": p.chosen[0].content, "rejected": p.rejected[0].content}
        for p in pairs
    ]
    sharegpt = [
        {
            "conversations": [{"from": "human", "value": p.prompt[-1].content}],
            "chosen": {"from": "gpt", "value": p.chosen[0].content},
            "rejected": {"from": "gpt", "value": p.rejected[0].content},
        }
        for p in pairs
    ]
    (folder / f"{name}_alpaca.json").write_text(json.dumps(alpaca, indent=1), encoding="utf-8")
    (folder / f"{name}_sharegpt.json").write_text(json.dumps(sharegpt, indent=1), encoding="utf-8")
    return {
        f"{name}_alpaca": {"file_name": f"{name}_alpaca.json", "ranking": True},
        f"{name}_sharegpt": {
            "file_name": f"{name}_sharegpt.json",
            "formatting": "sharegpt",
            "ranking": True,
            "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"},
        },
    }


if __name__ == "__main__":
    write(Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/lf-preference"))
