"""The options and shapes of ``deltatune bench``, without torch: ``deltatune bench --help`` answers at once."""

from __future__ import annotations

import argparse
import dataclasses

MODES = ("floor", "fused", "fused-eager", "fused-layer", "plain", "peft", "dora", "peft-dora")
# Each mode's speed and memory are also given as ratios to these modes, where they ran.
REFERENCES = ("floor", "peft", "peft-dora", "fused")
SECTIONS = ("train", "infer", "wrap", "saved", "quant")


@dataclasses.dataclass(frozen=True)
class Shape:
    """A Llama-shaped model and the batch it trains on."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    batch: int
    seq: int
    dtype: str

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


SHAPES = {
    "tiny": Shape(32, 2, 4, 2, 64, 128, 2, 16, "float32"),  # smoke tests only
    "cpu-small": Shape(512, 4, 8, 4, 1408, 4096, 2, 256, "float32"),
    "1.1b": Shape(2048, 22, 32, 4, 5632, 32000, 8, 1024, "bfloat16"),
    "8b": Shape(4096, 32, 32, 8, 14336, 128256, 4, 1024, "bfloat16"),
}
DEFAULT_SHAPES = {"cpu": ["cpu-small"], "cuda": ["1.1b", "8b"]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options (shared by ``python -m deltatune.bench.step`` and ``deltatune bench``)."""
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when torch sees a GPU, else cpu")
    parser.add_argument(
        "--shapes", nargs="+", choices=list(SHAPES), help="default: cpu-small on CPU, 1.1b and 8b on CUDA"
    )
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--steps", type=int, default=6, help="timed steps per mode (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=1, help="run every mode this many times, interleaved")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="override the shapes' dtype")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--wrap-shape", choices=list(SHAPES), default="1.1b")
    parser.add_argument("--wrap-device", choices=["cpu", "cuda", "meta"], help="default: --device")
    parser.add_argument(
        "--saved-shapes",
        nargs="+",
        choices=list(SHAPES),
        default=["1.1b", "8b"],
        help="shapes of the 'saved' section (on meta; default: the GPU shapes)",
    )
    parser.add_argument("--json", help="write the full report (every step time) to this file")
    parser.add_argument(
        "--e2e",
        action="store_true",
        help="instead: the quick start's SFT run through deltatune train and TRL + peft, end to end "
        "(deltatune.bench.e2e; needs trl and peft)",
    )
    parser.add_argument(
        "--families",
        nargs="+",
        metavar="FAMILY",
        help="instead: each adapter family's training step in deltatune and peft (deltatune.bench.families): "
        "lora, dora, ia3, loha, lokr, oft, vera, adalora",
    )
    parser.add_argument(
        "--grpo",
        action="store_true",
        help="instead: GRPO steps of deltatune against TRL's GRPOTrainer + peft (deltatune.bench.grpo; needs trl)",
    )
    parser.add_argument("--grpo-model", default="smollm2", help="--grpo: the model (default: the embedded SmolLM2)")
    parser.add_argument("--grpo-steps", type=int, default=10, help="--grpo: optimizer steps per run")
    parser.add_argument("--grpo-generations", type=int, default=8, help="--grpo: completions per prompt")
    parser.add_argument("--grpo-batch", type=int, default=16, help="--grpo: completions per step")
    parser.add_argument("--grpo-completion", type=int, default=32, help="--grpo: tokens per completion at most")
    parser.add_argument(
        "--serve",
        action="store_true",
        help="instead: concurrent requests for many adapters on one base: the engine's mixed batch against peft's "
        "(adapter_names=) and one request at a time (deltatune.bench.serve; needs peft)",
    )
    parser.add_argument("--serve-model", default="smollm2", help="--serve: the base model (default: SmolLM2)")
    parser.add_argument("--serve-requests", type=int, default=16, help="--serve: concurrent requests")
    parser.add_argument("--serve-tokens", type=int, default=32, help="--serve: tokens per answer at most")
    parser.add_argument(
        "--serve-prompts",
        type=int,
        default=None,
        help="--serve: distinct prompts among the requests, taking turns (default: one per request, up to 16); with "
        "fewer, rows of one adapter asking the same prompt share their prefill",
    )
    parser.add_argument(
        "--serve-distinct",
        type=int,
        nargs="+",
        default=[1, 4, 16],
        help="--serve: numbers of distinct adapters in the batch (default: 1 4 16)",
    )
    parser.add_argument("--e2e-steps", type=int, default=30, help="--e2e: optimizer steps per run")
    parser.add_argument(
        "--e2e-default-steps",
        type=int,
        default=4,
        help="--e2e: steps of the run with TRL's defaults (slow on a CPU; 0 leaves it out)",
    )
    parser.add_argument("--e2e-dir", default="outputs/bench-e2e", help="--e2e: data and adapters go here")
    parser.add_argument(
        "--no-isolate",
        dest="isolate",
        action="store_false",
        help="run modes in this process (quick looks; memory numbers are then less honest)",
    )


def shape_of(name: str, dtype: str | None = None) -> Shape:
    """Shape ``name``, in ``dtype`` when given."""
    return dataclasses.replace(SHAPES[name], dtype=dtype) if dtype else SHAPES[name]
