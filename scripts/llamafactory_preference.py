"""Write the SYNTHETIC chatterbot preference pairs as LLaMA-Factory preference data: one alpaca-style and
one sharegpt-style file with a dataset_info.json naming both (``ranking: true``), for measuring the
preference stages on LLaMA-Factory's layout.

    python scripts/llamafactory_preference.py outputs/lf-preference
    deltatune train examples/orpo.yaml data=outputs/lf-preference/dataset_info.json#chatterbot_alpaca
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from deltatune.data.chatterbot import chatterbot_preference_pairs


def write(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pairs = chatterbot_preference_pairs(seed=1)  # other rejected answers than the built-in set (seed 0)
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
    (folder / "alpaca_pref.json").write_text(json.dumps(alpaca, indent=1), encoding="utf-8")
    (folder / "sharegpt_pref.json").write_text(json.dumps(sharegpt, indent=1), encoding="utf-8")
    info = {
        "chatterbot_alpaca": {"file_name": "alpaca_pref.json", "ranking": True},
        "chatterbot_sharegpt": {
            "file_name": "sharegpt_pref.json",
            "formatting": "sharegpt",
            "ranking": True,
            "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"},
        },
    }
    (folder / "dataset_info.json").write_text(json.dumps(info, indent=1), encoding="utf-8")


if __name__ == "__main__":
    write(Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/lf-preference"))
