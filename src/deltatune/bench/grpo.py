"""``deltatune bench --grpo``: GRPO steps of deltatune against TRL's ``GRPOTrainer`` + peft, side by side.

The same model, prompts (``units-synthetic``, chat prompts), reward functions (``examples/rewards.py``'s, as
``examples/grpo.yaml`` weighs them: ``correct`` 1, ``close`` 0.5, ``number_only`` 0.5; a format reward that paid
wrong answers was gamed, see that file) and settings in both: LoRA r=8 on every linear layer,
``num_generations`` completions of at most ``max_completion_length`` tokens per prompt at temperature 1.0,
``beta=0`` (no reference pass), TRL's default ``loss_type="dapo"``, AdamW at a constant learning rate, fp32 on a
CPU, no gradient checkpointing (TRL's default turns it on; it costs time and saves memory neither side needs
here), and TRL's own generation (no vLLM). Each library runs in its own process and reports, per optimizer
step after the first, the median seconds of the whole step and of its generation (deltatune:
``GRPOTrainer.sample``; TRL: ``GRPOTrainer._generate``) and scoring (the reward functions), the rest being
training; its peak resident memory; and the held-out reward (weighted as in training) and accuracy (``correct``)
of greedy answers after training, computed by the same code for both (``transformers``' ``generate``). Both
processes wait on idle OpenMP threads as ``deltatune train`` does (``threads.openmp_environment``).
"""

from __future__ import annotations

import dataclasses
import json
import resource
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from deltatune.bench.child import report, run_in_child

LIBRARIES = ("deltatune", "trl")
EXAMPLE_REWARDS = Path(__file__).resolve().parents[3] / "examples" / "rewards.py"
REWARD_WEIGHTS = {"correct": 1.0, "close": 0.5, "number_only": 0.5}  # examples/grpo.yaml's


def example_rewards() -> list:
    """``examples/rewards.py``'s reward functions (``NamedReward``), in ``REWARD_WEIGHTS``' order."""
    from deltatune.errors import ConfigError
    from deltatune.train.rewards import load_reward_functions

    if not EXAMPLE_REWARDS.is_file():
        raise ConfigError(f"bench --grpo scores with {EXAMPLE_REWARDS}, which only a source checkout has; run it there")
    return [
        dataclasses.replace(named, name=name)
        for name, named in zip(
            REWARD_WEIGHTS, load_reward_functions([f"{EXAMPLE_REWARDS}:{n}" for n in REWARD_WEIGHTS])
        )
    ]


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
    named_rewards = example_rewards()
    rewards = [clock.wrap("scoring", named.function) for named in named_rewards]

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

        args = GRPOConfig(
            **common,
            num_generations=generations,
            max_completion_length=completion,
            beta=0.0,
            reward_weights=list(REWARD_WEIGHTS.values()),
        )
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
        settings = GRPOSettings(
            num_generations=generations,
            max_completion_length=completion,
            reward_weights=tuple(REWARD_WEIGHTS.values()),
        )
        trainer = GRPOTrainer(
            model,
            TrainingArguments(**common),
            train_dataset=encode_prompts(tokenizer, records, None).examples,
            rewards=[NamedReward(named.name, f) for named, f in zip(named_rewards, rewards)],
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
    result.update(greedy_reward(trainer.model, tokenizer, evaluation, completion, named_rewards))
    return result


def greedy_reward(model, tokenizer, rows: list[dict], completion: int, rewards: list) -> dict[str, float]:
    """The held-out reward (the functions weighed by ``REWARD_WEIGHTS``) and accuracy (``correct``'s mean) of
    greedy answers to ``rows``, one prompt at a time with ``generate``."""
    import torch

    model.eval()
    answers = []
    for row in rows:
        ids = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, return_tensors="pt")
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        with torch.no_grad():
            out = model.generate(input_ids=ids, max_new_tokens=completion, do_sample=False)
        answers.append(
            [{"role": "assistant", "content": tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)}]
        )
    columns = dict(prompts=[row["prompt"] for row in rows], completions=answers, completion_ids=None)
    scores = {named.name: named.function(**columns, solution=[row["solution"] for row in rows]) for named in rewards}
    count = max(len(rows), 1)
    total = sum(REWARD_WEIGHTS[name] * sum(values) for name, values in scores.items())
    return {"held_out_reward": total / count, "held_out_accuracy": sum(scores["correct"]) / count}


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
            records.append({**job, **run_in_child("deltatune.bench.grpo", job, waits_as="train")})
            print(
                f"  {library:<9} repeat {repeat}: {records[-1]['step']:.2f} s/step, peak "
                f"{records[-1]['peak_rss_mib']:,.0f} MiB",
                flush=True,
            )
    summary = {
        library: {
            key: statistics.median(r[key] for r in records if r["library"] == library)
            for key in (
                "step",
                "generation",
                "scoring",
                "training",
                "peak_rss_mib",
                "held_out_reward",
                "held_out_accuracy",
            )
        }
        for library in LIBRARIES
    }
    summary["ratios"] = {
        "steps_per_second_vs_trl": summary["trl"]["step"] / summary["deltatune"]["step"],
        "peak_memory_vs_trl": summary["deltatune"]["peak_rss_mib"] / summary["trl"]["peak_rss_mib"],
    }
    import torch
    import trl

    from deltatune.bench.machine import environment

    machine = {**environment("cuda" if torch.cuda.is_available() else "cpu", None), "trl": trl.__version__}
    return {"environment": machine, "records": records, "summary": summary}


def format_grpo(report: dict) -> str:
    summary = report["summary"]
    lines = [
        "| library | s/step | generation s | scoring s | training s | peak RSS MiB | held-out reward | accuracy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for library in LIBRARIES:
        s = summary[library]
        lines.append(
            f"| {library} | {s['step']:.2f} | {s['generation']:.2f} | {s['scoring']:.3f} | {s['training']:.2f} | "
            f"{s['peak_rss_mib']:,.0f} | {s['held_out_reward']:.3f} | {s['held_out_accuracy']:.2f} |"
        )
    ratios = summary["ratios"]
    lines.append(
        f"\ndeltatune: {ratios['steps_per_second_vs_trl']:.2f}x TRL's steps per second, "
        f"{ratios['peak_memory_vs_trl']:.2f}x its peak memory"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    report(grpo_job(**json.loads(sys.argv[1])))
