"""``DeltaTrainer``: transformers' ``Trainer``, checkpointing the adapter instead of the whole model."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from deltatune.errors import ConfigError
from deltatune.io import adapter_dir
from deltatune.model import DeltaModel
from deltatune.runtime.checkpoints import MarkCompleteCallback


class DeltaTrainer(Trainer):
    """A ``Trainer`` for a ``DeltaModel``: checkpoints hold peft-format adapter files (kilobytes to
    megabytes) next to the Trainer's optimizer, scheduler, RNG and data-position state, never a copy
    of the frozen base weights; resuming and ``load_best_model_at_end`` read the adapters back.
    Each finished checkpoint gets a completeness marker (``checkpoints.MarkCompleteCallback``).

    The model's training hooks run inside the loop, whatever the method: ``start_training`` with the run's
    number of optimizer steps, ``regularization_loss`` added to the loss of every optimizer step, and
    ``after_optimizer_step`` after each step, before the gradients are zeroed (``DeltaModel``'s hooks;
    AdaLoRA's regulariser and rank allocator are the ones that do something)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.add_callback(MarkCompleteCallback())
        self.add_callback(_TrainingHooks(self))

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """The stage's step (forward, loss, backward), then the adapters' regulariser, a 1/accumulation share
        of it per micro-batch (so once per optimizer step), backpropagated into the same gradients."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        with self.compute_loss_context_manager():
            regularizer = self._delta_model().regularization_loss()
        if regularizer is None:
            return loss
        regularizer = regularizer / self.current_gradient_accumulation_steps
        self.accelerator.backward(regularizer)
        return loss + regularizer.detach().to(loss.device)

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


class _TrainingHooks(TrainerCallback):
    """Calls the model's hooks at the run's start and after each optimizer step (before ``zero_grad``)."""

    def __init__(self, trainer: DeltaTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._delta_model().start_training(state.max_steps)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._delta_model().after_optimizer_step(state.global_step)
