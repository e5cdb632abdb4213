"""``DeltaTrainer``: transformers' ``Trainer``, checkpointing the adapter instead of the whole model."""

from __future__ import annotations

from transformers import Trainer

from ..model import DeltaModel


class DeltaTrainer(Trainer):
    """A ``Trainer`` for a ``DeltaModel``: checkpoints hold peft-format adapter files (kilobytes to
    megabytes), never a copy of the frozen base weights."""

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self.args.should_save:
            return
        output_dir = output_dir or self.args.output_dir
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not isinstance(model, DeltaModel):
            raise TypeError(f"DeltaTrainer trains a DeltaModel, got {type(model).__name__}")
        model.save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
