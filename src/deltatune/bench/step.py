"""``deltatune bench`` / ``python -m deltatune.bench.step``: LoRA training speed and memory against the frozen floor.

A LoRA step on a frozen base needs the forward pass and the activation gradients, never a weight
gradient of W; its floor is the same model with every weight frozen and no adapter (input grads
on, so backward still runs). Each mode runs in a fresh subprocess on a Llama-shaped model with
random weights (LoRA r=16 on all seven projections, AdamW), side by side in one run:

- ``floor``: no adapter, every weight frozen;
- ``fused``: deltatune's default path: gated MLPs as one function (``deltatune.kernels.lora_mlp``),
  the attention projections through ``deltatune.kernels.lora_linear``;
- ``fused-eager``: ``fused`` with the MLP's elementwise steps as eager torch kernels (on CPU that
  is ``fused`` itself; on CUDA ``fused`` compiles them: a diagnostic);
- ``fused-layer``: every projection through ``lora_linear``, no MLP-level function (a diagnostic);
- ``plain``: deltatune's plain autograd path (``LoraLinear.fused = False``), a diagnostic;
- ``peft``: Hugging Face peft, when installed;
- ``dora`` and ``peft-dora``: DoRA (``use_dora=True``) through deltatune's fused path
  (``deltatune.kernels.dora_linear``) and through peft, on the same projections.

Reported per mode: tokens/s (median step over the timed steps), peak memory, and the bytes
autograd saves for backward. Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA; on
CPU it is the bytes of the live tensors before a step (weights, adapters, optimizer state)
plus the highest sum of the allocations torch's profiler records during one extra step.
More sections: inference latency of the base, unmerged and merged model; the time to wrap a
1.1B-shaped model; and ``saved``: the bytes autograd keeps for backward after one forward of
each mode at the GPU shapes, computed on the ``meta`` device (shapes only: no memory, no GPU, a
second per mode). On meta, attention runs torch's math kernel and saves its attention matrix
(a GPU's flash kernel does not), identically in every mode, so the totals are not a GPU's. The
differences between modes are, but for one tensor: under the math kernel o_proj's input is a
copy, where flash kernels hand o_proj a view of what attention saved anyway, so on meta every
LoRA mode counts one [tokens, hidden] tensor per layer more than on a GPU (or a CPU).

``quant`` (QLoRA): deltatune's LoRA step over the same random model held as fp32, bf16, nf4 and int8
(quantised by transformers' bitsandbytes loading: every linear layer but the head), and peft's over the
nf4 one (``peft-nf4``), each in its own process: tokens/s, step peak memory, and the bytes of the base's
weights (quantisation scales included), whole and of the linear layers alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltatune.bench import child
from deltatune.bench.machine import environment
from deltatune.bench.measure import live_bytes, profiled_step, saved_storages, synchronize, timed, weight_bytes
from deltatune.bench.options import DEFAULT_SHAPES, Shape, add_arguments, shape_of
from deltatune.bench.report import format_report, publish, summarize, summarize_quant

LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MIB = 2**20
GIB = 2**30


# -- model building ---------------------------------------------------------------------------
def build_model(shape: Shape, device: str, seed: int = 0) -> nn.Module:
    """A LlamaForCausalLM of ``shape`` with seeded random weights, built directly on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        intermediate_size=shape.intermediate,
        vocab_size=shape.vocab,
        max_position_embeddings=max(shape.seq, 128),
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, shape.dtype))
    try:
        with torch.device(device):
            return LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)


def attach(model: nn.Module, mode: str, rank: int, dropout: float) -> nn.Module:
    """``model`` prepared for ``mode``: frozen with input grads (floor), or with a LoRA adapter."""
    if mode == "floor":
        model.requires_grad_(False)
        model.enable_input_require_grads()
        return model
    kwargs = dict(r=rank, lora_alpha=2 * rank, lora_dropout=dropout, target_modules=LLAMA_PROJECTIONS)
    kwargs["use_dora"] = mode in ("dora", "peft-dora")
    if mode.startswith("peft"):
        peft = _import_peft()
        return peft.get_peft_model(model, peft.LoraConfig(**kwargs))
    from deltatune import LoraConfig, get_delta_model

    model = get_delta_model(model, LoraConfig(**kwargs))
    mode = "fused" if mode == "dora" else mode
    set_fused(
        model, mode.startswith("fused"), mode in ("fused", "fused-eager"), False if mode == "fused-eager" else None
    )
    return model


def set_fused(model: nn.Module, fused: bool, fuse_mlp: bool = True, compile_mlp: bool | None = None) -> None:
    """Route every ``LoraLinear`` of ``model`` through the fused functions (with or without the
    MLP-level one, its elementwise steps compiled or not), or through the plain path."""
    from deltatune.tuners.lora.layer import LoraLinear

    for module in model.modules():
        if isinstance(module, LoraLinear):
            module.fused, module.fuse_mlp, module.compile_mlp = fused, fuse_mlp, compile_mlp


def _import_peft():
    try:
        import peft
    except ImportError:
        from deltatune.errors import ConfigError

        raise ConfigError(
            "mode 'peft' needs the peft package; pip install peft, or leave peft out of --modes"
        ) from None
    return peft


# -- jobs (each runs in its own process) ------------------------------------------------------
def train_job(shape: Shape, mode: str, device: str, steps: int, warmup: int, rank: int, dropout: float) -> dict:
    """Time ``steps`` LoRA training steps after ``warmup`` ones; measure peak and saved memory."""
    model = attach(build_model(shape, device), mode, rank, dropout)
    return measure_training(model, shape, device, steps, warmup, own_loss=mode.startswith("peft"))


def measure_training(model: nn.Module, shape: Shape, device: str, steps: int, warmup: int, own_loss: bool) -> dict:
    """``train_job``'s measurements of an adapted ``model``: speed, peak and saved memory of its steps.

    The loss is ``training_loss``'s.
    """
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=torch.Generator().manual_seed(1)).to(device)

    def step() -> None:
        training_loss(model, ids, own_loss).backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    wall, cpu = timed(step, steps, device)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    saved, step_peak = profiled_step(step, model, device)
    return {
        "tokens_per_s": shape.tokens / statistics.median(wall),
        "tokens_per_cpu_s": shape.tokens / statistics.median(cpu),
        "step_s": wall,
        "step_cpu_s": cpu,
        "peak_mib": (peak if peak is not None else live_bytes(model, optimizer) + step_peak) / MIB,
        "step_mib": None if device == "cuda" else step_peak / MIB,
        "saved_mib": saved / MIB,
        "trainable": sum(p.numel() for p in trainable),
    }


def training_loss(model: nn.Module, ids: torch.Tensor, own_loss: bool) -> torch.Tensor:
    """The mean loss over every token of ``ids`` as each library's training computes it: deltatune's (and
    the floor's) through ``train.lm_loss.causal_lm_loss`` (head and cross-entropy a chunk of rows at a
    time), peft's (``own_loss``) the model's own, whose [tokens, vocab] fp32 logits exist whole."""
    if own_loss:
        return model(input_ids=ids, labels=ids).loss
    from deltatune.train.lm_loss import causal_lm_loss

    loss = causal_lm_loss(model, {"input_ids": ids, "labels": ids})
    return loss.total / loss.tokens


def infer_job(shape: Shape, device: str, steps: int, warmup: int, rank: int) -> dict:
    """Forward latency (last-token logits) of the base model, and of a LoRA model unmerged and merged."""
    base = build_model(shape, device).eval()
    delta = attach(build_model(shape, device), "fused", rank, 0.0).eval()
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=torch.Generator().manual_seed(1)).to(device)
    variants: dict[str, tuple[nn.Module, Callable[[], None]]] = {
        "base": (base, lambda: None),
        "unmerged": (delta, lambda: set_fused(delta, True)),
        "unmerged_plain": (delta, lambda: set_fused(delta, False)),
        "merged": (delta, delta.merge_adapter),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}  # CPU seconds on CPU, else wall
    with torch.inference_mode():
        for _ in range(steps):  # interleaved rounds, so drift hits every variant alike
            for name, (model, prepare) in variants.items():
                prepare()
                forward = lambda m=model: m(input_ids=ids, logits_to_keep=1)  # noqa: E731
                for _ in range(warmup):
                    forward()
                wall, cpu = timed(forward, 3, device)
                times[name] += cpu if device == "cpu" else wall
                if name == "merged":
                    delta.unmerge_adapter()
    return {f"{name}_ms": 1000 * statistics.median(t) for name, t in times.items()}


def wrap_job(shape: Shape, device: str, rank: int, libraries: Sequence[str]) -> dict:
    """Seconds to add r=``rank`` LoRA on all seven projections of a fresh ``shape`` model on ``device``."""
    result = {}
    for library in libraries:
        if device == "meta":
            model = build_model(shape, "meta")
        else:  # the weights' values do not matter here: skip the slow random init
            model = build_model(shape, "meta").to_empty(device=device)
        synchronize(device)
        start = time.perf_counter()
        attach(model, "peft" if library == "peft" else "fused", rank, 0.0)
        synchronize(device)
        result[f"{library}_s"] = time.perf_counter() - start
        del model
    return result


def saved_job(shape: Shape, modes: Sequence[str], rank: int, dropout: float) -> dict:
    """GiB autograd saves for backward in one training-mode forward of each mode, on ``meta``."""
    result = {}
    for mode in modes:
        model = attach(build_model(shape, "meta"), mode, rank, dropout).train()
        ids = torch.zeros(shape.batch, shape.seq, dtype=torch.long, device="meta")
        with saved_storages(model) as saved:
            training_loss(model, ids, own_loss=mode.startswith("peft"))
        result[f"{mode}_gib"] = sum(saved.values()) / GIB
    return result


QUANT_BASES = ("fp32", "bf16", "nf4", "int8", "peft-nf4")


def quant_job(shape: Shape, base: str, device: str, steps: int, warmup: int, rank: int) -> dict:
    """``train_job``'s LoRA step (deltatune's default path, or peft for ``peft-nf4``) over a base held as
    ``base``; with the bytes of the base's weights, whole and of the linear layers a quantisation converts."""
    import tempfile

    from transformers import AutoModelForCausalLM

    from deltatune.runtime.quantization import loading_options

    mode = base.removeprefix("peft-")
    model = build_model(dataclasses.replace(shape, dtype="bfloat16" if mode == "bf16" else "float32"), device)
    if mode in ("nf4", "int8"):  # quantised as transformers quantises on load: every Linear but the head
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            device_map = {"": torch.cuda.current_device()} if device == "cuda" else device
            model = AutoModelForCausalLM.from_pretrained(
                folder, device_map=device_map, **loading_options(mode, model.config)
            )
    head = model.get_output_embeddings()
    linears = [m.weight for m in model.modules() if isinstance(m, nn.Linear) and m is not head]
    sizes = {"base_mib": weight_bytes(model.parameters()) / MIB, "linear_mib": weight_bytes(linears) / MIB}
    model = attach(model, "peft" if base.startswith("peft") else "fused", rank, 0.0)
    return {**sizes, **measure_training(model, shape, device, steps, warmup, own_loss=base.startswith("peft"))}


# -- orchestration ----------------------------------------------------------------------------
def run_job(
    job: dict, isolate: bool = True, module: str = "deltatune.bench.step", dispatch: Callable[..., dict] | None = None
) -> dict:
    """Run one job, in a fresh Python process (``python -m module --job``) unless ``isolate`` is False (then
    through ``dispatch``, this module's by default); return its result dict."""
    if not isolate:
        return dispatch(**job) if dispatch else _dispatch(job)
    return child.run_in_child(module, job, waits_as=None, option="--job")  # threads wait as this process's do


def _dispatch(job: dict) -> dict:
    job = dict(job)
    kind, threads, dtype = job.pop("kind"), job.pop("threads", None), job.pop("dtype", None)
    if threads:
        torch.set_num_threads(threads)
    job["shape"] = shape_of(job["shape"], dtype)
    return {"train": train_job, "infer": infer_job, "wrap": wrap_job, "saved": saved_job, "quant": quant_job}[kind](
        **job
    )


def run_benchmark(args: argparse.Namespace) -> dict:
    """Every requested section, modes interleaved per repeat; returns the JSON-ready report."""
    device = args.device
    shapes = args.shapes or DEFAULT_SHAPES[device]
    if any(mode.startswith("peft") for mode in args.modes):
        _import_peft()  # fail in one line now rather than in every child
    common = {"device": device, "threads": args.threads, "dtype": args.dtype}
    settings = {key: value for key, value in vars(args).items() if key != "job"}
    report: dict[str, Any] = {
        "environment": environment(device, args.threads),
        "settings": settings,
        "train": [],
        "infer": [],
        "wrap": [],
        "saved": [],
        "quant": [],
    }
    for shape in shapes:
        if "train" in args.sections:
            for repeat in range(args.repeats):
                for mode in args.modes:
                    job = {
                        "kind": "train",
                        "shape": shape,
                        "mode": mode,
                        "steps": args.steps,
                        "warmup": args.warmup,
                        "rank": args.rank,
                        "dropout": args.lora_dropout,
                        **common,
                    }
                    result = run_job(job, args.isolate)
                    report["train"].append({"shape": shape, "mode": mode, "repeat": repeat, **result})
                    print(
                        f"  {shape} {mode:<11} repeat {repeat}: {result['tokens_per_s']:,.0f} tok/s, "
                        f"peak {result['peak_mib']:,.0f} MiB",
                        flush=True,
                    )
        if "infer" in args.sections:
            job = {
                "kind": "infer",
                "shape": shape,
                "steps": args.steps,
                "warmup": args.warmup,
                "rank": args.rank,
                **common,
            }
            report["infer"].append({"shape": shape, **run_job(job, args.isolate)})
        if "quant" in args.sections:
            for repeat in range(args.repeats):
                for base in QUANT_BASES:
                    job = {
                        "kind": "quant",
                        "shape": shape,
                        "base": base,
                        "steps": args.steps,
                        "warmup": args.warmup,
                        "rank": args.rank,
                        "device": device,
                        "threads": args.threads,
                    }
                    result = run_job(job, args.isolate)
                    report["quant"].append({"shape": shape, "base": base, "repeat": repeat, **result})
                    print(
                        f"  {shape} over {base:<8} repeat {repeat}: {result['tokens_per_s']:,.0f} tok/s, "
                        f"peak {result['peak_mib']:,.0f} MiB, base {result['base_mib']:,.1f} MiB",
                        flush=True,
                    )
    if "wrap" in args.sections:
        libraries = ["deltatune", "peft"] if "peft" in args.modes else ["deltatune"]
        job = {
            "kind": "wrap",
            "shape": args.wrap_shape,
            "device": args.wrap_device or device,
            "rank": args.rank,
            "libraries": libraries,
            "threads": args.threads,
        }
        report["wrap"].append({"shape": args.wrap_shape, "device": job["device"], **run_job(job, args.isolate)})
    if "saved" in args.sections:
        for shape in args.saved_shapes:
            job = {
                "kind": "saved",
                "shape": shape,
                "modes": args.modes,
                "rank": args.rank,
                "dropout": args.lora_dropout,
                "dtype": args.dtype,
            }
            report["saved"].append({"shape": shape, **run_job(job, args.isolate)})
    report["summary"] = summarize(report)
    report["quant_summary"] = summarize_quant(report)
    report["environment"]["load_average_end"] = os.getloadavg()
    return report


# -- command line -----------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        from deltatune.errors import ConfigError

        raise ConfigError("--device cuda but torch sees no CUDA device; use --device cpu")
    if args.e2e:
        from deltatune.bench import e2e as bench_e2e

        runs = [run for run in bench_e2e.RUNS if run != "trl-defaults" or args.e2e_default_steps]
        report = bench_e2e.run_e2e(Path(args.e2e_dir), args.e2e_steps, args.repeats, args.e2e_default_steps, runs)
        return publish(report, bench_e2e.format_report(report), args.json)
    report = run_benchmark(args)
    return publish(report, format_report(report), args.json)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deltatune.bench.step", description=__doc__.split("\n")[0])
    parser.add_argument("--job", help=argparse.SUPPRESS)  # internal: one job, in a child process
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.job:
        child.report(_dispatch(json.loads(args.job)))
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
