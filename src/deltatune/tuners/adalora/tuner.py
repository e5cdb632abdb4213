"""The AdaLoRA tuner: wraps targets in SVD layers (``layer.py``), saves only the triplets the allocator kept, and
runs AdaLoRA's two training terms through the tuner's training hooks: the orthogonality regulariser added to the
loss and the rank allocator (``allocator.py``) after every optimizer step.

Merging, unmerging, ``bias`` and removal are LoRA's (``lora/tuner.py``); AdaLoRA has no fused path.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear
from transformers.pytorch_utils import Conv1D

from deltatune.config import DeltaConfig
from deltatune.errors import ConfigError
from deltatune.io import file_key_map, to_file_key
from deltatune.kernels.base_weight import is_quantized
from deltatune.tuners.adalora.allocator import allocate
from deltatune.tuners.adalora.config import RANK_PATTERN_SUFFIX, AdaLoraConfig
from deltatune.tuners.adalora.layer import AdaLoraLayer, SVDConv2d, SVDLinear
from deltatune.tuners.base import Tuner, replace_module
from deltatune.tuners.lora.tuner import LoraTuner, sync_fan_in_fan_out
from deltatune.tuners.targeting import find_targets

# peft 0.21.2's AdaLoRA defaults by config.model_type (where target_modules is None); peft refuses other types.
ADALORA_TARGET_MODULES: dict[str, list[str] | str] = {
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "roberta": ["query", "key", "value", "dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "deberta": ["in_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    **dict.fromkeys(("gpt2", "gpt_bigcode"), ["c_attn"]),
    **dict.fromkeys(("bloom", "gpt_neox"), ["query_key_value"]),
    **dict.fromkeys(("bert",), ["query", "value"]),
    **dict.fromkeys(
        ("gptj", "gpt_neo", "llama", "llama4", "gemma", "gemma2", "gemma3_text", "qwen2", "qwen3"),
        ["q_proj", "v_proj"],
    ),
}


class AdaLoraTuner(LoraTuner):
    """Injects AdaLoRA adapters; prunes their files by the allocator's masks; trains them with its two terms."""

    config_class = AdaLoraConfig
    layer_class = AdaLoraLayer

    def inject(self, model: nn.Module, config: AdaLoraConfig, adapter_name: str) -> None:
        if config.target_modules is None:
            config.target_modules = _default_targets(model)
        targets = find_targets(model, config)
        sync_fan_in_fan_out(model, config, targets)
        for name in targets:  # validate everything before the model is touched
            _check_target(name, _base(model.get_submodule(name)))
        for name in targets:
            module = model.get_submodule(name)
            if not isinstance(module, AdaLoraLayer):
                layer_class = SVDConv2d if isinstance(module, nn.Conv2d) else SVDLinear
                module = replace_module(model, name, layer_class(module))
            module.add(adapter_name, config.layer_rank(name), config)

    def refresh(self, model: nn.Module) -> None:
        """Nothing to re-derive: AdaLoRA layers never join LoRA's fused gated MLPs."""

    def unload(self, model: nn.Module) -> None:
        Tuner.unload(self, model)

    def file_tensors(
        self, model: nn.Module, adapter_name: str, state: dict[str, nn.Parameter]
    ) -> dict[str, torch.Tensor]:
        """The parameters, with only the triplets the last allocation kept (rows of A and E, columns of B), as
        peft writes them beside the config's ``rank_pattern``."""
        tensors = dict(super().file_tensors(model, adapter_name, state))
        key_of = {name: key for key, name in file_key_map(state, adapter_name).items()}
        for layer_name, layer in self.layers(model):
            kept = layer.kept.get(adapter_name)
            if kept is None or bool(kept.all()):
                continue
            for factor in ("A", "E", "B"):
                key = key_of[f"{layer_name}.lora_{factor}.{adapter_name}"]
                tensors[key] = tensors[key][:, kept] if factor == "B" else tensors[key][kept]
        return tensors

    def fit_file_tensors(
        self,
        model: nn.Module,
        adapter_name: str,
        config: DeltaConfig,
        tensors: dict[str, torch.Tensor],
        saved: DeltaConfig,
    ) -> dict[str, torch.Tensor]:
        """A checkpoint pruned by its ``rank_pattern``, for a live adapter that still has every triplet (the
        run that wrote it, resumed or reloading its best checkpoint): the kept triplets go back to their places,
        the pruned ones are zero and stay masked, and the adapter takes the checkpoint's ``rank_pattern``."""
        pattern = getattr(saved, "rank_pattern", None) or {}
        fitted = dict(tensors)
        for layer_name, layer in self._layers_of(model, adapter_name):
            mask = pattern.get(layer_name + RANK_PATTERN_SUFFIX)
            if mask is None or len(mask) != layer.r[adapter_name] or all(mask):
                continue
            kept = torch.tensor(mask, dtype=torch.bool)
            keys = {factor: to_file_key(f"{layer_name}.lora_{factor}.{adapter_name}", adapter_name) for factor in "AEB"}
            if any(key not in fitted or fitted[key].shape[factor == "B"] != sum(mask) for factor, key in keys.items()):
                continue  # not this checkpoint's form: loading names the mismatch
            for factor, key in keys.items():
                full = torch.zeros(getattr(layer, f"lora_{factor}")[adapter_name].shape, dtype=fitted[key].dtype)
                if factor == "B":
                    full[:, kept] = fitted[key]
                else:
                    full[kept] = fitted[key]
                fitted[key] = full
            layer.kept[adapter_name] = kept.to(layer.lora_E[adapter_name].device)
            config.rank_pattern = dict(pattern)
        return fitted

    # -- training ---------------------------------------------------------------------------------------
    def start_training(self, model: nn.Module, adapters: Mapping[str, DeltaConfig], total_steps: int) -> None:
        """Record the run's step count as ``total_step`` where it is unset, and check the schedule fits it."""
        trained = _trained(adapters)
        if trained is None:
            return
        name, config = trained
        pruned = [layer_name for layer_name, layer in self._layers_of(model, name) if layer.r[name] != config.init_r]
        if pruned:
            raise ConfigError(
                f"AdaLoRA adapter {name!r} was loaded with pruned ranks (rank_pattern, e.g. {pruned[0]}); its rank "
                f"allocation is over, so it cannot be trained again as AdaLoRA; train a new adapter instead"
            )
        config.check_schedule(total_steps if config.total_step is None else config.total_step)
        if config.total_step is None:
            config.total_step = total_steps

    def regularization_loss(self, model: nn.Module, adapters: Mapping[str, DeltaConfig]) -> torch.Tensor | None:
        """orth_reg_weight · mean over every A and B of ||A Aᵀ − I||_F and ||Bᵀ B − I||_F (as peft: not squared)."""
        trained = _trained(adapters)
        if trained is None or trained[1].orth_reg_weight == 0:
            return None
        name, config = trained
        total, count = None, 0
        for _, layer in self._layers_of(model, name):
            lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
            for gram in (lora_a @ lora_a.T, lora_b.T @ lora_b):
                eye = torch.eye(*gram.shape, dtype=gram.dtype, device=gram.device)
                term = torch.linalg.matrix_norm(gram - eye, ord="fro")
                total, count = (term if total is None else total + term), count + 1
        return None if total is None else config.orth_reg_weight * (total / count)

    def after_optimizer_step(self, model: nn.Module, adapters: Mapping[str, DeltaConfig], step: int) -> None:
        """The rank allocator, on the gradients of optimizer step ``step`` (0 = the first)."""
        trained = _trained(adapters)
        if trained is not None:
            name, config = trained
            allocate(self._layers_of(model, name), name, config, step)

    def _layers_of(self, model: nn.Module, adapter_name: str) -> list[tuple[str, AdaLoraLayer]]:
        return [(name, layer) for name, layer in self.layers(model) if adapter_name in layer.r]


def _trained(adapters: Mapping[str, DeltaConfig]) -> tuple[str, AdaLoraConfig] | None:
    """The one AdaLoRA adapter that trains, or None; peft's AdaLoRA trains one adapter at a time, and so does this."""
    if len(adapters) > 1:
        raise ConfigError(
            f"AdaLoRA trains one adapter at a time (as in peft), but {', '.join(adapters)} are active and trainable; "
            f"set_adapter() one of them, or load the others with is_trainable=False"
        )
    return next(iter(adapters.items()), None)


def _default_targets(model: nn.Module) -> list[str] | str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADALORA_TARGET_MODULES:
        raise ConfigError(
            f"AdaLoRA has no default target_modules for model_type={model_type!r} (nor has peft); pass target_modules, "
            f"e.g. 'all-linear' or a list of module names"
        )
    targets = ADALORA_TARGET_MODULES[model_type]
    return targets if isinstance(targets, str) else list(targets)


def _check_target(name: str, base: nn.Module) -> None:
    """AdaLoRA wraps what peft's does: nn.Linear, GPT-2 Conv1D and plain nn.Conv2d, unquantised."""
    kind = type(base).__name__
    if isinstance(base, NonDynamicallyQuantizableLinear):
        raise ConfigError(
            f"{name} is a MultiheadAttention's out_proj, whose forward the attention never calls; leave it out"
        )
    if not isinstance(base, (nn.Linear, Conv1D, nn.Conv2d)):
        raise ConfigError(
            f"AdaLoRA adapts nn.Linear, Conv1D and nn.Conv2d (as in peft), not {kind} {name}; leave it out of "
            f"target_modules or use LoRA"
        )
    if is_quantized(base.weight):
        raise ConfigError(
            f"AdaLoRA over a quantised base ({kind} {name}) is not built in deltatune; load the base unquantised "
            f"or use LoRA (QLoRA)"
        )
    if isinstance(base, nn.Conv2d) and base.groups != 1:
        raise ConfigError(
            f"AdaLoRA cannot adapt the grouped convolution {name} (groups={base.groups}): its update B·A does not "
            f"have the kernel's shape (peft fails on it too); leave it out of target_modules"
        )
    if isinstance(base, nn.Conv2d) and base.padding_mode != "zeros":
        raise ConfigError(
            f"AdaLoRA on {name} (padding_mode={base.padding_mode!r}) would pad its update with zeros, unlike the "
            f"base (as peft does); leave it out of target_modules"
        )


def _base(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, AdaLoraLayer) else module
