"""What a run leaves next to its adapter: ``metrics.json`` and ``loss.png`` (curves and sample answers)."""

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


def plot_losses(
    path: Path, log_history: Sequence[Mapping[str, Any]], title: str = "", samples: Sequence[Any] = ()
) -> None:
    """The run at a glance: the training loss per logged step (faint) and its moving average, the held-out
    loss at each evaluation (step 0: before training) with the start as a dashed line, and below, each
    sample question with the data's answer and the model's before and after (``run.SampleAnswer``)."""
    train = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry]
    evaluation = sorted({entry["step"]: entry["eval_loss"] for entry in log_history if "eval_loss" in entry}.items())
    figure = Figure(figsize=(8, 4.5 + 0.5 * len(samples)), dpi=100)
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(2, 1, height_ratios=[4.5, max(0.5 * len(samples), 1e-3)])
    axes = figure.add_subplot(grid[0])
    if train:
        steps, losses = zip(*train)
        axes.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=1, label="train loss (per log)")
        axes.plot(steps, moving_average(losses, max(1, len(losses) // 4)), color="tab:blue", linewidth=2,
                  label="train loss (moving average)")  # fmt: skip
    if evaluation:
        axes.plot(*zip(*evaluation), "o-", label="held-out loss", color="tab:orange", linewidth=2)
        axes.axhline(evaluation[0][1], color="gray", linestyle="--", linewidth=1, label="held-out loss before training")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    if samples:
        text = figure.add_subplot(grid[1])
        text.axis("off")
        lines = []
        for sample in samples:
            lines.append(f"Q: {_short(sample.question)}" + (f"   (data: {_short(sample.reference)})" if sample.reference else ""))
            lines.append(f"    before: {_short(sample.before)}")
            lines.append(f"    after:  {_short(sample.after)}")
        text.text(0, 1, "\n".join(lines), va="top", family="monospace", fontsize=8)
    figure.tight_layout()
    figure.savefig(path)


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """The mean of each value and the ``window - 1`` before it (fewer at the start)."""
    sums = [0.0]
    for value in values:
        sums.append(sums[-1] + value)
    return [(sums[i + 1] - sums[max(0, i + 1 - window)]) / min(i + 1, window) for i in range(len(values))]


def _short(text: str, width: int = 70) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(key): _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value
