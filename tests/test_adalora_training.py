"""AdaLoRA's training terms against peft 0.21.2 (the oracle): the rank allocator and the orthogonality regulariser.

The same adapter (saved by peft, loaded here) trains the same steps on the same batch in both libraries: peft
through ``AdaLoraModel.update_and_allocate`` (its documented loop) and deltatune through ``DeltaModel``'s
training hooks, called by hand and by ``DeltaTrainer``. After every step the singular values, the masks and
the ``rank_pattern`` must agree, and so must the loss with its regulariser. The allocated adapter is then saved
with its pruned ranks and loads in the other library to the same logits, both ways.
"""

from __future__ import annotations

import peft
import pytest
import torch
from transformers import TrainingArguments

import deltatune
from deltatune import DeltaModel
from deltatune.errors import ConfigError
from deltatune.io import read_adapter_weights
from deltatune.train.trainer import DeltaTrainer
from deltatune.tuners.adalora.layer import AdaLoraLayer
from tiny_models import _seeded, perturb_trainable, tiny_llama, token_inputs

pytestmark = [pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")]

# 4 layers of rank 4 -> budget 16 falling to 8 from step 1 to step 6; steps 7 and 8 keep the final masks.
SCHEDULE = {"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 2, "deltaT": 1, "total_step": 8, "lora_alpha": 8}
OPTIONS = {"target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM", **SCHEDULE}  # peft regularises CAUSAL_LM
STEPS = 9
LR = 0.05


def batch() -> dict[str, torch.Tensor]:
    inputs = token_inputs(batch=2, length=7)
    return {**inputs, "labels": inputs["input_ids"].clone()}


def peft_and_delta(root) -> tuple[torch.nn.Module, DeltaModel]:
    """A peft AdaLoRA adapter away from its start (E != 0), and the same adapter loaded by deltatune."""
    peft_side = _seeded(lambda: peft.get_peft_model(tiny_llama(), peft.AdaLoraConfig(**OPTIONS)))
    perturb_trainable(peft_side)
    peft_side.save_pretrained(root)
    return peft_side.train(), DeltaModel.from_pretrained(tiny_llama(), root, is_trainable=True).train()


def delta_layers(model: DeltaModel) -> dict[str, AdaLoraLayer]:
    return {name: m for name, m in model.base_model.named_modules() if isinstance(m, AdaLoraLayer)}


def peft_pattern(pattern: dict | None) -> dict | None:
    """peft's in-memory rank_pattern keys carry the adapter name (``...lora_E.default``); its files do not."""
    return None if pattern is None else {key.removesuffix(".default"): value for key, value in pattern.items()}


def assert_same_singular_values(peft_side, delta_side) -> None:
    peft_e = {n.removeprefix("base_model.model."): p for n, p in peft_side.named_parameters() if ".lora_E." in n}
    delta_e = {f"{name}.lora_E.default": layer.lora_E["default"] for name, layer in delta_layers(delta_side).items()}
    assert sorted(peft_e) == sorted(delta_e)
    for key, value in peft_e.items():
        torch.testing.assert_close(delta_e[key], value, atol=1e-6, rtol=1e-5, msg=key)
        assert torch.equal(delta_e[key] == 0, value == 0), f"{key}: different triplets masked"


def test_allocator_and_regulariser_equal_peft_step_by_step(tmp_path):
    peft_side, delta_side = peft_and_delta(tmp_path)
    p_opt = torch.optim.SGD([p for p in peft_side.parameters() if p.requires_grad], lr=LR)
    d_opt = torch.optim.SGD([p for p in delta_side.parameters() if p.requires_grad], lr=LR)
    inputs = batch()
    delta_side.start_training(SCHEDULE["total_step"])
    patterns = []
    for step in range(STEPS):
        p_loss = peft_side(**inputs).loss  # peft adds orth_reg_weight · R to the loss in its forward
        lm_loss = delta_side(**inputs).loss
        regulariser = delta_side.regularization_loss()
        assert regulariser is not None and regulariser > 0
        d_loss = lm_loss + regulariser
        torch.testing.assert_close(d_loss, p_loss, atol=1e-5, rtol=1e-6)
        p_loss.backward()
        d_loss.backward()
        p_opt.step()
        d_opt.step()
        peft_side.base_model.update_and_allocate(step)
        delta_side.after_optimizer_step(step)
        p_opt.zero_grad()
        d_opt.zero_grad()
        assert_same_singular_values(peft_side, delta_side)
        pattern = delta_side.peft_config["default"].rank_pattern
        assert pattern == peft_pattern(peft_side.peft_config["default"].rank_pattern)
        patterns.append(pattern)
    assert patterns[:2] == [None, None]  # steps 0 and 1 <= tinit: no mask yet
    kept = [sum(sum(mask) for mask in pattern.values()) for pattern in patterns[2:]]
    assert kept[0] < 16 and kept[-1] == 8 and kept == sorted(kept, reverse=True), kept
    assert sorted(sum(mask) for mask in patterns[-1].values()) != [2, 2, 2, 2], "no rank moved between layers"


def test_delta_trainer_runs_the_allocator_as_peft_does(tmp_path):
    """DeltaTrainer (plain SGD, constant rate, no clipping) reaches the adapter of peft's documented loop, taking
    total_step from the run's step count where the config leaves it unset (and so recording it)."""
    steps = SCHEDULE["total_step"]
    peft_side, delta_side = peft_and_delta(tmp_path / "start")
    delta_side.peft_config["default"].total_step = None
    inputs = batch()
    optimizer = torch.optim.SGD([p for p in peft_side.parameters() if p.requires_grad], lr=LR)
    for step in range(steps):
        peft_side(**inputs).loss.backward()
        optimizer.step()
        peft_side.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=steps,
        per_device_train_batch_size=2,
        learning_rate=LR,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0,
        weight_decay=0.0,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    rows = [{key: value[i] for key, value in inputs.items()} for i in range(2)]
    DeltaTrainer(model=delta_side, args=args, train_dataset=rows).train()
    config = delta_side.peft_config["default"]
    assert config.total_step == steps
    assert_same_singular_values(peft_side, delta_side)
    assert config.rank_pattern == peft_pattern(peft_side.peft_config["default"].rank_pattern)
    delta_side.save_pretrained(tmp_path / "saved")
    assert deltatune.AdaLoraConfig.from_pretrained(tmp_path / "saved").total_step == steps


def train_both(peft_side, delta_side, steps: int) -> None:
    """``steps`` SGD steps on the same batch, each library with its own allocator."""
    inputs = batch()
    optimizers = [
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR) for model in (peft_side, delta_side)
    ]
    delta_side.start_training(SCHEDULE["total_step"])
    for step in range(steps):
        peft_side(**inputs).loss.backward()
        (delta_side(**inputs).loss + delta_side.regularization_loss()).backward()
        for optimizer in optimizers:
            optimizer.step()
        peft_side.base_model.update_and_allocate(step)
        delta_side.after_optimizer_step(step)
        for optimizer in optimizers:
            optimizer.zero_grad()


@pytest.mark.parametrize("direction", ["peft_to_deltatune", "deltatune_to_peft"])
def test_allocated_adapter_saves_pruned_ranks_and_loads_in_the_other_library(direction, tmp_path):
    peft_side, delta_side = peft_and_delta(tmp_path / "start")
    train_both(peft_side, delta_side, STEPS)
    ranks = {key: sum(mask) for key, mask in delta_side.peft_config["default"].rank_pattern.items()}
    saved = tmp_path / "allocated"
    (peft_side if direction == "peft_to_deltatune" else delta_side).save_pretrained(saved)
    shapes = {key: tuple(t.shape) for key, t in read_adapter_weights(saved).items()}
    for key, rank in ranks.items():
        module = f"base_model.model.{key.removesuffix('.lora_E')}"
        assert shapes[f"{module}.lora_E"] == (rank, 1) and shapes[f"{module}.lora_A"] == (rank, 32)
        assert shapes[f"{module}.lora_B"][1] == rank
    assert deltatune.AdaLoraConfig.from_pretrained(saved).rank_pattern == delta_side.peft_config["default"].rank_pattern
    inputs = token_inputs(batch=2, length=7)  # no labels: peft's AdaLoRA, loaded for inference, fails on a loss
    with torch.no_grad():
        expected = delta_side.eval()(**inputs).logits
        torch.testing.assert_close(peft_side.eval()(**inputs).logits, expected, atol=1e-5, rtol=0)
        loaded_here = DeltaModel.from_pretrained(tiny_llama(), saved).eval()
        loaded_in_peft = peft.PeftModel.from_pretrained(tiny_llama(), saved).eval()
        assert {name: layer.r["default"] for name, layer in delta_layers(loaded_here).items()} == {
            key.removesuffix(".lora_E"): rank for key, rank in ranks.items()
        }
        torch.testing.assert_close(loaded_here(**inputs).logits, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(loaded_in_peft(**inputs).logits, expected, atol=1e-5, rtol=0)
        loaded_here.merge_adapter()
        torch.testing.assert_close(loaded_here(**inputs).logits, expected, atol=1e-4, rtol=0)


def test_a_pruned_adapter_is_not_trained_again_and_two_trainable_adapters_are_refused(tmp_path):
    peft_side, delta_side = peft_and_delta(tmp_path / "start")
    train_both(peft_side, delta_side, STEPS)
    delta_side.save_pretrained(tmp_path / "allocated")
    loaded = DeltaModel.from_pretrained(tiny_llama(), tmp_path / "allocated", is_trainable=True)
    with pytest.raises(ConfigError, match="was loaded with pruned ranks"):
        loaded.start_training(8)
    model = deltatune.get_delta_model(tiny_llama(), deltatune.AdaLoraConfig(**OPTIONS))
    model.add_adapter("other", deltatune.AdaLoraConfig(**OPTIONS))
    model.set_adapter(["default", "other"])
    with pytest.raises(ConfigError, match="one adapter at a time"):
        model.regularization_loss()


def test_total_step_is_needed_and_the_schedule_must_fit(tmp_path):
    model = deltatune.get_delta_model(tiny_llama(), deltatune.AdaLoraConfig(**{**OPTIONS, "total_step": None}))
    (model(**batch()).loss + model.regularization_loss()).backward()
    with pytest.raises(ConfigError, match="needs total_step"):
        model.after_optimizer_step(0)
    with pytest.raises(ConfigError, match="leave no budgeting phase"):
        model.start_training(3)  # tinit 1 >= 3 - tfinal 2
    model.start_training(12)
    assert model.peft_config["default"].total_step == 12
    with pytest.raises(ConfigError, match="leave no budgeting phase"):
        deltatune.AdaLoraConfig(**{**OPTIONS, "total_step": 3})


def test_tiny_llama_trains_with_the_defaults_and_round_trips(tmp_path):
    """From peft's start (E = 0: the base model), AdamW steps with the regulariser and allocator lower the loss;
    the saved (pruned) adapter reloads to identical logits."""
    config = deltatune.AdaLoraConfig(target_modules="all-linear", init_r=4, target_r=2, total_step=12, lora_alpha=8)
    model = deltatune.get_delta_model(tiny_llama(), config).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    inputs = batch()
    model.start_training(12)
    losses = []
    for step in range(12):
        loss = model(**inputs).loss
        losses.append(loss.item())
        (loss + model.regularization_loss()).backward()
        optimizer.step()
        model.after_optimizer_step(step)
        optimizer.zero_grad()
    assert losses[-1] < losses[0] - 0.1, losses
    assert sum(sum(mask) for mask in config.rank_pattern.values()) == 2 * len(config.rank_pattern)
    model.save_pretrained(tmp_path)
    model.eval()
    loaded = DeltaModel.from_pretrained(tiny_llama(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, atol=1e-6, rtol=0)


def test_a_pruned_checkpoint_loads_back_into_the_adapter_that_wrote_it(tmp_path):
    """Resuming a run, or reloading its best checkpoint, puts a file pruned by its rank_pattern back into the
    live adapter's full-rank layers: the kept triplets in place, the pruned ones zero and still masked."""
    peft_side, delta_side = peft_and_delta(tmp_path / "start")
    train_both(peft_side, delta_side, 4)  # masks from step 2 on
    pattern = dict(delta_side.peft_config["default"].rank_pattern)
    assert not all(all(mask) for mask in pattern.values())
    delta_side.save_pretrained(tmp_path / "checkpoint")
    inputs = token_inputs(batch=2, length=7)
    with torch.no_grad():
        expected = delta_side.eval()(**inputs).logits
    perturb_trainable(delta_side)  # the run went on
    delta_side.peft_config["default"].rank_pattern = None
    delta_side.load_adapter_weights(tmp_path / "checkpoint")
    assert delta_side.peft_config["default"].rank_pattern == pattern
    for name, layer in delta_layers(delta_side).items():
        assert layer.r["default"] == 4
        pruned = ~torch.tensor(pattern[f"{name}.lora_E"])
        assert not layer.lora_E["default"][pruned].any()
    with torch.no_grad():
        torch.testing.assert_close(delta_side(**inputs).logits, expected, atol=1e-6, rtol=0)
    delta_side.save_pretrained(tmp_path / "again")
    first, again = read_adapter_weights(tmp_path / "checkpoint"), read_adapter_weights(tmp_path / "again")
    assert first.keys() == again.keys() and all(torch.equal(first[key], again[key]) for key in first)
