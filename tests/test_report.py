"""loss.png and its pieces: the moving average, and a figure with the curves and the sample answers."""

from __future__ import annotations

import pytest
from PIL import Image

from deltatune.train.report import loss_figure, moving_average, plot_losses
from deltatune.train.run import SampleAnswer

LOGS = 20  # training-loss logs of a run: its moving average spans a quarter of them, 5


def _history(every: int = 1) -> list[dict]:
    """A run's log history: the held-out loss before, at half-way and at the end; a training loss every ``every``
    steps."""
    last = every * LOGS
    training = [{"step": step, "loss": 3.0 - step / last} for step in range(every, last + 1, every)]
    held_out = [{"step": 0, "eval_loss": 2.7}, {"step": last // 2, "eval_loss": 2.3}, {"step": last, "eval_loss": 2.0}]
    return [held_out[0], *training, *held_out[1:]]


def test_moving_average_starts_when_its_window_fills() -> None:
    assert moving_average([4.0, 2.0, 6.0, 0.0], 2) == [3.0, 4.0, 3.0]
    assert moving_average([1.0, 2.0, 3.0], 1) == [1.0, 2.0, 3.0]
    assert moving_average([1.0, 2.0, 3.0], 3) == [2.0]
    assert moving_average([1.0], 2) == []
    assert moving_average([], 3) == []


@pytest.mark.parametrize(
    ("every", "unit", "each", "window_steps"),
    [
        (1, "answer tokens", "of each step", 5),
        (2, "pairs", "of each log (mean of its 2 steps)", 10),
    ],
)
def test_the_average_starts_at_a_full_window_and_the_legend_says_what_each_curve_averages(
    every: int, unit: str, each: str, window_steps: int
) -> None:
    """A newcomer compares the training and held-out curves: the average must not start at one batch's loss,
    and each label says how many steps and which tokens (or pairs) a point averages."""
    history = _history(every)
    axes = loss_figure(history, "sft", unit=unit).axes[0]
    labels = [text.get_text() for text in axes.get_legend().get_texts()]
    assert labels == [
        f"training loss {each}",
        f"training loss, mean of the last {window_steps} steps ({unit} of each batch)",
        f"held-out loss (all held-out {unit})",
        "held-out loss before training",
    ]
    average = next(line for line in axes.get_lines() if line.get_label() == labels[1])
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert list(average.get_xdata()) == list(range(window_steps, every * LOGS + 1, every))
    assert average.get_ydata()[0] == pytest.approx(sum(losses[:5]) / 5)


def test_the_figure_grows_a_panel_for_the_sample_answers(tmp_path) -> None:
    samples = [SampleAnswer("What is AI?", "Artificial intelligence.", "A long paragraph " * 20, "Machines.")] * 3
    plot_losses(tmp_path / "plain.png", _history(), "sft")
    plot_losses(tmp_path / "samples.png", _history(), "sft", samples)
    plain, with_samples = (Image.open(tmp_path / name).size for name in ("plain.png", "samples.png"))
    assert with_samples[0] == plain[0] and with_samples[1] > plain[1]
