"""AdaLoRA's rank allocator (Zhang et al., 2023, arXiv:2303.10512, section 3), run after every optimizer step.

For every factor entry w with gradient g:  I = |w · g|,  Ī ← β1 Ī + (1 − β1) I,  Ū ← β2 Ū + (1 − β2) |I − Ī|,
and its score is Ī · Ū. Triplet i of a layer (column i of B, E[i], row i of A) scores
S_i = score(E_i) + mean_j score(A_ij) + mean_k score(B_ki). The budget (total rank over all layers) stays at
n · init_r for ``tinit`` steps, then falls on a cubic curve to n · target_r at step ``total_step − tfinal``;
each ``deltaT`` steps the E of every triplet scoring at or below the (initial − budget)-th smallest score is
set to zero. At step ``total_step − tfinal`` the final masks are taken and kept for the remaining steps.
The numbers, steps and ties follow peft 0.21.2's ``RankAllocator`` and ``AdaLoraModel.update_and_allocate``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from deltatune.errors import ConfigError
from deltatune.tuners.adalora.config import RANK_PATTERN_SUFFIX, AdaLoraConfig
from deltatune.tuners.adalora.layer import AdaLoraLayer

Layers = Sequence[tuple[str, AdaLoraLayer]]


def allocate(layers: Layers, name: str, config: AdaLoraConfig, step: int) -> None:
    """One step of the allocator for adapter ``name`` after optimizer step ``step`` (0 = the first).

    Updates the scores (before the final step), masks E by the budget (writing ``config.rank_pattern``
    and each layer's ``kept``), or, after the final step, keeps the final masks applied.
    """
    if config.total_step is None:
        raise ConfigError(
            "AdaLoRA needs total_step (the run's number of optimizer steps) to schedule its budget; set "
            "AdaLoraConfig(total_step=...) or train with deltatune's trainer, which sets it"
        )
    final = config.total_step - config.tfinal
    initial = sum(layer.r[name] for _, layer in layers)
    target = config.target_r * len(layers)
    if step < final:
        update_sensitivity(layers, name, config.beta1, config.beta2)
        budget, due = budget_schedule(config, step, initial, target)
        if due:
            config.rank_pattern = mask_to_budget(layers, name, budget, initial)
    elif step == final:
        config.rank_pattern = mask_to_budget(layers, name, target, initial)
        for _, layer in layers:
            layer.sensitivity.pop(name, None)
    else:
        with torch.no_grad():
            for _, layer in layers:
                if name in layer.kept:
                    layer.lora_E[name].masked_fill_(~layer.kept[name].view(-1, 1), 0.0)


def budget_schedule(config: AdaLoraConfig, step: int, initial: int, target: int) -> tuple[int, bool]:
    """(total rank allowed at ``step``, whether to mask at this step)."""
    if step <= config.tinit:
        return initial, False
    if step > config.total_step - config.tfinal:
        return target, True
    remaining = 1 - (step - config.tinit) / (config.total_step - config.tfinal - config.tinit)
    return int((initial - target) * remaining**3 + target), step % config.deltaT == 0


def update_sensitivity(layers: Layers, name: str, beta1: float, beta2: float) -> None:
    """Fold this step's |w · g| of A, B and E into each layer's smoothed sensitivity and uncertainty."""
    with torch.no_grad():
        for layer_name, layer in layers:
            state = layer.sensitivity.setdefault(name, {})
            for key, param in (("A", layer.lora_A[name]), ("B", layer.lora_B[name]), ("E", layer.lora_E[name])):
                if param.grad is None:
                    raise ConfigError(
                        f"AdaLoRA's allocator found no gradient on {layer_name}.lora_{key}.{name}; call it after "
                        f"backward and before the gradients are zeroed"
                    )
                importance = (param * param.grad).abs()
                smoothed, uncertainty = state.get(key, (torch.zeros_like(param), torch.zeros_like(param)))
                smoothed = beta1 * smoothed + (1 - beta1) * importance
                uncertainty = beta2 * uncertainty + (1 - beta2) * (importance - smoothed).abs()
                state[key] = (smoothed, uncertainty)


def triplet_scores(layer: AdaLoraLayer, name: str) -> torch.Tensor:
    """S_i of each of the layer's triplets, [r]."""
    score = {key: smoothed * uncertainty for key, (smoothed, uncertainty) in layer.sensitivity[name].items()}
    factors = torch.cat([score["A"].mean(dim=1, keepdim=True), score["B"].mean(dim=0).view(-1, 1)], dim=1)
    return score["E"].view(-1) + factors.sum(dim=1)


def mask_to_budget(layers: Layers, name: str, budget: int, initial: int) -> dict[str, list[bool]]:
    """Zero E of every triplet scoring at or below the (initial − budget)-th smallest score; the kept masks by
    module name + ".lora_E". A budget at or above the initial rank (target_r >= init_r) prunes nothing."""
    scores = {layer_name: triplet_scores(layer, name) for layer_name, layer in layers}
    pruned = initial - budget
    threshold = torch.kthvalue(torch.cat(list(scores.values())), k=pruned)[0].item() if pruned > 0 else None
    pattern = {}
    with torch.no_grad():
        for layer_name, layer in layers:
            score = scores[layer_name]
            kept = torch.ones_like(score, dtype=torch.bool) if threshold is None else ~(score <= threshold)
            layer.lora_E[name].masked_fill_(~kept.view(-1, 1), 0.0)
            layer.kept[name] = kept
            pattern[layer_name + RANK_PATTERN_SUFFIX] = kept.tolist()
    return pattern
