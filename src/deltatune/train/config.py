"""``TrainConfig``: the flat, documented keys of ``deltatune train``, parsed from YAML and key=value.

Keys are this class's fields plus the hyper-parameters of the chosen ``method`` (the fields of its
config class, e.g. ``r``, ``lora_alpha``, ``target_modules`` for LoRA; see ``methods``). Unknown
keys get a did-you-mean suggestion, another method's hyper-parameter says whose it is; every value
is checked before any model or data is loaded, and ``check_model`` checks the run against the
model's config.json, all without importing torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from deltatune.data import ColumnMap, check_sources, parse_weights, split_sources
from deltatune.data.encoding import TRUNCATION_SIDES
from deltatune.errors import ConfigError, DataError
from deltatune.train.config_choices import LR_SCHEDULERS, PRECISIONS, REPORTERS, installed
from deltatune.train.config_values import coerce, override_value, read_yaml
from deltatune.train.grpo_settings import GRPOSettings
from deltatune.train.methods import (
    build_config,
    method_class,
    methods_taking,
    option_defaults,
)
from deltatune.train.stage_defaults import STAGE_DEFAULTS, STAGES
from deltatune.tuners.prompt.config import PromptLearningConfig

EMBEDDED_MODEL = "smollm2"
EMBEDDED_DATA = "chatterbot"
# config.json fields that hold a model's context length (positions it has embeddings or a rope range for).
_CONTEXT_FIELDS = ("max_position_embeddings", "n_positions")


def _key(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Every key of a training run. The defaults are the embedded quick start: LoRA SFT of
    SmolLM2-135M-Instruct on chatterbot question/answer pairs, a few minutes on a laptop CPU."""

    model: str = _key(EMBEDDED_MODEL, "model folder (config.json + weights), or 'smollm2' (embedded)")
    data: str = _key(
        EMBEDDED_DATA,
        "a .jsonl/.json/.csv/.tsv/.parquet file, a datasets folder, dataset_info.json#name, "
        "or built-in: chatterbot, chatterbot-preference-synthetic, chatterbot-kto-synthetic, units-synthetic, "
        "units-preference-synthetic; "
        "several: a.jsonl,b.jsonl",
    )
    data_format: str = _key(
        "auto",
        "auto (from the columns), messages, prompt_completion, text, alpaca, sharegpt, "
        "preference, kto, sharegpt_preference, sharegpt_kto, messages_kto, alpaca_preference",
    )
    columns: str = _key(
        "",
        "column mapping {our name: your column} as JSON or YAML, e.g. "
        '\'{"prompt": "question", "completion": "answer"}\'; sharegpt tags too (role_tag, ...)',
    )
    ignore_columns: str = _key(
        "", "columns the data may hold unread (comma-separated); any other unread column is an error"
    )
    data_weights: str = _key(
        "",
        "one weight per data source (e.g. 3,1): source i gives round(N*w_i/sum(w)) of the "
        "N training rows, repeated or sampled; empty: every row once",
    )
    eval_data: str = _key("", "held-out data file; empty: hold out eval_fraction of data")
    eval_fraction: float = _key(0.1, "share of distinct prompts held out when eval_data is empty")
    eval_examples: int = _key(96, "at most this many held-out examples are scored")
    stage: str = _key("sft", f"{', '.join(STAGES[:-1])} or {STAGES[-1]} (rm: a reward model)")
    method: str = _key("lora", "adapter method; its hyper-parameters are keys too (see below)")
    output_dir: str = _key("outputs/quickstart", "adapter, checkpoints, metrics.json and loss.png go here")
    max_steps: int = _key(60, "optimizer steps; 0 trains for `epochs` (setting epochs alone sets it to 0)")
    epochs: float = _key(0.0, "passes over the training data, when max_steps is 0")
    batch_size: int = _key(8, "examples per device step")
    gradient_accumulation_steps: int = _key(1, "device steps per optimizer step")
    learning_rate: float = _key(
        1e-3, "peak learning rate (AdamW); prefix_tuning and p_tuning: 1e-2, prompt_tuning: 1e-1"
    )
    lr_scheduler: str = _key("cosine", "learning-rate schedule after warm-up: cosine, linear, constant, ...")
    warmup_steps: int = _key(5, "linear warm-up steps; p_tuning: 15 (at most a quarter of max_steps)")
    weight_decay: float = _key(0.0, "AdamW weight decay")
    max_length: int = _key(128, "tokens per example; longer ones are cut (and counted)")
    truncation_side: str = _key("right", "sft: cut over-long examples at the end (right) or the start (left)")
    max_prompt_length: int = _key(
        0,
        "dpo/kto: prompt tokens a too-long row keeps at least (its prompt is cut from "
        "the left, the answer from the right); 0: max_length // 2",
    )
    train_on_prompt: bool = _key(False, "also put loss on prompt tokens (default: only on answers)")
    packing: bool = _key(False, "pack several examples into each max_length row (sft)")
    padding_free: bool = _key(
        True,
        "sft and grpo: lay each batch out as one row, its examples back to back (positions restart "
        "per example, attention stays within one), so no compute goes to padding; false: "
        "pad rows. Prompt-learning methods always pad (virtual tokens come once per row)",
    )
    eval_steps: int = _key(0, "evaluate every N steps; 0: only before and after training")
    early_stopping_patience: int = _key(0, "stop after N evaluations without a lower eval loss; 0: off")
    save_steps: int = _key(0, "write a checkpoint every N steps to output_dir/checkpoints; 0: none")
    save_total_limit: int = _key(2, "keep at most this many checkpoints")
    resume_from_checkpoint: str = _key("", "a checkpoint folder, or 'last' (the newest in output_dir/checkpoints)")
    gradient_checkpointing: bool = _key(False, "recompute activations in backward: less memory, ~30% slower")
    quantization: str = _key(
        "none",
        "hold the frozen base's linear layers as nf4, fp4 or int8 (QLoRA; needs "
        "pip install deltatune[qlora]) or none; the adapter stays fp32",
    )
    precision: str = _key("auto", "fp32, bf16, fp16 (mixed precision) or auto (bf16 on a GPU that has it, else fp32)")
    logging_steps: int = _key(0, "log the training loss every N steps; 0: about 50 times per run")
    tensorboard: bool = _key(
        False,
        "also log to TensorBoard in output_dir/tensorboard (needs tensorboard); the "
        "same as adding tensorboard to report_to",
    )
    report_to: str = _key(
        "none",
        "also log to these trackers (comma-separated; each needs its package): "
        f"{', '.join(REPORTERS)}; all: every installed one; none",
    )
    beta: float = _key(
        0.1,
        "dpo/kto: strength of the pull towards the reference (base) model; orpo: weight of the odds-ratio "
        "term; simpo: scale of the length-normalised reward (default 2.5)",
    )
    gamma: float = _key(0.5, "simpo: the reward margin the chosen answer must win by (TRL's simpo_gamma)")
    loss_type: str = _key(
        "sigmoid", "dpo: sigmoid (the DPO paper) or ipo; grpo: dapo (default), grpo, dr_grpo or bnpo (TRL's)"
    )
    desirable_weight: float = _key(1.0, "kto: weight of desirable examples' loss")
    undesirable_weight: float = _key(1.0, "kto: weight of undesirable examples' loss")
    reward_funcs: str = _key(
        "",
        "grpo: reward functions, comma-separated: FILE.py:FUNCTION, MODULE:FUNCTION (TRL's signature), "
        "accuracy (math-verify against a solution column), regex:PATTERN, length:N, rm:FOLDER (a reward model)",
    )
    reward_weights: str = _key("", "grpo: one weight per reward function (e.g. 1,0.5); empty: 1 each")
    num_generations: int = _key(8, "grpo: completions sampled per prompt (a group); batch_size counts completions")
    max_completion_length: int = _key(256, "grpo: tokens a sampled completion may have")
    temperature: float = _key(1.0, "grpo: sampling temperature (log-probabilities are taken at it too)")
    top_p: float = _key(1.0, "grpo: sample from the smallest set of tokens holding this much probability")
    top_k: int = _key(0, "grpo: sample from the k most likely tokens; 0: all")
    epsilon: float = _key(0.2, "grpo: the probability ratio is clipped below at 1 - epsilon")
    epsilon_high: float = _key(0.0, "grpo: ... and above at 1 + epsilon_high; 0: epsilon (DAPO raises it)")
    scale_rewards: str = _key("group", "grpo: advantages divided by the reward std of the group, the batch, or none")
    num_iterations: int = _key(1, "grpo: optimizer passes over each generation")
    steps_per_generation: int = _key(0, "grpo: micro-steps one generation serves; 0: gradient_accumulation_steps")
    mask_truncated_completions: bool = _key(False, "grpo: no loss on completions cut at max_completion_length")
    seed: int = _key(0, "seed for the split, the adapter init, the data order and GRPO's sampling")
    threads: int = _key(0, "CPU threads (torch.set_num_threads); 0: auto, the CPUs other processes leave free")
    method_options: dict[str, Any] = field(default_factory=dict, metadata={"help": ""})

    def __post_init__(self) -> None:
        for name in ("batch_size", "gradient_accumulation_steps", "max_length", "eval_examples"):
            _check(name, getattr(self, name), getattr(self, name) > 0, "must be positive")
        for name in (
            "max_steps",
            "warmup_steps",
            "eval_steps",
            "early_stopping_patience",
            "save_steps",
            "save_total_limit",
            "logging_steps",
            "epochs",
            "weight_decay",
            "threads",
        ):
            _check(name, getattr(self, name), getattr(self, name) >= 0, "must be 0 or more")
        for name in (
            "eval_fraction",
            "epochs",
            "learning_rate",
            "weight_decay",
            "beta",
            "gamma",
            "desirable_weight",
            "undesirable_weight",
        ):
            _check(name, getattr(self, name), math.isfinite(getattr(self, name)), "must be a finite number")
        _check("gamma", self.gamma, self.gamma >= 0, "must be 0 or more")
        if self.stage != "simpo" and self.gamma != TrainConfig.gamma:
            raise ConfigError(f"gamma applies to stage=simpo only, not stage={self.stage}; leave it out")
        for name in ("learning_rate", "desirable_weight", "undesirable_weight"):
            _check(name, getattr(self, name), getattr(self, name) > 0, "must be positive")
        if self.stage == "grpo":
            self.grpo_settings()  # checks GRPO's keys
            _check("beta", self.beta, self.beta >= 0, "must be 0 (no KL term) or more")
        else:
            _check("beta", self.beta, self.beta > 0, "must be positive")
            changed = [key for key in GRPO_KEYS if getattr(self, key) != getattr(TrainConfig, key)]
            if changed:
                raise ConfigError(f"{changed[0]} applies to stage=grpo only, not stage={self.stage}; leave it out")
        if (self.max_steps > 0) == (self.epochs > 0):
            raise ConfigError(
                f"set max_steps or epochs (exactly one above 0); got max_steps={self.max_steps}, epochs={self.epochs}"
            )
        if not self.eval_data:
            _check("eval_fraction", self.eval_fraction, 0 < self.eval_fraction < 1, "must be between 0 and 1")
        if self.early_stopping_patience and not self.eval_steps:
            raise ConfigError("early_stopping_patience needs evaluations during training; set eval_steps too")
        if self.early_stopping_patience and self.save_steps % max(self.eval_steps, 1):
            raise ConfigError(
                f"save_steps={self.save_steps} must be a multiple of eval_steps={self.eval_steps} "
                f"with early stopping (the best adapter is restored from a checkpoint)"
            )
        if self.stage == "kto" and self.batch_size < 2:
            raise ConfigError(
                "stage=kto needs batch_size >= 2 (its KL term pairs each prompt with another row's answer)"
            )
        if self.stage != "sft" and (self.packing or self.train_on_prompt):
            raise ConfigError(f"packing and train_on_prompt apply to stage=sft only, not stage={self.stage}")
        if self.stage != "sft" and self.truncation_side != "right":
            raise ConfigError(
                f"truncation_side applies to stage=sft only; stage={self.stage} cuts prompts from the "
                f"left and answers from the right (see max_prompt_length)"
            )
        _check(
            "truncation_side",
            self.truncation_side,
            self.truncation_side in TRUNCATION_SIDES,
            "is unknown; use right (keep the start) or left (keep the end)",
        )
        _check(
            "max_prompt_length",
            self.max_prompt_length,
            0 <= self.max_prompt_length < self.max_length,
            f"must be 0 or more and below max_length={self.max_length}",
        )
        if self.max_prompt_length and self.stage == "sft":
            raise ConfigError("max_prompt_length applies to the preference stages; use truncation_side for sft")
        try:
            ColumnMap.parse(self.columns)
            parse_weights(self.data_weights, len(split_sources(self.data)))
        except DataError as exc:
            raise ConfigError(str(exc)) from None
        _check("stage", self.stage, self.stage in STAGES, f"is unknown; use one of {', '.join(STAGES)}")
        if self.quantization != "none":
            from deltatune.runtime.quantization import (
                QUANTIZATIONS,  # imports torch: only for a quantised run
            )

            _check(
                "quantization",
                self.quantization,
                self.quantization in QUANTIZATIONS,
                f"is unknown; use one of {', '.join(QUANTIZATIONS)}",
            )
        _check(
            "precision", self.precision, self.precision in PRECISIONS, f"is unknown; use one of {', '.join(PRECISIONS)}"
        )
        _check(
            "lr_scheduler",
            self.lr_scheduler,
            self.lr_scheduler in LR_SCHEDULERS,
            f"is unknown; use one of {', '.join(LR_SCHEDULERS)}",
        )
        self.reporters()  # validates report_to
        if self.packing and isinstance(self.delta_config(), PromptLearningConfig):
            raise ConfigError(
                f"packing=true does not work with method={self.method}: its virtual tokens come once per "
                f"row, so only a row's first example would see them; set packing=false"
            )
        self.delta_config()  # validates the method and its hyper-parameters

    def grpo_settings(self) -> GRPOSettings:
        """GRPO's settings from this run's keys (a ConfigError names a bad one)."""
        if not self.reward_funcs.strip():
            raise ConfigError("stage=grpo needs reward_funcs=..., e.g. reward_funcs=accuracy or rewards.py:correct")
        try:
            weights = tuple(float(w) for w in self.reward_weights.split(",")) if self.reward_weights else None
        except ValueError:
            raise ConfigError(f"reward_weights={self.reward_weights!r} must be numbers, e.g. 1,0.5") from None
        return GRPOSettings(
            num_generations=self.num_generations,
            max_prompt_length=self.max_prompt_length or self.max_length,
            max_completion_length=self.max_completion_length,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            beta=self.beta,
            epsilon=self.epsilon,
            epsilon_high=self.epsilon_high or None,
            loss_type=self.loss_type,
            scale_rewards=self.scale_rewards,
            num_iterations=self.num_iterations,
            steps_per_generation=self.steps_per_generation or None,
            mask_truncated_completions=self.mask_truncated_completions,
            reward_weights=weights,
            padding_free=self.padding_free,
        )

    def reporters(self) -> list[str]:
        """The report_to integrations this run logs to ("all": the installed ones; tensorboard=true adds
        tensorboard); a ConfigError when one is unknown or its package is not installed."""
        names = [name.strip() for name in self.report_to.split(",") if name.strip()]
        if len(names) > 1 and {"all", "none"} & set(names):
            raise ConfigError(f"report_to={self.report_to!r} mixes all/none with names; give one of them")
        if names in (["all"], ["none"]):
            names = [name for name in REPORTERS if installed(REPORTERS[name][0])] if names == ["all"] else []
        for name in names:
            if name not in REPORTERS:
                guess = difflib.get_close_matches(name, REPORTERS, n=1)
                hint = f"did you mean {guess[0]!r}? " if guess else ""
                raise ConfigError(
                    f"report_to: {name!r} is unknown; {hint}use none, all or some of {', '.join(REPORTERS)}"
                )
            if not installed(REPORTERS[name][0]):
                raise ConfigError(f"report_to={name} needs the {name} package: pip install {REPORTERS[name][1]}")
        if self.tensorboard and "tensorboard" not in names:
            if not installed(REPORTERS["tensorboard"][0]):
                raise ConfigError("tensorboard=true needs the tensorboard package: pip install tensorboard")
            names.append("tensorboard")
        return names

    def check_inputs(self) -> None:
        """The checks that read files but load nothing (no torch, no download): every data source exists
        (``data.check_sources``), and ``max_length`` is within the model's context (``check_model``)."""
        check_sources(self.data)
        if self.eval_data:
            check_sources(self.eval_data, "eval_data")
        self.check_model()

    def check_model(self) -> None:
        """Check the run against the model's config.json, read as a file (no torch, no download): a
        ``max_length`` beyond the model's context is a ConfigError. Nothing is checked where that file
        is not on disk yet or has no context length."""
        path = _model_config_file(self.model)
        if path is None:
            return
        try:
            fields = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            return  # loading the model names the problem
        name, context = next(((n, fields[n]) for n in _CONTEXT_FIELDS if isinstance(fields.get(n), int)), (None, 0))
        if name and self.max_length > context:
            raise ConfigError(
                f"max_length={self.max_length} is longer than model={self.model}'s context of {context} "
                f"tokens ({name} in {path}); set max_length={context} or less"
            )

    def delta_config(self, base_model: str | None = None):
        """The adapter config this run trains: a causal-LM task, or a one-output classifier's for stage=rm."""
        return build_config(
            self.method, self.method_options, "SEQ_CLS" if self.stage == "rm" else "CAUSAL_LM", base_model
        )

    @classmethod
    def keys(cls) -> list[str]:
        """The run's own keys (the method's hyper-parameters come on top)."""
        return [f.name for f in dataclasses.fields(cls) if f.name != "method_options"]

    @classmethod
    def from_sources(cls, config_file: str | None, overrides: list[str]) -> TrainConfig:
        """Defaults, then a YAML file, then ``key=value`` overrides (values parsed as YAML scalars,
        except for text keys such as ``output_dir``, which keep the raw text: ``output_dir=007``).

        ``epochs`` and ``max_steps`` are alternatives: an override of one drops the file's other. An
        override of ``method`` drops the file's hyper-parameters of other methods, with a notice on
        stderr (``examples/sft.yaml method=bottleneck`` leaves LoRA's ``r`` behind).
        """
        values: dict[str, Any] = read_yaml(Path(config_file)) if config_file else {}
        given: dict[str, Any] = {}
        hints = get_type_hints(cls)
        for item in overrides:
            key, sep, raw = item.partition("=")
            if not sep or not key:
                raise ConfigError(f"override {item!r} is not key=value; e.g. max_steps=100")
            key = key.strip()
            given[key] = override_value(item, raw, text=hints.get(key) is str)
        for key, other in (("epochs", "max_steps"), ("max_steps", "epochs")):
            if key in given and other not in given:
                values.pop(other, None)
        if str(given.get("method", "")).lower() not in ("", str(values.get("method", cls.method)).lower()):
            _drop_other_methods_keys(values, str(given["method"]), str(config_file))
        return cls.from_dict({**values, **given})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Typed config from flat keys: run keys, then the method's hyper-parameters."""
        hints = get_type_hints(cls)
        own = cls.keys()
        method = str(values.get("method", cls.method))
        method_keys = list(option_defaults(method))
        typed: dict[str, Any] = {"method_options": {}}
        for key, value in values.items():
            if key in own:
                typed[key] = coerce(key, value, hints[key])
            elif key in method_keys:
                typed["method_options"][key] = value
            else:
                raise ConfigError(f"unknown config key {key!r}; {_unknown_key_hint(key, own, method, method_keys)}")
        if "epochs" in values and "max_steps" not in values:
            typed["max_steps"] = 0
        run_defaults = method_class(method).run_defaults
        for key, value in {**STAGE_DEFAULTS.get(str(typed.get("stage", cls.stage)), {}), **run_defaults}.items():
            typed.setdefault(key, value)
        steps = typed.get("max_steps", cls.__dataclass_fields__["max_steps"].default)
        if "warmup_steps" in run_defaults and "warmup_steps" not in values and steps > 0:
            # a method's own warm-up takes at most a quarter of a run: a short run must still reach its decay
            typed["warmup_steps"] = min(typed["warmup_steps"], steps // 4)
        return cls(**typed)


GRPO_KEYS = (
    "reward_funcs",
    "reward_weights",
    "num_generations",
    "max_completion_length",
    "temperature",
    "top_p",
    "top_k",
    "epsilon",
    "epsilon_high",
    "scale_rewards",
    "num_iterations",
    "steps_per_generation",
    "mask_truncated_completions",
)


def _unknown_key_hint(key: str, own: list[str], method: str, method_keys: list[str]) -> str:
    """Whose hyper-parameter ``key`` is when another method has it, else the nearest key (in any case
    and with - for _), else where the keys are listed."""
    owners = [name for name in methods_taking(key) if name != method.lower()]
    if owners:
        takes = ", ".join(method_keys[:8]) + (", ..." if len(method_keys) > 8 else "")
        return (
            f"it is a hyper-parameter of method={'/'.join(owners)}, not method={method}: drop it or set "
            f"method={owners[0]} (method={method} takes {takes}; `deltatune train --help` lists the keys)"
        )
    candidates = {name.lower(): name for name in own + method_keys}
    guess = difflib.get_close_matches(key.lower().replace("-", "_"), candidates, n=1)
    return f"did you mean {candidates[guess[0]]!r}?" if guess else "`deltatune train --help` lists the keys"


def _drop_other_methods_keys(values: dict[str, Any], method: str, source: str) -> None:
    """Drop from the file's ``values`` the hyper-parameters of other methods than ``method`` (set on the
    command line), with a one-line notice on stderr."""
    own = option_defaults(method)
    dropped = [key for key in values if key not in own and key not in TrainConfig.keys() and methods_taking(key)]
    if dropped:
        for key in dropped:
            del values[key]
        owners = sorted({name for key in dropped for name in methods_taking(key)})
        print(
            f"config: method={method} (command line) drops {', '.join(dropped)} from {source}: hyper-parameters "
            f"of method={'/'.join(owners)}",
            file=sys.stderr,
        )


def _model_config_file(model: str) -> Path | None:
    """The config.json of ``model`` when it is on disk now: a local folder's, an embedded model's
    (``assets.embedded_config``), or a hub id's in the Hugging Face cache; else None."""
    from deltatune.runtime import assets  # torch-free

    local = Path(model) / "config.json"
    if local.is_file():
        return local
    embedded = assets.embedded_config(model)
    if embedded is not None or model.count("/") != 1 or Path(model).exists():
        return embedded
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(model, "config.json")
    except ValueError:  # not a valid hub id
        return None
    return Path(cached) if isinstance(cached, str) else None


def _check(name: str, value: Any, ok: bool, problem: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r} {problem}")
