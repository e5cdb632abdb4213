"""Smoke runs of the benchmark's code path on the tiny shape (nothing here is timed or compared for speed)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from deltatune.bench import step as bench
from deltatune.bench.options import MODES, SHAPES
from deltatune.bench.report import format_report, summarize
from deltatune.cli.main import main as cli_main
from deltatune.errors import ConfigError

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

TINY = SHAPES["tiny"]


def train(mode: str, dropout: float = 0.0) -> dict:
    return bench.train_job(TINY, mode, "cpu", steps=1, warmup=1, rank=4, dropout=dropout)


def test_train_job_measures_every_mode_and_the_floor_trains_nothing():
    results = {mode: train(mode) for mode in MODES}
    for mode, result in results.items():
        assert result["tokens_per_s"] > 0 and result["tokens_per_cpu_s"] > 0 and len(result["step_s"]) == 1, mode
        assert result["peak_mib"] > result["step_mib"] > 0 and result["saved_mib"] > 0, mode
    assert results["floor"]["trainable"] == 0
    assert results["fused"]["trainable"] == results["plain"]["trainable"] == results["peft"]["trainable"] > 0
    saved = {mode: result["saved_mib"] for mode, result in results.items()}
    # layer by layer, LoRA keeps each projection's input, as peft does; the fused MLP keeps x, gate(x), up(x) only
    assert saved["fused"] == saved["fused-eager"] < saved["fused-layer"]
    assert saved["fused-layer"] == pytest.approx(saved["plain"])
    assert saved["peft"] > saved["plain"]  # the same layers, and the model's own loss keeps [tokens, vocab] logits
    assert saved["floor"] < saved["fused-layer"]


def test_with_dropout_the_fused_path_saves_less_than_peft():
    """peft keeps a dropped copy of x per projection; the fused path regenerates the mask instead."""
    fused, peft = train("fused", dropout=0.1), train("peft", dropout=0.1)
    assert fused["saved_mib"] < peft["saved_mib"]
    assert fused["saved_mib"] == pytest.approx(train("fused")["saved_mib"])


def test_infer_and_wrap_jobs_report_every_variant():
    infer = bench.infer_job(TINY, "cpu", steps=3, warmup=0, rank=4)
    assert set(infer) == {"base_ms", "unmerged_ms", "unmerged_plain_ms", "merged_ms"} and min(infer.values()) > 0
    wrap = bench.wrap_job(TINY, "meta", rank=4, libraries=["deltatune", "peft"])
    assert set(wrap) == {"deltatune_s", "peft_s"} and min(wrap.values()) > 0


def test_saved_section_on_meta_gives_the_differences_between_modes_of_a_real_step():
    """On meta, attention's math kernel makes o_proj's input a copy, where CPU/GPU flash kernels hand
    o_proj a view of what attention saved anyway: one [tokens, hidden] tensor per layer more in every
    LoRA mode. Apart from that, every difference to the floor is the real one, to the byte."""
    meta = bench.saved_job(TINY, MODES, rank=4, dropout=0.0)
    real = {mode: train(mode)["saved_mib"] for mode in MODES}
    o_proj_input_mib = TINY.tokens * TINY.hidden * 4 * TINY.layers / 2**20
    for mode in MODES[1:]:
        meta_extra = (meta[f"{mode}_gib"] - meta["floor_gib"]) * 1024
        # peft's modes train through the model's own loss (the floor through deltatune's): its scalars count a
        # few bytes differently on meta. (peft's DoRA detaches a graph on every call: the count keeps what that
        # graph saved alive, so its freed storages' addresses are not reused and counted once for two.)
        tolerance = 64 / 2**20 if mode.startswith("peft") else 1e-9
        assert meta_extra == pytest.approx(real[mode] - real["floor"] + o_proj_input_mib, abs=tolerance), mode
    assert (
        meta["fused_gib"] < meta["fused-layer_gib"] == meta["plain_gib"] < meta["peft_gib"]
    )  # peft: + the full logits
    report = {
        "settings": {"device": "cpu"},
        "summary": {},
        "infer": [],
        "wrap": [],
        "saved": [{"shape": "tiny", **meta}],
    }
    assert "| floor | fused | fused-eager | fused-layer | plain | peft |" in format_report(report)


def test_summary_takes_medians_over_repeats_and_ratios_to_floor_and_peft():
    runs = {"floor": ((100, 90, 110), 10.0), "fused": ((95, 99, 80), 11.0), "peft": ((50, 40, 60), 20.0)}
    records = [
        {
            "shape": "tiny",
            "mode": mode,
            "tokens_per_s": s,
            "tokens_per_cpu_s": 2 * s,
            "peak_mib": peak,
            "saved_mib": 1.0,
        }
        for mode, (speeds, peak) in runs.items()
        for s in speeds
    ]
    report = {"settings": {"device": "cpu", "dtype": None}, "train": records, "infer": [], "wrap": [], "saved": []}
    summary = summarize(report)["tiny"]
    assert summary["fused"]["tokens_per_cpu_s"] == 2 * 95 and summary["fused"]["tokens_per_s_range"] == [80, 99]
    fused = summary["fused"]  # ratios use the CPU clock on CPU: 190 / 200 and 190 / 100
    assert fused["speed_vs_floor"] == pytest.approx(0.95) and fused["speed_vs_peft"] == pytest.approx(1.9)
    assert fused["memory_vs_floor"] == pytest.approx(1.1) and fused["memory_vs_peft"] == pytest.approx(0.55)
    report["summary"] = summarize(report)
    table = format_report(report)
    assert "| fused | 190 (160-198) | 0.95x | 1.90x | 95 | 11.0 | 1.10x | 0.55x | 1.0 |" in table


@pytest.mark.subprocess
def test_cli_runs_each_mode_in_a_child_process_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = [
        "bench",
        "--shapes",
        "tiny",
        "--modes",
        "fused",
        "--sections",
        "train",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--threads",
        "1",
        "--json",
        str(out),
    ]
    assert cli_main(argv) == 0
    report = json.loads(out.read_text())
    assert [r["mode"] for r in report["train"]] == ["fused"] and report["environment"]["torch"]
    assert "| fused |" in capsys.readouterr().out


def test_cuda_request_without_cuda_is_a_one_line_error(capsys, monkeypatch):
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    assert cli_main(["bench", "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_families_job_measures_both_libraries_and_reports_the_ratio(capsys):
    from argparse import Namespace

    from deltatune.bench.families import format_families, run_families

    args = Namespace(
        families=["lora"], shapes=["tiny"], device="cpu", repeats=1, steps=1, warmup=1, isolate=False, threads=None
    )
    report = run_families(args)
    assert [(r["family"], r["library"]) for r in report["families"]] == [("lora", "deltatune"), ("lora", "peft")]
    entry = report["family_summary"]["lora"]
    assert entry["trainable"] > 0 and entry["speed_vs_peft"] > 0 and entry["memory_vs_peft"] > 0
    assert "| lora | 8,192 |" in format_families(report)


def test_families_refuses_an_unknown_family_by_name():
    from argparse import Namespace

    from deltatune.bench.families import run

    with pytest.raises(ConfigError, match="--families boft: unknown"):
        run(Namespace(families=["boft"], device="cpu"))


@pytest.mark.subprocess
def test_grpo_bench_runs_both_libraries_on_a_tiny_model(tmp_path):
    from deltatune.bench.grpo import format_grpo, run_grpo_bench
    from sft_helpers import save_tiny_chat_model

    folder = save_tiny_chat_model(tmp_path / "model")
    report = run_grpo_bench(str(folder), steps=2, generations=2, batch=4, completion=4, repeats=1)
    for library in ("deltatune", "trl"):
        entry = report["summary"][library]
        assert entry["step"] > 0 and entry["generation"] > 0 and entry["peak_rss_mib"] > 0
        assert entry["step"] >= entry["generation"] + entry["scoring"]
    assert "| deltatune |" in format_grpo(report) and "x TRL's steps per second" in format_grpo(report)
    assert report["environment"]["torch"] and report["environment"]["trl"]  # the machine and versions it ran on


def test_the_grpo_bench_scores_with_the_examples_rewards_which_a_bare_wrong_number_cannot_game():
    from deltatune.bench.grpo import REWARD_WEIGHTS, example_rewards, greedy_reward

    rewards = {named.name: named.function for named in example_rewards()}
    assert list(rewards) == list(REWARD_WEIGHTS) == ["correct", "close", "number_only"]
    answers = [[{"role": "assistant", "content": text}] for text in ("It is 420.", " 420 ", " 11 ")]
    solution = ["420", "421", "660"]
    assert rewards["correct"](["q"] * 3, answers, None, solution) == [1.0, 0.0, 0.0]
    assert rewards["number_only"](answers, solution) == [0.0, 0.0, 0.0]  # the format pays only a right answer
    assert rewards["close"](answers, ["420", "420", "420"])[:2] == [1.0, 1.0]

    class Replies:  # a "model" whose greedy answers are fixed, through the bench's own scoring
        def eval(self):
            pass

        def generate(self, input_ids, **kwargs):
            return torch.cat([input_ids, torch.tensor([[int(next(texts))]])], dim=1)

    texts = iter(["420", "7"])

    class Tokenizer:
        def apply_chat_template(self, prompt, **kwargs):
            return torch.tensor([[1, 2]])

        def decode(self, ids, **kwargs):
            return str(ids[0].item())

    rows = [{"prompt": [{"role": "user", "content": "q"}], "solution": s} for s in ("420", "420")]
    scored = greedy_reward(Replies(), Tokenizer(), rows, 4, example_rewards())
    assert scored["held_out_accuracy"] == 0.5
    expected = (1.0 + 0.5 * 1.0 + 0.5 * 1.0 + 0.5 * (1 / (1 + abs(math.log10(7 / 420))))) / 2
    assert scored["held_out_reward"] == pytest.approx(expected)


def test_serve_bench_answers_every_request_rightly_on_a_tiny_model(tmp_path):
    """The mixed-adapter bench on a tiny chat model: every side answers every request, each answer equal to the
    request answered alone (so the throughput it prints is of right answers), with the ratios it reports."""
    from deltatune.bench.serve import format_serve, run_serve_bench
    from sft_helpers import save_tiny_chat_model

    folder = save_tiny_chat_model(tmp_path / "model")
    report = run_serve_bench(str(folder), 4, 6, 5, [1, 4], repeats=1, folder=str(tmp_path), prompts=3)
    for k in ("1", "4"):
        entry = report["summary"][k]
        for side in ("deltatune", "peft", "one_by_one"):
            assert entry[side]["tokens"] > 6 and entry[side]["wrong_answers"] == 0, (k, side)
        assert entry["deltatune"]["ttft_p50"] > 0 and entry["deltatune"]["itl_p99"] >= entry["deltatune"]["itl_p50"]
        assert entry["ratios"]["vs_peft"] > 0 and entry["ratios"]["vs_peft_paired"] > 0
    assert report["summary"]["1"]["ratios"]["vs_one_adapter"] == 1.0
    assert report["environment"]["cpu_count"] and report["environment"]["peft"]
    assert "| 4 |" in format_serve(report) and "(3 distinct prompts)" in format_serve(report)


def test_the_serve_summary_divides_the_medians_and_takes_the_median_of_each_repeats_own_ratio():
    """Two repeats, the second on a machine running at half speed for both sides: the medians' ratio mixes the
    two minutes, each repeat's own ratio does not."""
    from deltatune.bench.serve import summarise

    def record(side, repeat, speed, k=1):
        return {"side": side, "distinct": k, "repeat": repeat, "tokens_per_s": speed, "wrong_answers": 0}

    speeds = {"deltatune": (200, 90), "peft": (100, 40)}  # repeat 1 at full speed, repeat 2 slowed
    records = [record(side, i + 1, speed) for side, pair in speeds.items() for i, speed in enumerate(pair)]
    records += [record("one_by_one", 1, 20)]
    ratios = summarise(records, [1])["1"]["ratios"]
    assert ratios["vs_peft"] == pytest.approx(145 / 70)  # medians 145 and 70
    assert ratios["vs_peft_paired"] == pytest.approx((2.0 + 2.25) / 2)  # 200 / 100 and 90 / 40
    assert ratios["vs_one_by_one"] == pytest.approx(145 / 20) and ratios["vs_one_adapter"] == 1.0


def test_the_serve_bench_asks_distinct_prompts_unless_told_otherwise(tmp_path):
    """By default every request asks its own prompt (no two rows can share a prefill); a count the benchmark
    cannot give is refused before anything runs."""
    from transformers import AutoTokenizer

    from deltatune.bench.serve import PROMPTS, prompt_ids
    from sft_helpers import save_tiny_chat_model

    tokenizer = AutoTokenizer.from_pretrained(save_tiny_chat_model(tmp_path / "model"))
    assert len({tuple(ids) for ids in prompt_ids(tokenizer, 16, 16)}) == 16 == len(PROMPTS)
    assert len({tuple(ids) for ids in prompt_ids(tokenizer, 16, 8)}) == 8
    with pytest.raises(ConfigError, match="prompts=17: the benchmark has 1 to 16 distinct prompts"):
        prompt_ids(tokenizer, 16, 17)


def test_the_serve_bench_command_refuses_a_prompt_count_in_one_line(capsys):
    assert cli_main(["bench", "--serve", "--serve-prompts", "17"]) == 2
    assert (
        capsys.readouterr().err.strip()
        == "deltatune bench: error: prompts=17: the benchmark has 1 to 16 distinct prompts"
    )
