"""What a run leaves next to its adapter: ``metrics.json`` and ``loss.png`` (curves and sample answers)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def write_metrics(path: Path, **sections: Any) -> None:
    """``sections`` as indented JSON (non-finite floats become null, so any JSON reader takes it)."""
    path.write_text(json.dumps(_finite(sections), indent=2) + "\n", encoding="utf-8")


def plot_losses(
    path: Path,
    log_history: Sequence[Mapping[str, Any]],
    title: str = "",
    samples: Sequence[Any] = (),
    unit: str = "answer tokens",
) -> None:
    """Write ``loss_figure`` to ``path`` (loss.png)."""
    loss_figure(log_history, title, samples, unit).savefig(path)


def loss_figure(
    log_history: Sequence[Mapping[str, Any]],
    title: str = "",
    samples: Sequence[Any] = (),
    unit: str = "answer tokens",
) -> Figure:
    """The run at a glance: the training loss per logged step (faint) and its moving average (``_plot_training``),
    the held-out loss at each evaluation (step 0: before training) with the start as a dashed line, and below, each
    sample question with the data's answer and the model's before and after (``run.SampleAnswer``).
    ``unit``: what one loss value averages over (a batch's, or the held-out set's), named in the legend."""
    metric = "reward" if any("reward" in entry for entry in log_history) else "loss"  # GRPO draws its reward
    train = [(entry["step"], entry[metric]) for entry in log_history if metric in entry]
    evaluation = sorted({e["step"]: e[f"eval_{metric}"] for e in log_history if f"eval_{metric}" in e}.items())
    figure = Figure(figsize=(8, 4.5 + 0.5 * len(samples)), dpi=100)
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(2, 1, height_ratios=[4.5, max(0.5 * len(samples), 1e-3)])
    axes = figure.add_subplot(grid[0])
    if train:
        _plot_training(axes, *zip(*train), unit, metric)
    if evaluation:
        label = f"held-out {metric} (all held-out {unit})"
        axes.plot(*zip(*evaluation), "o-", color="tab:orange", linewidth=2, label=label)
        before = f"held-out {metric} before training"
        axes.axhline(evaluation[0][1], color="gray", linestyle="--", linewidth=1, label=before)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel(metric)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    # Below the axes: the labels are long, and inside they would hide the noisy per-step losses.
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, fontsize="small", frameon=False)
    if samples:
        text = figure.add_subplot(grid[1])
        text.axis("off")
        lines = []
        for sample in samples:
            lines.append(
                f"Q: {_short(sample.question)}" + (f"   (data: {_short(sample.reference)})" if sample.reference else "")
            )
            lines.append(f"    before: {_short(sample.before)}")
            lines.append(f"    after:  {_short(sample.after)}")
        text.text(0, 1, "\n".join(lines), va="top", family="monospace", fontsize=8)
    figure.tight_layout()
    return figure


def _plot_training(axes: Axes, steps: Sequence[int], losses: Sequence[float], unit: str, metric: str = "loss") -> None:
    """Each logged training loss (GRPO: reward) (faint), and over a quarter of the logs their moving average,
    drawn from the step where its window first fills; each label says how many optimizer steps a point averages."""
    window = max(1, len(losses) // 4)
    per_log = _logged_steps(steps, 1)
    each = "of each step" if per_log == 1 else f"of each log (mean of its {per_log} steps)"
    averaged = f"training {metric}, mean of the last {_logged_steps(steps, window)} steps ({unit} of each batch)"
    axes.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=1, label=f"training {metric} {each}")
    axes.plot(steps[window - 1 :], moving_average(losses, window), color="tab:blue", linewidth=2, label=averaged)


def _logged_steps(steps: Sequence[int], logs: int) -> int:
    """How many optimizer steps the last ``logs`` training-loss logs cover: a log averages the steps since
    the one before (the first, those since step 0)."""
    return steps[-1] - (steps[-1 - logs] if len(steps) > logs else 0)


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """The mean of each ``window`` consecutive values, from the ``window``-th value on (none before: an average
    of the first few values alone is one noisy batch drawn as a trend; a bias-corrected exponential average
    would start at the first value too)."""
    sums = [0.0]
    for value in values:
        sums.append(sums[-1] + value)
    return [(sums[i] - sums[i - window]) / window for i in range(window, len(values) + 1)]


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
