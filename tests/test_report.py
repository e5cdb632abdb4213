"""loss.png and its pieces: the moving average, and a figure with the curves and the sample answers."""

from __future__ import annotations

from PIL import Image

from deltatune.train.report import moving_average, plot_losses
from deltatune.train.run import SampleAnswer


def test_moving_average_averages_each_value_with_the_ones_before() -> None:
    assert moving_average([4.0, 2.0, 6.0, 0.0], 2) == [4.0, 3.0, 4.0, 3.0]
    assert moving_average([1.0, 2.0, 3.0], 1) == [1.0, 2.0, 3.0]
    assert moving_average([], 3) == []


def test_the_figure_grows_a_panel_for_the_sample_answers(tmp_path) -> None:
    history = [{"step": 0, "eval_loss": 2.7}, *({"step": s, "loss": 3.0 - s / 20} for s in range(1, 21)),
               {"step": 10, "eval_loss": 2.3}, {"step": 20, "eval_loss": 2.0}]  # fmt: skip
    samples = [SampleAnswer("What is AI?", "Artificial intelligence.", "A long paragraph " * 20, "Machines.")] * 3
    plot_losses(tmp_path / "plain.png", history, "sft")
    plot_losses(tmp_path / "samples.png", history, "sft", samples)
    plain, with_samples = (Image.open(tmp_path / name).size for name in ("plain.png", "samples.png"))
    assert with_samples[0] == plain[0] and with_samples[1] > plain[1]
