"""Train every method with its defaults on the embedded default; write docs/methods.md's tables and plots.

    .venv/bin/python scripts/compare_methods.py [max_steps=60] [key=value ...]
    .venv/bin/python scripts/compare_methods.py --only p_tuning [key=value ...]   # re-run some, keep the rest
    .venv/bin/python scripts/compare_methods.py --render                          # rewrite the docs only
    .venv/bin/python scripts/compare_methods.py --parallel 2 max_steps=200        # two runs at once

Each method runs as its own `deltatune train` process with nothing set but the budget (same data,
split, seed, steps and batch; held-out loss every `eval_steps`), so its peak resident memory (whole
process: the fp32 base model is ~0.54 GB of it) is measured alone. DoRA is `method=lora use_dora=true`.
Forgetting is the rise of the loss on text the task never shows (paragraphs of Python's own language
reference, `pydoc_data.topics`, shipped with Python), base model against base + adapter, through
`deltatune eval`. Held-out loss is the mean per-token
loss on the same held-out chatterbot answers. Results are kept per budget (outputs/methods/results-N.json
for max_steps=N); the script rewrites the first section of docs/methods.md (up to its first "## " heading)
with a table per budget kept, and docs/methods-N.png for each: held-out loss against step, one line per
method, the base model dashed.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import transformers
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from deltatune.train.methods import option_defaults

ROOT = Path(__file__).resolve().parent.parent
METHODS = [
    "lora",
    "dora",
    "bottleneck",
    "prefix_tuning",
    "p_tuning",
    "prompt_tuning",
    "ia3",
    "loha",
    "lokr",
    "oft",
    "vera",
    "adalora",
]
METHOD_KEYS = {"dora": ["method=lora", "use_dora=true"]}  # a row that is a variant of a method
BUDGET = ["max_steps=60", "eval_steps=10", "eval_examples=48"]
UNSEEN_TEXT_ROWS = 64


def run(method: str, common: list[str], out: Path, environment: dict | None = None) -> dict:
    """Run one training process; return its metrics.json plus its peak RSS and wall time."""
    keys = METHOD_KEYS.get(method, [f"method={method}"])
    args = [sys.executable, "-m", "deltatune.cli.main", "train", *keys, f"output_dir={out}", *common]
    started = time.perf_counter()
    process = subprocess.Popen(
        args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=environment
    )
    _, status, usage = os.wait4(process.pid, 0)
    stderr = process.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{method} failed:\n{stderr[-2000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    curve = sorted({e["step"]: e["eval_loss"] for e in metrics["log_history"] if "eval_loss" in e}.items())
    wall_s = time.perf_counter() - started
    return {
        **metrics["result"],
        "config": metrics["config"],
        "curve": curve,
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "wall_s": wall_s,
        "unseen_text": unseen_text_losses(out / "adapter", out.parent / "unseen-text.jsonl", environment),
    }


def unseen_text(path: Path) -> None:
    """Write the unseen text: paragraphs of Python's language reference (``pydoc_data.topics``), one per row."""
    import pydoc_data.topics

    paragraphs = [
        paragraph.strip()
        for _, text in sorted(pydoc_data.topics.topics.items())
        for paragraph in text.split("\n\n")
        if len(paragraph) > 300 and "::=" not in paragraph
    ]
    rows = [json.dumps({"text": paragraph}) for paragraph in paragraphs[:UNSEEN_TEXT_ROWS]]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")


def unseen_text_losses(adapter: Path, data: Path, environment: dict | None = None) -> dict[str, float]:
    """{"base", "adapter"}: mean per-token loss on the unseen text, through ``deltatune eval``."""
    args = ["eval", "--adapter", str(adapter), "--data", str(data), "--max-examples", str(UNSEEN_TEXT_ROWS)]
    command = [sys.executable, "-m", "deltatune.cli.main", *args]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=environment)
    if done.returncode != 0:
        raise SystemExit(f"deltatune eval {adapter} failed:\n{done.stderr[-2000:]}")
    losses = dict(
        line.split(":")[0:1] + [line.split()[2]]
        for line in done.stdout.splitlines()
        if line.startswith(("base:", "adapter:"))
    )
    return {name: float(value) for name, value in losses.items()}


def main(argv: list[str]) -> None:
    """``--only a,b`` re-runs those methods and keeps the others' results from the last run at that budget;
    ``--render`` only rewrites the docs from the kept results; ``--parallel N`` runs N trainings at once, each
    on one thread (their speed columns are then one thread's)."""
    folder = ROOT / "outputs" / "methods"
    parallel = 1
    if argv[:1] == ["--parallel"]:
        parallel, argv = int(argv[1]), argv[2:]
    if argv[:1] != ["--render"]:
        only = argv[1].split(",") if argv[:1] == ["--only"] else METHODS
        common = _effective([*BUDGET, *(argv[2:] if only is not METHODS else argv)])
        saved = folder / f"results-{_steps(common)}.json"
        previous = dict(json.loads(saved.read_text())["rows"]) if only is not METHODS and saved.exists() else {}
        folder.mkdir(parents=True, exist_ok=True)
        unseen_text(folder / "unseen-text.jsonl")
        environment = {**os.environ, "OMP_NUM_THREADS": "1"} if parallel > 1 else None

        def one(method: str) -> dict:
            result = {**run(method, common, folder / method, environment), "defaults": _defaults(method)}
            print(
                f"{method:<14} loss {result['eval_before']['eval_loss']:.3f} -> "
                f"{result['eval_after']['eval_loss']:.3f}  "
                f"trainable {result['trainable_params']:,}  peak {result['peak_rss_mib']:.0f} MiB",
                flush=True,
            )
            return result

        with ThreadPoolExecutor(parallel) as pool:
            fresh = dict(zip([m for m in METHODS if m in only], pool.map(one, [m for m in METHODS if m in only])))
        rows = [(m, fresh[m] if m in fresh else previous[m]) for m in METHODS if m in fresh or m in previous]
        threads = "; one thread per run, several runs at once" if parallel > 1 else ""
        machine = (
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores{threads}; "
            f"torch {torch.__version__}, transformers {transformers.__version__}; {datetime.date.today().isoformat()}"
        )
        saved.write_text(json.dumps({"budget": common, "machine": machine, "rows": rows}, indent=1), encoding="utf-8")
    budgets = sorted(
        (json.loads(path.read_text()) for path in folder.glob("results-*.json")),
        key=lambda budget: _steps(budget["budget"]),
    )
    for budget in budgets:
        plot(budget["rows"], ROOT / "docs" / f"methods-{_steps(budget['budget'])}.png", " ".join(budget["budget"]))
    write_doc(budgets)


def _values(settings: list[str]) -> dict[str, str]:
    """key=value settings as a dict: the last value of each key, in the order keys first appear."""
    return dict(item.split("=", 1) for item in settings)


def _effective(settings: list[str]) -> list[str]:
    return [f"{key}={value}" for key, value in _values(settings).items()]


def _steps(settings: list[str]) -> int:
    return int(_values(settings)["max_steps"])


def plot(rows: list[tuple[str, dict]], path: Path, budget: str) -> None:
    figure = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for method, result in rows:
        axes.plot(*zip(*result["curve"]), "o-", markersize=3, label=method)
    axes.axhline(rows[0][1]["eval_before"]["eval_loss"], color="gray", linestyle="--", label="base model")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("held-out loss")
    axes.set_title(f"SmolLM2-135M-Instruct, chatterbot: each method's defaults\n{budget}", fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)


def _defaults(method: str) -> str:
    """The method's command-line defaults that matter most, as the code has them now."""
    variant = dict(key.split("=", 1) for key in METHOD_KEYS.get(method, [f"method={method}"]))
    defaults = {**option_defaults(variant.pop("method")), **variant}
    keys = ("r", "init_r", "oft_block_size", "target_modules", "use_dora", "placement", "num_virtual_tokens")
    keys += ("prompt_tuning_init",)
    shown = ", ".join(f"{key}={defaults[key]}" for key in keys if defaults.get(key) not in (None, 0))
    return shown or "peft's targets for the architecture"


def _settings(method: str, result: dict) -> str:
    """The defaults the run had (kept with its results), its learning rate and warm-up."""
    config = result["config"]
    defaults = result.get("defaults") or _defaults(method)
    return f"{defaults}, lr {config['learning_rate']:g}, warm-up {config['warmup_steps']}"


def write_doc(budgets: list[dict]) -> None:
    """The first section of docs/methods.md: what was run, then a plot and a table per budget."""
    lines = [
        "# Choosing a method",
        "",
        "Every method trained the embedded SmolLM2-135M-Instruct (fp32) on the chatterbot question/answer",
        "pairs with its defaults and the same split, seed, batch and budget (batch 8, the held-out loss of 48",
        "held-out rows every 10 steps), written by `scripts/compare_methods.py`: `deltatune train method=X`",
        "with nothing else set but the budget. Held-out loss is the mean per-token loss on the same held-out",
        "answers. Peak memory is the whole process's peak resident set (the frozen fp32 base model alone is",
        "~540 MB of it). Train seconds are wall time on a 2-core CPU (they include the evaluations every 10",
        "steps), tokens/s counts real tokens. DoRA is `method=lora use_dora=true`. Forgetting is the rise of the",
        "loss on text the task never shows (64 paragraphs of Python's language reference, `pydoc_data.topics`)",
        "from the base model to base + adapter (`deltatune eval`); lower is better.",
    ]
    for budget in budgets:
        steps = _steps(budget["budget"])
        lines += [
            "",
            f"### {steps} steps",
            "",
            f"`{' '.join(budget['budget'])}`; machine: {budget['machine']}.",
            "",
            f"![held-out loss against step over {steps} steps, one line per method](methods-{steps}.png)",
            "",
            *_table(budget["rows"]),
        ]
    doc = ROOT / "docs" / "methods.md"
    rest = doc.read_text(encoding="utf-8").split("\n## ", 1)
    doc.write_text("\n".join(lines) + "\n" + ("\n## " + rest[1] if len(rest) == 2 else ""), encoding="utf-8")


def _table(rows: list[tuple[str, dict]]) -> list[str]:
    base = rows[0][1]["eval_before"]["eval_loss"]
    lora_gain = base - rows[0][1]["eval_after"]["eval_loss"]
    lines = [
        "| method | defaults | trainable params | held-out loss: base -> step 10 -> end | share of LoRA's gain | "
        "worst after step 10 | forgetting | peak RSS MiB | train s | tokens/s | can merge |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, result in rows:
        curve = dict(result["curve"])
        after = result["eval_after"]["eval_loss"]
        worst = max(loss for step, loss in result["curve"] if step >= 10)
        lines.append(
            f"| {method} | {_settings(method, result)} | {result['trainable_params']:,} | "
            f"{base:.3f} -> {curve.get(10, float('nan')):.3f} -> {after:.3f} | {(base - after) / lora_gain:.0%} | "
            f"{worst:.3f}{' (above the base)' if worst > base else ''} | {_forgetting(result)} | "
            f"{result['peak_rss_mib']:.0f} | "
            f"{result['train_seconds']:.0f} | {result['tokens_per_second']:.0f} | "
            f"{'yes' if result['merged_max_logit_diff'] is not None else 'no'} |"
        )
    return lines


def _forgetting(result: dict) -> str:
    """The rise of the unseen text's loss (base -> adapter); runs from before it was measured have none."""
    losses = result.get("unseen_text")
    return f"{losses['adapter'] - losses['base']:+.3f}" if losses else "not measured"


if __name__ == "__main__":
    main(sys.argv[1:])
