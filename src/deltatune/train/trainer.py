"""``DeltaTrainer``: transformers' ``Trainer``, checkpointing the adapter instead of the whole model."""

from __future__ import annotations

from pathlib import Path

from transformers import Trainer

from deltatune.errors import ConfigError
from deltatune.io import adapter_dir
from deltatune.model import DeltaModel
from deltatune.runtime.checkpoints import MarkCompleteCallback


class DeltaTrainer(Trainer):
    """A ``Trainer`` for a ``DeltaModel``: checkpoints hold peft-format adapter files (kilobytes to
    megabytes) next to the Trainer's optimizer, scheduler, RNG and data-position state, never a copy
    of the frozen base weights; resuming and ``load_best_model_at_end`` read the adapters back.
    Each finished checkpoint gets a completeness marker (``checkpoints.MarkCompleteCallback``)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.add_callback(MarkCompleteCallback())

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write the adapters (under FSDP from ``state_dict``, the full tensors transformers gathered)."""
        if not self.args.should_save:
            return
        output_dir = output_dir or self.args.output_dir
        self._delta_model().save_pretrained(output_dir, state_dict=state_dict)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        self._load_adapters(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        self._load_adapters(self.state.best_model_checkpoint)

    def _load_adapters(self, checkpoint: str) -> None:
        """Every adapter of the model, from its peft-format files in ``checkpoint``."""
        model = self._delta_model()
        for name in model.peft_config:
            path = adapter_dir(checkpoint, name)
            if not (Path(path) / "adapter_config.json").is_file():
                raise ConfigError(f"checkpoint {checkpoint} has no adapter {name!r} ({path}/adapter_config.json)")
            model.load_adapter_weights(path, name)

    def _delta_model(self) -> DeltaModel:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not isinstance(model, DeltaModel):
            raise TypeError(f"DeltaTrainer trains a DeltaModel, got {type(model).__name__}")
        return model
