"""``deltatune bench --grpo``: GRPO steps of deltatune against TRL's ``GRPOTrainer`` + peft, side by side.

The same model, prompts (``units-synthetic``, chat prompts), reward functions (``correct``: the last number is the
answer; ``number_only``: the reply is a number alone) and settings in both: LoRA r=8 on every linear layer,
``num_generations`` completions of at most ``max_completion_length`` tokens per prompt at temperature 1.0,
``beta=0`` (no reference pass), TRL's default ``loss_type="dapo"``, AdamW at a constant learning rate, fp32 on a
CPU, no gradient checkpointing (TRL's default turns it on; it costs time and saves memory neither side needs
here), and TRL's own generation (no vLLM). Each library runs in its own process and reports, per optimizer
step after the first, the median seconds of the whole step and of its generation (deltatune:
``GRPOTrainer.sample``; TRL: ``GRPOTrainer._generate``) and scoring (the reward functions), the rest being
training; its peak resident memory; and the held-out reward of greedy answers after training, computed by the
same code for both (``transformers``' ``generate`` and the same reward functions).
"""

from __future__ import annotations

import json
import re
import resource
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

RESULT_PREFIX = "GRPO_RESULT "
LIBRARIES = ("deltatune", "trl")
NUMBER = re.compile(r"-?\d[\d,]*")


def correct(prompts, completions, completion_ids, solution, **kwargs) -> list[float]:
    """1.0 when the last number of the answer is the solution."""
    found = [NUMBER.findall(c[0]["content"]) for c in completions]
    return [float(bool(n) and n[-1].replace(",", "") == s) for n, s in zip(found, solution)]


def number_only(completions, **kwargs) -> list[float]:
    """1.0 when the answer is a number alone."""
    return [float(re.fullmatch(r"\s*-?[\d,]+\.?\s*", c[0]["content"]) is not None) for c in completions]


class Clock:
    """Seconds spent inside wrapped functions, per optimizer step."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = defaultdict(float)

    def wrap(self, name: str, function):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.spent[name] += time.perf_counter() - started

        timed.__name__ = getattr(function, "__name__", name)
        return timed


def prompt_rows(held_out: int = 16) -> tuple[list[dict], list[dict]]:
    """(train, held-out) rows of ``units-synthetic``: chat prompts with their solution, split by a fixed seed."""
    from deltatune.data import load_sources, split_records

    train, evaluation = split_records(load_sources("units-synthetic")[0].records, 0.1, 0)
    rows = [
        [{"prompt": [m.as_dict() for m in r.prompt], **dict(r.columns)} for r in part] for part in (train, evaluation)
    ]
    return rows[0], rows[1][:held_out]


def grpo_job(library: str, model: str, steps: int, generations: int, batch: int, completion: int, seed: int) -> dict:
    """Train ``steps`` GRPO steps with ``library``; return its timings, peak memory and held-out reward."""
    import torch
    from transformers import AutoModelForCausalLM, TrainerCallback

    from deltatune.runtime.loading import load_tokenizer, model_folder

    torch.manual_seed(seed)
    path = model_folder(model)
    tokenizer = load_tokenizer(path)
    train, evaluation = prompt_rows()
    clock, step_times = Clock(), []
    rewards = [clock.wrap("scoring", correct), clock.wrap("scoring", number_only)]

    class Steps(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()
            clock.spent.clear()

        def on_step_end(self, args, state, control, **kwargs):
            step_times.append({"step": time.perf_counter() - self.started, **clock.spent})

    common = dict(
        output_dir=str(Path("/tmp") / f"bench-grpo-{library}"),
        per_device_train_batch_size=batch,
        learning_rate=5e-4,
        lr_scheduler_type="constant",
        max_steps=steps,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=not torch.cuda.is_available(),
        seed=seed,
        gradient_checkpointing=False,
    )
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if library == "trl":
        import peft
        from datasets import Dataset
        from trl import GRPOConfig, GRPOTrainer

        args = GRPOConfig(**common, num_generations=generations, max_completion_length=completion, beta=0.0)
        trainer = GRPOTrainer(
            model=base,
            reward_funcs=rewards,
            args=args,
            train_dataset=Dataset.from_list(train),
            processing_class=tokenizer,
            peft_config=peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"),
        )
        trainer._generate = clock.wrap("generation", trainer._generate)
    else:
        from transformers import TrainingArguments

        from deltatune import LoraConfig, get_delta_model
        from deltatune.data import PromptOnly
        from deltatune.data.records import Message
        from deltatune.train.grpo import GRPOTrainer, encode_prompts
        from deltatune.train.grpo_settings import GRPOSettings
        from deltatune.train.rewards import NamedReward

        records = [
            PromptOnly(
                tuple(Message(m["role"], m["content"]) for m in row["prompt"]), None, (("solution", row["solution"]),)
            )
            for row in train
        ]
        model = get_delta_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
        settings = GRPOSettings(num_generations=generations, max_completion_length=completion)
        trainer = GRPOTrainer(
            model,
            TrainingArguments(**common),
            train_dataset=encode_prompts(tokenizer, records, None).examples,
            rewards=[NamedReward(f.__name__, f) for f in rewards],
            settings=settings,
            processing_class=tokenizer,
        )
        trainer.sample = clock.wrap("generation", trainer.sample)
    trainer.add_callback(Steps())
    trainer.train()
    timed = step_times[1:] or step_times  # the first step allocates
    result: dict[str, Any] = {
        key: statistics.median(step.get(key, 0.0) for step in timed) for key in ("step", "generation", "scoring")
    }
    result["training"] = result["step"] - result["generation"] - result["scoring"]
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["held_out_reward"] = greedy_reward(trainer.model, tokenizer, evaluation, completion)
    return result


def greedy_reward(model, tokenizer, rows: list[dict], completion: int) -> float:
    """The mean of both rewards over greedy answers to ``rows``, one prompt at a time with ``generate``."""
    import torch

    model.eval()
    total = []
    for row in rows:
        ids = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, return_tensors="pt")
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        with torch.no_grad():
            out = model.generate(input_ids=ids, max_new_tokens=completion, do_sample=False)
        text = [[{"role": "assistant", "content": tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)}]]
        total.append(correct([row["prompt"]], text, None, [row["solution"]])[0] + number_only(text)[0])
    return sum(total) / max(len(total), 1)


def run_grpo_bench(model: str, steps: int, generations: int, batch: int, completion: int, repeats: int) -> dict:
    """Both libraries, each in its own process, interleaved over ``repeats``."""
    records = []
    for repeat in range(repeats):
        for library in LIBRARIES:
            job = dict(
                library=library,
                model=model,
                steps=steps,
                generations=generations,
                batch=batch,
                completion=completion,
                seed=repeat,
            )
            done = subprocess.run([sys.executable, "-m", __name__, json.dumps(job)], capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
            if done.returncode != 0 or not lines:
                raise RuntimeError(f"GRPO bench job {job} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
            records.append({**job, **json.loads(lines[-1][len(RESULT_PREFIX) :])})
            print(
                f"  {library:<9} repeat {repeat}: {records[-1]['step']:.2f} s/step, peak "
                f"{records[-1]['peak_rss_mib']:,.0f} MiB",
                flush=True,
            )
    summary = {
        library: {
            key: statistics.median(r[key] for r in records if r["library"] == library)
            for key in ("step", "generation", "scoring", "training", "peak_rss_mib", "held_out_reward")
        }
        for library in LIBRARIES
    }
    summary["ratios"] = {
        "steps_per_second_vs_trl": summary["trl"]["step"] / summary["deltatune"]["step"],
        "peak_memory_vs_trl": summary["deltatune"]["peak_rss_mib"] / summary["trl"]["peak_rss_mib"],
    }
    return {"records": records, "summary": summary}


def format_grpo(report: dict) -> str:
    summary = report["summary"]
    lines = [
        "| library | s/step | generation s | scoring s | training s | peak RSS MiB | held-out reward |",
        "|---|---|---|---|---|---|---|",
    ]
    for library in LIBRARIES:
        s = summary[library]
        lines.append(
            f"| {library} | {s['step']:.2f} | {s['generation']:.2f} | {s['scoring']:.3f} | {s['training']:.2f} | "
            f"{s['peak_rss_mib']:,.0f} | {s['held_out_reward']:.3f} |"
        )
    ratios = summary["ratios"]
    lines.append(
        f"\ndeltatune: {ratios['steps_per_second_vs_trl']:.2f}x TRL's steps per second, "
        f"{ratios['peak_memory_vs_trl']:.2f}x its peak memory"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    print(RESULT_PREFIX + json.dumps(grpo_job(**json.loads(sys.argv[1]))), flush=True)
