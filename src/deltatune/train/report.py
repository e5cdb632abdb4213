"""What a run leaves next to its adapter: ``metrics.json`` and ``loss.png`` (train and eval curves)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def write_metrics(path: Path, **sections: Any) -> None:
    """``sections`` as indented JSON (non-finite floats become null, so any JSON reader takes it)."""
    path.write_text(json.dumps(_finite(sections), indent=2) + "\n", encoding="utf-8")


def plot_losses(path: Path, log_history: Sequence[Mapping[str, Any]], title: str = "") -> None:
    """Training loss per logged step and evaluation loss per evaluation, against the optimizer step."""
    train = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry]
    evaluation = sorted({entry["step"]: entry["eval_loss"] for entry in log_history if "eval_loss" in entry}.items())
    figure = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if train:
        axes.plot(*zip(*train), label="train loss", color="tab:blue", linewidth=1)
    if evaluation:
        axes.plot(*zip(*evaluation), "o-", label="eval loss", color="tab:orange")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(key): _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value
