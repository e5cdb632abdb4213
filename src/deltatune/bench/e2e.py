"""``deltatune bench --e2e``: the same SFT run through ``deltatune train`` and through TRL + peft, end to end.

The quick start's task (SmolLM2-135M-Instruct, chatterbot question/answer pairs as conversational
prompt/completion rows, loss on the answers only) with the same hyper-parameters in every run: LoRA
r=8, alpha 16, dropout 0.05 on every linear layer, batch 8, max_length 128, AdamW at 1e-3 with a
cosine schedule after 5 warm-up steps. The runs, each in its own process, interleaved over repeats:

- ``deltatune``: ``deltatune train`` as the CLI runs it (``precision=auto``: fp32 on a CPU);
- ``trl-fair``: TRL's ``SFTTrainer`` with a peft ``LoraConfig``, tuned fairly: no gradient
  checkpointing and deltatune's precision (fp32 on a CPU, bf16 on a GPU that has it);
- ``trl-defaults``: the same with TRL's own defaults (gradient checkpointing on, bf16), as users run it.

Every run's idle OpenMP threads wait as ``deltatune train``'s do (a short spin, ``threads.openmp_environment``).
Each run reports wall and CPU seconds per step (the median after ``WARMUP_STEPS``), tokens per second
counting real tokens only (non-padding inputs of the training forward passes), the peak resident
memory up to the end of training (and the peak CUDA memory on a GPU). Afterwards one process scores
every saved adapter, and the base model, on the same held-out rows with the same code
(``train.evaluate.heldout_loss``), so the losses are comparable whatever each trainer logged.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from deltatune.bench.child import report, run_in_child

RUNS = ("deltatune", "trl-fair", "trl-defaults")
WARMUP_STEPS = 2  # the first steps (allocations, kernel choice) are not timed
SETTINGS = {
    "r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.05,
    "batch_size": 8,
    "max_length": 128,
    "learning_rate": 1e-3,
    "warmup_steps": 5,
    "seed": 0,
}


def prepare_data(folder: Path, eval_fraction: float = 0.1, seed: int = 0) -> tuple[Path, Path]:
    """chatterbot split as ``deltatune train`` splits it, written as conversational prompt/completion JSONL."""
    from deltatune.data import load_sources, split_records

    records = load_sources("chatterbot")[0].records
    train, held_out = split_records(records, eval_fraction, seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "train.jsonl", folder / "eval.jsonl"
    for path, rows in zip(paths, (train, held_out)):
        lines = [
            json.dumps({"prompt": [m.as_dict() for m in r.messages[:-1]], "completion": [r.messages[-1].as_dict()]})
            for r in rows
        ]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return paths


class StepMeter(TrainerCallback):
    """Times each optimizer step (wall and process CPU) and counts the real tokens of the training forward
    passes (the attention mask's ones, or every token of a padding-free row)."""

    def __init__(self) -> None:
        self.tokens = 0
        self.steps: list[tuple[float, float, int]] = []
        self.rss_start = self.peak_rss = 0
        self.started = (0.0, 0.0, 0)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.rss_start = _rss_bytes()
        model.register_forward_pre_hook(self.count, with_kwargs=True)

    def on_step_begin(self, args, state, control, **kwargs):
        self.started = (time.perf_counter(), time.process_time(), self.tokens)

    def on_step_end(self, args, state, control, **kwargs):
        wall, cpu, tokens = self.started
        self.steps.append((time.perf_counter() - wall, time.process_time() - cpu, self.tokens - tokens))

    def on_train_end(self, args, state, control, **kwargs):
        self.peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def count(self, module, args, kwargs) -> None:
        if module.training:
            mask, ids = kwargs.get("attention_mask"), kwargs.get("input_ids")
            self.tokens += int(mask.sum()) if mask is not None else ids.numel()

    def result(self) -> dict[str, Any]:
        timed = self.steps[WARMUP_STEPS:] or self.steps
        result = {
            "steps": len(self.steps),
            "step_s": statistics.median(s[0] for s in timed),
            "cpu_step_s": statistics.median(s[1] for s in timed),
            "tokens_per_s": sum(s[2] for s in timed) / sum(s[0] for s in timed),
            "peak_rss_mib": self.peak_rss / 2**20,
            "rss_train_start_mib": self.rss_start / 2**20,
            "step_times": [s[0] for s in self.steps],
        }
        import torch

        if torch.cuda.is_available():
            result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
        return result


def _rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def deltatune_job(train: str, held_out: str, out: str, steps: int) -> dict:
    """``deltatune train`` on the files, as the CLI runs it, with the meter as an extra callback."""
    from deltatune.train.config import TrainConfig
    from deltatune.train.run import run_training

    meter = StepMeter()
    config = TrainConfig.from_dict(
        {**SETTINGS, "data": train, "eval_data": held_out, "max_steps": steps, "output_dir": out, "logging_steps": 1}
    )
    result = run_training(config, log=lambda line: print(line, file=sys.stderr), callbacks=[meter])
    return {**meter.result(), "adapter": result.adapter_dir}


def trl_job(train: str, out: str, steps: int, defaults: bool) -> dict:
    """TRL's SFTTrainer + a peft LoraConfig on the same file and hyper-parameters."""
    import peft
    import torch
    import trl
    from datasets import Dataset

    from deltatune.runtime.assets import smollm2_path
    from deltatune.train.precision import mixed_precision_flags

    meter = StepMeter()
    rows = [json.loads(line) for line in Path(train).read_text(encoding="utf-8").splitlines()]
    tuned = {} if defaults else {"gradient_checkpointing": False, **mixed_precision_flags("auto")}
    args = trl.SFTConfig(
        output_dir=out,
        max_steps=steps,
        per_device_train_batch_size=SETTINGS["batch_size"],
        max_length=SETTINGS["max_length"],
        learning_rate=SETTINGS["learning_rate"],
        lr_scheduler_type="cosine",
        warmup_steps=SETTINGS["warmup_steps"],
        seed=SETTINGS["seed"],
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        **tuned,
    )
    lora = peft.LoraConfig(
        r=SETTINGS["r"],
        lora_alpha=SETTINGS["lora_alpha"],
        lora_dropout=SETTINGS["lora_dropout"],
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    trainer = trl.SFTTrainer(
        model=str(smollm2_path()), args=args, train_dataset=Dataset.from_list(rows), peft_config=lora, callbacks=[meter]
    )
    trainer.train()
    trainer.model.save_pretrained(out)
    return {**meter.result(), "adapter": out, "bf16": args.bf16, "gradient_checkpointing": args.gradient_checkpointing}


def score_job(held_out: str, adapters: dict[str, str]) -> dict:
    """Held-out loss of the base and of every adapter (peft-format folders), one model, one code path."""
    from deltatune.data import collate_causal, encode_records, load_sources
    from deltatune.model import DeltaModel
    from deltatune.runtime.assets import smollm2_path
    from deltatune.runtime.loading import load_causal_lm, load_tokenizer
    from deltatune.train.evaluate import heldout_loss

    tokenizer = load_tokenizer(smollm2_path())
    records = load_sources(held_out)[0].records
    examples = encode_records(tokenizer, records, SETTINGS["max_length"]).examples
    base = load_causal_lm(smollm2_path())
    base.config.use_cache = False
    (first, folder), *others = adapters.items()
    model = DeltaModel.from_pretrained(base, folder, adapter_name=first)
    for name, folder in others:
        model.load_adapter(folder, adapter_name=name)
    collate = lambda batch: collate_causal(batch, tokenizer.pad_token_id)  # noqa: E731
    losses: dict[str, float] = {}
    for name in adapters:
        model.set_adapter(name)
        losses[name] = heldout_loss(model, examples, collate)
    with model.disable_adapter():
        losses["base"] = heldout_loss(model, examples, collate)
    return {"heldout_loss": losses, "examples": len(examples)}


def _run_child(job: dict) -> dict:
    """One run in its own process; every run's idle OpenMP threads wait as ``deltatune train``'s do."""
    return run_in_child("deltatune.bench.e2e", job, waits_as="train")


def run_e2e(folder: Path, steps: int, repeats: int, default_steps: int, runs: list[str]) -> dict:
    """Every run of ``runs``, interleaved over ``repeats`` (``trl-defaults`` once, for ``default_steps``),
    then the scoring of every adapter; returns the JSON-ready report with its summary."""
    from deltatune.bench.machine import environment

    train, held_out = prepare_data(folder / "data")
    import trl

    report: dict[str, Any] = {
        "environment": {**environment("cuda" if _cuda() else "cpu", None), "trl": trl.__version__},
        "settings": {**SETTINGS, "steps": steps, "default_steps": default_steps},
        "runs": [],
    }
    for repeat in range(repeats):
        for run in runs:
            if run == "trl-defaults" and repeat:
                continue
            out = str(folder / f"{run}-{repeat}")
            if run == "deltatune":
                job = {"kind": "deltatune", "train": str(train), "held_out": str(held_out), "out": out, "steps": steps}
            else:
                job = {
                    "kind": "trl",
                    "train": str(train),
                    "out": out,
                    "defaults": run == "trl-defaults",
                    "steps": default_steps if run == "trl-defaults" else steps,
                }
            result = {"run": run, "repeat": repeat, **_run_child(job)}
            report["runs"].append(result)
            print(
                f"  {run:<12} repeat {repeat}: {result['step_s']:.2f} s/step, {result['tokens_per_s']:,.0f} tok/s, "
                f"peak RSS {result['peak_rss_mib']:,.0f} MiB",
                flush=True,
            )
    adapters = {f"{r['run']}-{r['repeat']}": r["adapter"] for r in report["runs"]}
    report["score"] = _run_child({"kind": "score", "held_out": str(held_out), "adapters": adapters})
    report["summary"] = summarize(report)
    return report


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def summarize(report: dict) -> dict[str, dict[str, float]]:
    """Per run: medians over repeats of each measure, the held-out loss, and ratios to ``trl-fair``."""
    losses = report["score"]["heldout_loss"]
    summary: dict[str, dict[str, float]] = {}
    for run in dict.fromkeys(r["run"] for r in report["runs"]):
        entries = [r for r in report["runs"] if r["run"] == run]
        summary[run] = {
            key: statistics.median(e[key] for e in entries)
            for key in ("step_s", "cpu_step_s", "tokens_per_s", "peak_rss_mib", "rss_train_start_mib")
        }
        summary[run]["heldout_loss"] = statistics.median(losses[f"{run}-{e['repeat']}"] for e in entries)
    fair = summary.get("trl-fair")
    for entry in summary.values():
        if fair:
            entry["speed_vs_trl_fair"] = entry["tokens_per_s"] / fair["tokens_per_s"]
            entry["peak_rss_vs_trl_fair"] = entry["peak_rss_mib"] / fair["peak_rss_mib"]
            entry["train_memory_vs_trl_fair"] = (entry["peak_rss_mib"] - entry["rss_train_start_mib"]) / max(
                fair["peak_rss_mib"] - fair["rss_train_start_mib"], 1e-9
            )
    summary["base"] = {"heldout_loss": losses["base"]}
    return summary


def format_report(report: dict) -> str:
    """The summary as a Markdown table."""
    lines = [
        "| run | s/step | CPU s/step | tokens/s | vs trl-fair | peak RSS MiB | vs trl-fair | "
        "training's RSS vs trl-fair | held-out loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run, e in report["summary"].items():
        if run == "base":
            continue
        lines.append(
            f"| {run} | {e['step_s']:.2f} | {e['cpu_step_s']:.2f} | {e['tokens_per_s']:,.0f} | "
            f"{e.get('speed_vs_trl_fair', float('nan')):.2f}x | {e['peak_rss_mib']:,.0f} | "
            f"{e.get('peak_rss_vs_trl_fair', float('nan')):.2f}x | "
            f"{e.get('train_memory_vs_trl_fair', float('nan')):.2f}x | {e['heldout_loss']:.4f} |"
        )
    lines.append(f"| base (no adapter) | | | | | | | | {report['summary']['base']['heldout_loss']:.4f} |")
    return "\n".join(lines)


def _dispatch(job: dict) -> dict:
    kind = job.pop("kind")
    return {"deltatune": deltatune_job, "trl": trl_job, "score": score_job}[kind](**job)


if __name__ == "__main__":
    report(_dispatch(json.loads(sys.argv[1])))
