"""``deltatune bench --serve``: answering concurrent requests for many adapters on one base, against peft.

The same base (the embedded SmolLM2 by default, fp32), the same ``adapters`` random LoRA adapters (r=8 on every
linear layer, B perturbed so each answers differently), the same ``requests`` chat prompts, greedy answers of at
most ``tokens`` tokens; request i asks prompt i mod p (p = ``prompts`` distinct prompts, by default one per
request) and runs adapter i mod k for k distinct adapters in the batch (1, 4 and 16). With fewer prompts than
requests, rows of one adapter asking the same prompt share one prefill in the engine (as a request's ``n`` choices
do), which peft does not, and which 16 adapters cannot.

    deltatune   the generation engine as ``serve`` runs it, every request added at once: one running batch,
                each row with its own adapter (``DeltaModel.adapter_rows``), rows leaving as they finish; its
                prefix cache (``generation/prefix_cache.py``) keeps what the warm-up round's prompts share with
                the measured ones (the chat template's system prompt), so the measured round prefills the rest
    peft        one ``generate(..., adapter_names=[...])`` over the left-padded batch (peft's mixed batch)
    one by one  the engine answering the requests one after another (what serving without batching does)

Reported per k: generated tokens per second (real tokens: up to and including a row's end-of-sequence token),
and for deltatune the time to first token and the inter-token latency at p50/p99. Every answer of every side
is checked against the one-by-one answer of the same request, so a fast wrong answer cannot pass. Each side runs in
processes of its own (one per repeat, the sides taking turns; a warm-up round of every k asking other questions
(``WARM_UP_PROMPTS``), then the measured one), since in one shared process what one side left behind moved the
other's speed by up to 20%; the medians over the repeats are reported. The one-by-one side, many times slower, runs
once.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any

from deltatune.bench.child import report, run_in_child
from deltatune.errors import ConfigError

SIDES = ("deltatune", "peft", "one_by_one")
PROMPTS = [
    "What is AI?",
    "Tell me a joke.",
    "How do I boil an egg?",
    "What is the capital of France?",
    "Name three colours.",
    "Why is the sky blue?",
    "What does a compiler do?",
    "Give me a synonym for happy.",
    "Write a haiku about rain.",
    "How far away is the Moon?",
    "What is a prime number?",
    "Suggest a name for a cat.",
    "How do plants make food?",
    "What is the tallest mountain?",
    "Explain what a verb is.",
    "What should I pack for a beach trip?",
]
WARM_UP_PROMPTS = [  # the warm-up round's: other questions, so that the measured round reuses only what they share
    "Describe a sunset.",
    "List two fruits.",
    "Can fish sleep?",
    "Who wrote Hamlet?",
    "Translate 'hello' into Spanish.",
    "Count from one to five.",
    "Is a tomato a fruit?",
    "Recommend a board game.",
    "Spell the word necessary.",
    "Do cats like water?",
    "Summarise the water cycle.",
    "Pick a number between one and ten.",
    "Compare tea and coffee.",
    "Define gravity in one sentence.",
    "Should I learn Python or Rust?",
    "Convert ten miles to kilometres.",
]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


def make_adapters(model: str, adapters: int, folder: str) -> None:
    """``adapters`` seeded random LoRA adapters ``a0``, ``a1``, ... over ``model``, saved under ``folder``."""
    import torch

    from deltatune import LoraConfig, get_delta_model
    from deltatune.runtime.loading import load_causal_lm, model_folder

    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
    torch.manual_seed(0)  # A's initialisation: the same adapters, so the same answers, in every run
    maker = get_delta_model(load_causal_lm(model_folder(model)), config, adapter_name="a0")
    generator = torch.Generator().manual_seed(0)
    for name in adapter_names(adapters):
        if name not in maker.peft_config:
            maker.add_adapter(name, config)
        with torch.no_grad():
            for _, param in maker.adapter_state(name).items():
                if param.ndim == 2 and param.shape[1] == config.r:  # B starts at zero
                    param.normal_(0, 0.02, generator=generator)
        maker.save_pretrained(folder, selected_adapters=[name])


def adapter_names(adapters: int) -> list[str]:
    """The saved adapters' names: a0, a1, ..."""
    return [f"a{i}" for i in range(adapters)]


def load(library: str, model: str, adapters: int, folder: str):
    """(``library``'s model over ``model`` holding the adapters ``make_adapters`` saved, in eval mode, tokenizer)."""
    from deltatune.runtime.loading import load_causal_lm, load_tokenizer, model_folder

    path = model_folder(model)
    names = adapter_names(adapters)
    if library == "peft":
        import peft

        network = peft.PeftModel.from_pretrained(load_causal_lm(path), f"{folder}/a0", adapter_name="a0")
    else:
        from deltatune import DeltaModel

        network = DeltaModel.from_pretrained(load_causal_lm(path), f"{folder}/a0", adapter_name="a0")
    for name in names[1:]:
        network.load_adapter(f"{folder}/{name}", adapter_name=name)
    return network.eval(), load_tokenizer(path)


def check_prompts(prompts: int) -> None:
    """Refuse a number of distinct prompts the benchmark cannot give."""
    if not 1 <= prompts <= len(PROMPTS):
        raise ConfigError(f"prompts={prompts}: the benchmark has 1 to {len(PROMPTS)} distinct prompts")


def prompt_ids(tokenizer, requests: int, prompts: int, questions: list[str] = PROMPTS) -> list[list[int]]:
    """The chat-templated prompts of ``requests`` requests, the first ``prompts`` of ``questions`` in turn."""
    check_prompts(prompts)
    ids = []
    for i in range(requests):
        messages = [{"role": "user", "content": questions[i % prompts]}]
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
        ids.append(list(encoded["input_ids"]))
    return ids


def serving_engine(model, stop: int, requests: int, packed):
    """An engine as ``serve`` runs one: on ``packed`` weights (``kernels.packed_linear``), its weights static,
    with serve's default prefix cache (``generation/prefix_cache.py``)."""
    from deltatune.generation.engine import GenerationEngine
    from deltatune.serve.options import PREFIX_CACHE_TOKENS

    return GenerationEngine(
        model,
        stop_token_ids=[stop],
        max_batch=requests,
        packed_weights=packed,
        static_weights=True,
        prefix_cache=PREFIX_CACHE_TOKENS,
    )


def run_engine(engine, prompts: list[list[int]], names: list[str], tokens: int, batch: bool) -> dict:
    """``engine`` answering every prompt, all at once when ``batch``, else one after another."""
    from deltatune.generation.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=tokens, temperature=0)
    started = time.perf_counter()
    firsts, gaps, answers = [], [], []
    groups = [list(range(len(prompts)))] if batch else [[i] for i in range(len(prompts))]
    for group in groups:
        added = time.perf_counter()
        rows = [engine.add(prompts[i], params, adapter=names[i]) for i in group]
        last = {id(row): added for row in rows}
        while engine.has_work:
            for event in engine.step():
                now = time.perf_counter()
                (gaps if event.row.output_ids[1:] else firsts).append(now - last[id(event.row)])
                last[id(event.row)] = now
        answers += [row.output_ids for row in rows]
    seconds = time.perf_counter() - started
    generated = sum(len(answer) for answer in answers)
    return {
        "seconds": seconds,
        "tokens": generated,
        "tokens_per_s": generated / seconds,
        "ttft_p50": _percentile(firsts, 0.5),
        "ttft_p99": _percentile(firsts, 0.99),
        "itl_p50": _percentile(gaps, 0.5),
        "itl_p99": _percentile(gaps, 0.99),
        "answers": answers,
    }


def run_peft(model, prompts: list[list[int]], names: list[str], tokens: int, stop: int) -> dict:
    """peft's mixed batch: one ``generate`` over the left-padded prompts with ``adapter_names``."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), stop, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt) :] = torch.tensor(prompt)
        mask[i, width - len(prompt) :] = 1
    started = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            adapter_names=names,
            max_new_tokens=tokens,
            do_sample=False,
            eos_token_id=stop,
            pad_token_id=stop,
        )
    seconds = time.perf_counter() - started
    answers = []
    for row in out[:, width:].tolist():
        answers.append(row[: row.index(stop) + 1] if stop in row else row)
    generated = sum(len(answer) for answer in answers)
    return {"seconds": seconds, "tokens": generated, "tokens_per_s": generated / seconds, "answers": answers}


def serve_job(
    side: str,
    model: str,
    adapters: int,
    folder: str,
    requests: int,
    prompts: int,
    tokens: int,
    distinct: list[int],
    warm: bool,
) -> dict:
    """One side's rounds in this process, for each k in ``distinct``: when ``warm``, a warm-up round asking
    WARM_UP_PROMPTS first, then the measured round; its result per k, answers included. deltatune runs as a
    server would: on packed weights kept across its rounds (on huge pages), and per k one engine whose prefix
    cache the warm-up round fills with what its questions share with the measured ones (the chat template's
    system prompt)."""
    import torch

    from deltatune.kernels.packed_linear import PackedWeights

    network, tokenizer = load("peft" if side == "peft" else "deltatune", model, adapters, folder)
    # huge pages (``runtime/huge_pages.py``) as a server's, collapsed in deltatune's warm-up round: the one-by-one
    # side has none, and would time the collapse (about 3 s) in its first answer
    packed = None if side == "peft" else PackedWeights(network, huge_pages=side == "deltatune")
    stop, ids = tokenizer.eos_token_id, prompt_ids(tokenizer, requests, prompts)
    rounds = [prompt_ids(tokenizer, requests, prompts, WARM_UP_PROMPTS)] if warm else []
    results = {}
    for k in distinct:
        names = [f"a{i % k}" for i in range(requests)]
        engine = None if side == "peft" else serving_engine(network, stop, requests, packed)
        for asked in [*rounds, ids]:
            torch.manual_seed(0)
            if engine is None:
                results[str(k)] = run_peft(network, asked, names, tokens, stop)
            else:
                results[str(k)] = run_engine(engine, asked, names, tokens, side == "deltatune")
    return results


def run_serve_bench(
    model: str,
    adapters: int,
    requests: int,
    tokens: int,
    distinct: list[int],
    repeats: int,
    folder: str,
    prompts: int | None = None,
) -> dict:
    """Every side for every number of distinct adapters, each side in processes of its own, ``repeats`` times
    taking turns; ``prompts`` distinct prompts among the requests (default: each request its own)."""
    prompts = min(requests, len(PROMPTS)) if prompts is None else prompts
    check_prompts(prompts)  # refused now, not in a child process
    make_adapters(model, adapters, folder)
    job = dict(model=model, adapters=adapters, folder=folder, requests=requests, prompts=prompts, tokens=tokens)
    job.update(distinct=distinct)  # the job is serve_job's keyword arguments, less side and warm
    reference = run_in_child(__name__, {**job, "side": "one_by_one", "warm": False}, waits_as="serve")
    answers = {k: result.pop("answers") for k, result in reference.items()}
    records: list[dict[str, Any]] = [
        {"side": "one_by_one", "distinct": int(k), "repeat": 1, **result, "wrong_answers": 0}
        for k, result in reference.items()
    ]
    for repeat in range(1, repeats + 1):
        for side in SIDES[:2]:
            for k, result in run_in_child(__name__, {**job, "side": side, "warm": True}, waits_as="serve").items():
                result["wrong_answers"] = sum(a != b for a, b in zip(result.pop("answers"), answers[k]))
                records.append({"side": side, "distinct": int(k), "repeat": repeat, **result})
                print(
                    f"  {k:>2} adapters  {side:<10} repeat {repeat}: {result['tokens_per_s']:.1f} tok/s, "
                    f"wrong answers {result['wrong_answers']}",
                    flush=True,
                )
    summary = summarise(records, distinct)
    from deltatune.bench.machine import environment

    settings = dict(model=model, adapters=adapters, requests=requests, prompts=prompts, tokens=tokens, repeats=repeats)
    return {"environment": environment("cpu", None), "settings": settings, "records": records, "summary": summary}


def summarise(records: list[dict[str, Any]], distinct: list[int]) -> dict[str, dict]:
    """Per k: each side's medians over its repeats, and deltatune's ratios. ``vs_peft`` divides the medians;
    ``vs_peft_paired`` is the median of each repeat's own ratio (the two sides run back to back in a repeat, so
    a minute when the machine ran slow for both moves that repeat's ratio less than either speed)."""
    summary: dict[str, dict] = {}
    for k in distinct:
        entry = summary[str(k)] = {}
        for side in SIDES:
            rows = [r for r in records if r["side"] == side and r["distinct"] == k]
            entry[side] = {
                key: statistics.median(r[key] for r in rows)
                for key in rows[0]
                if key not in ("side", "distinct", "repeat") and rows[0][key] is not None
            }
            entry[side]["wrong_answers"] = max(r["wrong_answers"] for r in rows)
    one = summary[str(distinct[0])]["deltatune"]["tokens_per_s"]
    for k in distinct:
        entry = summary[str(k)]
        ours_speed = entry["deltatune"]["tokens_per_s"]
        speeds = {
            side: {r["repeat"]: r["tokens_per_s"] for r in records if r["side"] == side and r["distinct"] == k}
            for side in SIDES[:2]
        }
        entry["ratios"] = {
            "vs_peft": ours_speed / entry["peft"]["tokens_per_s"],
            "vs_peft_paired": statistics.median(speeds["deltatune"][i] / speeds["peft"][i] for i in speeds["peft"]),
            "vs_one_by_one": ours_speed / entry["one_by_one"]["tokens_per_s"],
            "vs_one_adapter": ours_speed / one,
        }
    return summary


def format_serve(report: dict) -> str:
    settings, summary = report["settings"], report["summary"]
    lines = [
        f"{settings['requests']} concurrent greedy requests ({settings['prompts']} distinct prompts) of at most "
        f"{settings['tokens']} tokens, {settings['model']}, LoRA r=8 on every linear layer",
        "",
        "| distinct adapters | deltatune tok/s | peft mixed batch tok/s | one by one tok/s | vs peft "
        "(median of each repeat's) | vs one by one | vs 1 adapter | TTFT p50 / p99 s | inter-token p50 / p99 ms "
        "| wrong answers |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k, entry in summary.items():
        ours, ratios = entry["deltatune"], entry["ratios"]
        wrong = sum(entry[side]["wrong_answers"] for side in SIDES)
        lines.append(
            f"| {k} | {ours['tokens_per_s']:.1f} | {entry['peft']['tokens_per_s']:.1f} | "
            f"{entry['one_by_one']['tokens_per_s']:.1f} | {ratios['vs_peft']:.2f}x ({ratios['vs_peft_paired']:.2f}x) | "
            f"{ratios['vs_one_by_one']:.2f}x | "
            f"{ratios['vs_one_adapter']:.2f}x | {ours['ttft_p50']:.2f} / {ours['ttft_p99']:.2f} | "
            f"{1000 * ours['itl_p50']:.0f} / {1000 * ours['itl_p99']:.0f} | {wrong} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    report(serve_job(**json.loads(sys.argv[1])))
