"""DeltaModel: a thin wrapper that owns named adapters over one shared, frozen base model.

It delegates everything method-specific to the tuner of each adapter's config (``tuners/``) and
everything file-specific to ``io``; what is left is bookkeeping: which adapters exist, which are
active, which parameters train, and the peft-like public API.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltatune.config import CONFIG_NAME, DeltaConfig
from deltatune.errors import AdapterLoadError, ConfigError, MergeError
from deltatune.io import (
    adapter_dir,
    check_tensors_fit,
    file_key_map,
    read_adapter_weights,
    write_adapter,
)
from deltatune.tuners import tuner_for
from deltatune.tuners.lora.init import plain_lora
from deltatune.tuners.modules_to_save import ModulesToSaveTuner
from deltatune.tuners.rows import grouped
from deltatune.tuners.targeting import CLASSIFIER_HEADS, CLASSIFIER_TASKS
from deltatune.tuners.trainable_tokens import TrainableTokensTuner

_MODULES_TO_SAVE = ModulesToSaveTuner()
_TRAINABLE_TOKENS = TrainableTokensTuner()


class DeltaModel(nn.Module):
    """A base model with named adapters. Attribute access, ``forward`` and ``generate`` reach the base model.

    Example::

        model = AutoModelForCausalLM.from_pretrained(path)
        model = get_delta_model(model, LoraConfig(r=16, target_modules="all-linear"))
        model.print_trainable_parameters()
        ...train...
        model.save_pretrained("out/adapter")
    """

    def __init__(self, model: nn.Module, config: DeltaConfig, adapter_name: str = "default") -> None:
        super().__init__()
        if isinstance(model, DeltaModel):
            raise ConfigError("this model is already a DeltaModel; use add_adapter() to add another adapter")
        self.base_model = model
        self.peft_config: dict[str, DeltaConfig] = {}
        self._active: list[str] = []
        self._disabled = False
        self._layers: list[nn.Module] | None = None  # kept for adapter_rows (_adapted_layers)
        self._mixing: dict[str, str | None] = {}  # adapter -> why it cannot mix per row (None: it can)
        self.adapters_version = 0  # moved by every change of the adapters held, active, enabled or merged
        self.add_adapter(adapter_name, config)
        self.set_adapter(adapter_name)

    # -- attribute forwarding -------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        """``base_model.generate``. A decoder-only model continues every row from its last column, so
        right-padded prompts are moved to left padding first (the returned rows hold them that way)."""
        if len(args) == 1:  # generate(input_ids, ...)
            args, kwargs = (), {"inputs": args[0], **kwargs}
        return self.base_model.generate(*args, **_left_padded(self.base_model, kwargs))

    # -- adapters ---------------------------------------------------------------------------
    @property
    def active_adapter(self) -> str | None:
        """The (first) active adapter's name, as in peft."""
        return self._active[0] if self._active else None

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def merged_adapters(self) -> list[str]:
        layers = [layer for tuner in self._merging_tuners() for _, layer in tuner.layers(self.base_model)]
        return sorted({name for layer in layers for name in getattr(layer, "merged_adapters", [])})

    def add_adapter(self, adapter_name: str, config: DeltaConfig) -> None:
        """Inject a new adapter (inactive unless it is the first); the base model stays frozen."""
        _check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ConfigError(f"adapter {adapter_name!r} already exists; pick another name or delete_adapter() it")
        if not isinstance(config, DeltaConfig) or not config.peft_type:
            raise ConfigError(f"expected a deltatune config such as LoraConfig, got {type(config).__name__}")
        existing = {c.peft_type for c in self.peft_config.values()}
        if existing and config.peft_type not in existing:
            raise ConfigError(
                f"cannot add a {config.peft_type} adapter to a model holding {', '.join(sorted(existing))} adapters; "
                f"use one method per DeltaModel"
            )
        if self.merged_adapters:
            raise ConfigError("cannot add an adapter while adapters are merged; call unmerge_adapter() first")
        config.base_model_name_or_path = config.base_model_name_or_path or _name_or_path(self.base_model)
        if config.task_type in CLASSIFIER_TASKS:  # a new head must train, as peft does it
            config.modules_to_save = list(dict.fromkeys([*(config.modules_to_save or []), *CLASSIFIER_HEADS]))
        tuner_for(config).inject(self.base_model, config, adapter_name)
        try:
            _MODULES_TO_SAVE.inject(self.base_model, config, adapter_name)
            _TRAINABLE_TOKENS.inject(self.base_model, config, adapter_name)
        except Exception:
            tuner_for(config).delete(self.base_model, adapter_name)
            _MODULES_TO_SAVE.delete(self.base_model, adapter_name)
            raise
        finally:
            tuner_for(config).refresh(self.base_model)
            self._adapters_changed()
        self.peft_config[adapter_name] = config
        self.base_model.train(self.base_model.training)  # new modules (dropout) follow the model's mode
        self._apply_state()

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Make ``adapter_name`` (or several names, summed) the active adapter(s); only they train."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for name in names:
            self._check_exists(name)
        self._active = names
        self._apply_state()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter; when it was active, the first remaining adapter becomes active."""
        self._check_exists(adapter_name)
        if adapter_name in self.merged_adapters:
            raise MergeError(f"adapter {adapter_name!r} is merged into the base weights; call unmerge_adapter() first")
        config = self.peft_config.pop(adapter_name)
        tuner_for(config).delete(self.base_model, adapter_name)
        _MODULES_TO_SAVE.delete(self.base_model, adapter_name)
        _TRAINABLE_TOKENS.delete(self.base_model, adapter_name)
        tuner_for(config).refresh(self.base_model)
        self._adapters_changed()
        self._active = [name for name in self._active if name != adapter_name] or list(self.peft_config)[:1]
        self._apply_state()

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the plain base model inside the block; the previous state (merged or not) comes back after,
        even when the block raises::

            with model.disable_adapter():
                reference_logits = model(**batch).logits
        """
        if self._disabled:  # nested: the outer block restores the state
            yield
            return
        merged = self.merged_adapters
        self.unmerge_adapter()
        self._set_disabled(True)
        try:
            yield
        finally:
            self._set_disabled(False)
            if merged:
                self.merge_adapter(merged)

    @contextlib.contextmanager
    def adapter_rows(self, adapter_names: Sequence[str | None], check_weights: bool = True) -> Iterator[None]:
        """Inside the block, row i of every batch runs with adapter ``adapter_names[i]`` (None: the base model
        alone), all rows in one forward pass; LoRA and DoRA adapters of any ranks mix (``tuners/rows.py``)::

            with model.adapter_rows(["support", "legal", None]):
                logits = model(input_ids=three_rows).logits

        A server enters it once per decoding step, so what it checks is kept between calls (until adapters are
        added or deleted): the adapted layers, whether each adapter can mix, and each layer's adapters stacked.
        A stack is checked against its tensors' version counters at every block, so that a write in place (a
        training step) is seen; ``check_weights=False`` skips that reading, for a caller that vouches no adapter
        tensor was written in place since a block that checked these adapters (``GenerationEngine``'s
        ``static_weights``). Adding, deleting, merging or unmerging an adapter is seen either way.
        """
        for name in dict.fromkeys(n for n in adapter_names if n is not None):
            self.check_mixable(name)
        layers = self._adapted_layers()
        if any(getattr(layer, "merged_adapters", None) for layer in layers):
            raise MergeError("adapters are merged into the base weights, so rows cannot differ; call unmerge_adapter()")
        groups = grouped(tuple(adapter_names), next(self.base_model.parameters()).device, check_weights)
        for layer in layers:  # in the instance's __dict__: nn.Module.__setattr__ would cost ~1 ms a decoding step
            layer.__dict__["row_groups"] = groups
        try:
            yield
        finally:
            for layer in layers:
                layer.__dict__["row_groups"] = None

    def check_mixable(self, adapter_name: str) -> None:
        """Raise ``ConfigError`` (one line) unless adapter ``adapter_name`` can run on some rows of a batch while
        other rows run other adapters (see ``adapter_rows``)."""
        self._check_exists(adapter_name)
        if adapter_name not in self._mixing:
            config = self.peft_config[adapter_name]
            self._mixing[adapter_name] = tuner_for(config).row_mixing_refusal(self.base_model, config, adapter_name)
        reason = self._mixing[adapter_name]
        if reason:
            raise ConfigError(f"adapter {adapter_name!r} cannot share a batch with other adapters: {reason}")

    def _adapted_layers(self) -> list[nn.Module]:
        """Every layer of every adapter's method, found once after each add or delete."""
        if self._layers is None:
            self._layers = [layer for tuner in self._tuners() for _, layer in tuner.layers(self.base_model)]
        return self._layers

    def _adapters_changed(self) -> None:
        """Forget what ``adapter_rows`` keeps: the layers and the adapters' mixability."""
        self._layers, self._mixing = None, {}
        self.adapters_version += 1

    # -- merging ----------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """W0 += s·BA for the active (or named) adapters. ``safe_merge`` refuses NaN/Inf and changes nothing."""
        names = self._active if adapter_names is None else list(adapter_names)
        for name in names:
            self._check_exists(name)
        self.adapters_version += 1  # first: a merge that fails part-way may have written some weights
        for tuner in self._merging_tuners():
            tuner.merge(self.base_model, names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        """Subtract every merged adapter from the base weights again."""
        for tuner in self._merging_tuners():
            tuner.unmerge(self.base_model)
        self.adapters_version += 1

    def merge_and_unload(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> nn.Module:
        """Merge the active (or named) adapters and return the plain base model, free of deltatune modules.

        The result saves and loads with transformers alone. This DeltaModel is empty afterwards.
        """
        self.merge_adapter(adapter_names, safe_merge=safe_merge)
        for tuner in self._merging_tuners():
            tuner.unload(self.base_model)
        _MODULES_TO_SAVE.keep_trained(self.base_model)
        return self._release()

    def unload(self) -> nn.Module:
        """Remove every adapter without merging and return the base model exactly as it was."""
        self.unmerge_adapter()
        for tuner in self._merging_tuners():
            tuner.unload(self.base_model)
        _MODULES_TO_SAVE.unload(self.base_model)
        return self._release()

    # -- parameters -------------------------------------------------------------------------
    def adapter_state(self, adapter_name: str) -> dict[str, nn.Parameter]:
        """In-memory name -> parameter of everything adapter ``adapter_name`` saves."""
        self._check_exists(adapter_name)
        config = self.peft_config[adapter_name]
        tuner = tuner_for(config)
        state = tuner.adapter_parameters(self.base_model, adapter_name)
        state.update(_MODULES_TO_SAVE.adapter_parameters(self.base_model, adapter_name))
        state.update(_TRAINABLE_TOKENS.adapter_parameters(self.base_model, adapter_name))
        state.update(tuner.trained_base_parameters(self.base_model, config, adapter_name))
        return state

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts; shared tensors are counted once."""
        unique = {id(p): p for p in self.parameters()}.values()
        return sum(p.numel() for p in unique if p.requires_grad), sum(p.numel() for p in unique)

    def print_trainable_parameters(self) -> None:
        """Print peft's line: ``trainable params: 1,234 || all params: 5,678 || trainable%: 21.7322``."""
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    # -- training hooks (a trainer calls them; methods with their own training terms implement them) ------
    def start_training(self, total_steps: int) -> None:
        """A training run of ``total_steps`` optimizer steps begins (AdaLoRA takes its ``total_step`` from it)."""
        for tuner, adapters in self._training_adapters():
            tuner.start_training(self.base_model, adapters, total_steps)

    def regularization_loss(self) -> torch.Tensor | None:
        """The term the adapters that train add to the loss, once per optimizer step (AdaLoRA's orthogonality
        regulariser); None when no method has one."""
        terms = [tuner.regularization_loss(self.base_model, adapters) for tuner, adapters in self._training_adapters()]
        terms = [term for term in terms if term is not None]
        return sum(terms[1:], terms[0]) if terms else None

    def after_optimizer_step(self, step: int) -> None:
        """Call after optimizer step ``step`` (0 = the first) and before the gradients are zeroed (AdaLoRA's rank
        allocation reads them)."""
        for tuner, adapters in self._training_adapters():
            tuner.after_optimizer_step(self.base_model, adapters, step)

    def _training_adapters(self):
        """(tuner, {name: config}) of the active adapters that train."""
        grouped: dict[type, tuple] = {}
        for name in self._active:
            config = self.peft_config[name]
            if not config.inference_mode:
                tuner = tuner_for(config)
                grouped.setdefault(type(tuner), (tuner, {}))[1][name] = config
        return list(grouped.values())

    # -- files --------------------------------------------------------------------------------
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        selected_adapters: list[str] | None = None,
        state_dict: Mapping[str, torch.Tensor] | None = None,
        convert_to_lora_from: str | os.PathLike | None = None,
    ) -> None:
        """Write adapters in peft's format: "default" in ``save_directory``, others in sub-folders.

        Each file is written atomically, so an interrupted save keeps the previous version.
        ``state_dict`` (keys as in ``self.state_dict()``) gives the tensors to save instead of the
        live parameters, e.g. adapters gathered from FSDP shards by ``distributed.gather_adapter_state``.
        ``convert_to_lora_from``: a folder where these PiSSA/OLoRA adapters were saved right after
        they were created; each is then written as a plain LoRA of rank 2r for the ORIGINAL base
        (peft's ``path_initial_model_for_weight_conversion``; ``tuners.lora_init.plain_lora``).
        Unlike peft, the initial folder is only read, never rewritten.
        """
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        for name in names:
            self._check_exists(name)
        for name in names:
            config = self.peft_config[name]
            state = self.adapter_state(name)
            if state_dict is not None:
                state = _entries(state_dict, state)
            tensors = tuner_for(config).file_tensors(self.base_model, name, state)
            saved_config = type(config).from_dict({**config.to_dict(), "inference_mode": True})
            if convert_to_lora_from is not None:
                initial = read_adapter_weights(adapter_dir(convert_to_lora_from, name))
                saved_config, tensors = plain_lora(saved_config, tensors, initial)
            write_adapter(adapter_dir(save_directory, name), saved_config.to_json(), tensors)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: DeltaConfig | None = None,
        allow_pickle: bool = False,
    ) -> DeltaModel:
        """Load an adapter saved by deltatune or peft onto ``model``.

        The adapter is frozen unless ``is_trainable``. A file that does not fit the model is
        refused with the first mismatching key, and ``model`` is left exactly as it was.
        """
        config = config or DeltaConfig.from_pretrained(model_id)
        config.inference_mode = not is_trainable
        tensors = read_adapter_weights(model_id, allow_pickle=allow_pickle)
        delta = cls(model, config, adapter_name)
        try:
            delta._load_tensors(adapter_name, tensors, str(model_id))
        except Exception:
            delta.unload()
            raise
        return delta

    def load_adapter(
        self,
        model_id: str | os.PathLike,
        adapter_name: str,
        is_trainable: bool = False,
        allow_pickle: bool = False,
    ) -> None:
        """Load another saved adapter under ``adapter_name`` (it does not become active)."""
        config = DeltaConfig.from_pretrained(model_id)
        config.inference_mode = not is_trainable
        tensors = read_adapter_weights(model_id, allow_pickle=allow_pickle)
        self.add_adapter(adapter_name, config)
        try:
            self._load_tensors(adapter_name, tensors, str(model_id))
        except Exception:
            self.delete_adapter(adapter_name)
            raise

    def load_adapter_weights(self, model_id: str | os.PathLike, adapter_name: str = "default") -> None:
        """Overwrite existing adapter ``adapter_name``'s tensors with those saved in ``model_id`` (e.g. a
        training checkpoint of it); its config, active state and trainability stay as they are."""
        self._check_exists(adapter_name)
        tensors = read_adapter_weights(model_id)
        if (Path(model_id) / CONFIG_NAME).is_file():  # the file's own form (AdaLoRA: pruned by its rank_pattern)
            config = self.peft_config[adapter_name]
            saved = type(config).from_pretrained(model_id)
            tensors = tuner_for(config).fit_file_tensors(self.base_model, adapter_name, config, tensors, saved)
        self._load_tensors(adapter_name, tensors, str(model_id))

    def _load_tensors(self, adapter_name: str, tensors: dict[str, torch.Tensor], source: str) -> None:
        tuner = tuner_for(self.peft_config[adapter_name])
        required = tuner.file_targets(self.base_model, adapter_name, self.adapter_state(adapter_name))
        optional = tuner.optional_file_parameters(self.base_model, adapter_name)
        targets = {key: optional[name] for key, name in file_key_map(optional, adapter_name).items()} | required
        missing = [key for key in required if key not in tensors]
        if missing:
            raise AdapterLoadError(
                f"{source}: the file lacks {missing[0]} (and {len(missing) - 1} more keys); wrong config?"
            )
        check_tensors_fit(tensors, targets, source)
        with torch.no_grad():
            for key, tensor in tensors.items():
                targets[key].copy_(tensor.to(device=targets[key].device, dtype=targets[key].dtype))

    # -- internals ---------------------------------------------------------------------------
    def _tuners(self):
        return list({type(tuner_for(c)): tuner_for(c) for c in self.peft_config.values()}.values())

    def _merging_tuners(self):
        """The adapters' tuners, then the trainable-token rows (merged and unloaded with them)."""
        return [*self._tuners(), _TRAINABLE_TOKENS]

    def _check_exists(self, name: str) -> None:
        if name not in self.peft_config:
            known = ", ".join(self.peft_config) or "none"
            raise ConfigError(f"no adapter named {name!r}; adapters on this model: {known}")

    def _set_disabled(self, disabled: bool) -> None:
        self._disabled = disabled
        for tuner in [*self._merging_tuners(), _MODULES_TO_SAVE]:
            tuner.set_disabled(self.base_model, disabled)
        self.adapters_version += 1

    def _apply_state(self) -> None:
        """Activate the active adapters in every layer; only their parameters train."""
        self.adapters_version += 1
        for tuner in [*self._merging_tuners(), _MODULES_TO_SAVE]:
            tuner.set_active(self.base_model, self._active)
        self.base_model.requires_grad_(False)
        for name in self._active:
            if not self.peft_config[name].inference_mode:
                for param in self.adapter_state(name).values():
                    param.requires_grad_(True)

    def _release(self) -> nn.Module:
        model = self.base_model
        self.peft_config.clear()
        self._active = []
        self._adapters_changed()
        return model


def get_delta_model(model: nn.Module, config: DeltaConfig, adapter_name: str = "default") -> DeltaModel:
    """Wrap ``model`` with a new adapter described by ``config`` (peft's ``get_peft_model``)."""
    return DeltaModel(model, config, adapter_name)


def _entries(state_dict: Mapping[str, torch.Tensor], state: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """``state``'s names (relative to the base model) -> their tensors in a ``DeltaModel.state_dict()``."""
    missing = [name for name in state if f"base_model.{name}" not in state_dict]
    if missing:
        raise ConfigError(
            f"state_dict lacks base_model.{missing[0]} (and {len(missing) - 1} more adapter keys); "
            f"pass a state dict of this model, e.g. from distributed.gather_adapter_state"
        )
    return {name: state_dict[f"base_model.{name}"] for name in state}


def _check_adapter_name(name: str) -> None:
    if not isinstance(name, str) or not name or "." in name or "/" in name:
        raise ConfigError(f"adapter name {name!r} must be a non-empty string without '.' or '/'")


def _left_padded(model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``generate``'s keyword arguments with right-padded prompt rows moved to left padding.

    A stable sort of each row by its mask (0 before 1) puts the padding first and keeps the tokens'
    order; the per-token inputs given with the ids move with them.
    """
    key = "input_ids" if "input_ids" in kwargs else "inputs"
    ids, mask = kwargs.get(key), kwargs.get("attention_mask")
    if not isinstance(ids, torch.Tensor) or not isinstance(mask, torch.Tensor) or mask.shape != ids.shape:
        return kwargs
    if getattr(model.config, "is_encoder_decoder", False) or bool(mask[:, -1].all()):
        return kwargs
    order = torch.sort(mask.long(), dim=1, stable=True).indices
    per_token = (key, "attention_mask", "token_type_ids", "position_ids")
    moved = {k: kwargs[k].gather(1, order) for k in per_token if getattr(kwargs.get(k), "shape", None) == mask.shape}
    return {**kwargs, **moved}


def _name_or_path(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "name_or_path", None) or None
