"""Checks the adapter families' tests share: merging as peft does (every family), and for IA3 and VeRA a peft row
both ways and merged, two adapters both ways, and the adapter lifecycle (add, switch, disable, merge/unmerge,
delete) on one model.

``method`` is the config class name both libraries export; ``random_init`` the field that starts an adapter
away from the identity (IA3's ``init_ia3_weights=False``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path

import peft
import torch
from torch import nn

import deltatune
from deltatune import DeltaModel
from test_lora_conv import MERGE_ATOL, assert_same_model, first, save_and_load
from tiny_models import _seeded, perturb_trainable


def row_matches_peft_and_merges_alike(
    make: Callable[[], nn.Module],
    x: torch.Tensor,
    options: dict,
    direction: str,
    root: Path,
    method: str,
    random_init: dict,
) -> tuple[nn.Module, DeltaModel]:
    """Saved by one library, loaded by the other: same tensors, outputs and gradients; then both merge and the
    merged outputs agree with each other and with the unmerged one (1e-4). Returns (peft, deltatune) merged."""
    peft_side, delta_side = save_and_load(make, options, direction, root, method=method, random_init=random_init)
    assert_same_model(peft_side, delta_side, make, (x,))
    merges_as_peft_does(peft_side, delta_side, x)
    return peft_side, delta_side


def merges_as_peft_does(
    peft_side: nn.Module, delta_side: DeltaModel, x: torch.Tensor, atol: float = MERGE_ATOL, rtol: float = 0.0
) -> None:
    """Both sides merge their adapters; deltatune's merged output is peft's merged one and its own unmerged one
    (within ``atol`` / ``rtol``)."""
    with torch.no_grad():
        unmerged = first(delta_side(x))
        peft_side.merge_adapter()
        delta_side.merge_adapter()
        merged = first(delta_side(x))
        torch.testing.assert_close(merged, first(peft_side(x)), atol=atol, rtol=rtol)
        torch.testing.assert_close(merged, unmerged, atol=atol, rtol=rtol)


def two_adapters_match_peft(
    make: Callable[[], nn.Module],
    x: torch.Tensor,
    first_options: dict,
    second_options: dict,
    direction: str,
    root: Path,
    method: str,
) -> None:
    """Adapters "default" and "other" (peft's multi-adapter rows) saved by one library in one folder, loaded
    by the other: each adapter, set active, gives the same output on both sides, and the two differ."""
    configs = [(name, options) for name, options in (("default", first_options), ("other", second_options))]
    if direction == "peft_to_deltatune":
        saver = _seeded(lambda: peft.get_peft_model(make(), getattr(peft, method)(**first_options)))
        saver.add_adapter("other", getattr(peft, method)(**second_options))
    else:
        saver = _seeded(lambda: deltatune.get_delta_model(make(), getattr(deltatune, method)(**first_options)))
        saver.add_adapter("other", getattr(deltatune, method)(**second_options))
    for name, _ in configs:
        saver.set_adapter(name)
        perturb_trainable(saver, seed=len(name))
    saver.save_pretrained(root)
    if direction == "peft_to_deltatune":
        peft_side, delta_side = saver, DeltaModel.from_pretrained(make(), root)
        delta_side.load_adapter(root / "other", "other")
    else:
        delta_side, peft_side = saver, peft.PeftModel.from_pretrained(make(), root)
        peft_side.load_adapter(root / "other", "other")
    outputs = []
    with torch.no_grad():
        for name, _ in configs:
            peft_side.set_adapter(name)
            delta_side.set_adapter(name)
            outputs.append(first(delta_side.eval()(x)))
            torch.testing.assert_close(outputs[-1], first(peft_side.eval()(x)), atol=1e-5, rtol=0)
    assert (outputs[0] - outputs[1]).abs().max() > 1e-3, "the two adapters give one output; the check is void"


def lifecycle_keeps_the_base(model: DeltaModel, make: Callable[[], nn.Module], x: torch.Tensor, config) -> None:
    """On a model with a perturbed adapter "default": a second adapter (``config``) only acts once set
    active; disable_adapter gives the base output; merge keeps the output and unmerge restores the base
    weights; delete_adapter of the active one falls back to the other; merge_and_unload leaves a plain
    module with the merged output."""
    with torch.no_grad():
        base = first(make()(x))
        before = first(model(x))
        assert (before - base).abs().max() > 1e-3
        with torch.random.fork_rng(devices=[]):  # a random start is drawn from the global generator
            torch.manual_seed(0)
            model.add_adapter("other", config)
        torch.testing.assert_close(first(model(x)), before, atol=0, rtol=0)  # added, not active
        model.set_adapter("other")
        perturb_trainable(model, seed=3)
        other = first(model(x))
        assert (other - before).abs().max() > 1e-3
        with model.disable_adapter():
            torch.testing.assert_close(first(model(x)), base, atol=1e-6, rtol=0)
        weights = {name: t.clone() for name, t in make().state_dict().items()}
        model.merge_adapter(["default", "other"])
        assert model.merged_adapters == ["default", "other"]
        model.set_adapter(["default", "other"])
        both = first(model(x))
        model.unmerge_adapter()
        torch.testing.assert_close(first(model(x)), both, atol=MERGE_ATOL, rtol=0)  # unmerged, both active
        unwrapped = {n.replace(".base_layer", ""): t for n, t in model.base_model.state_dict().items()}
        for name, tensor in weights.items():
            torch.testing.assert_close(unwrapped[name], tensor, atol=1e-6, rtol=1e-6, msg=name)
        model.set_adapter("other")
        model.delete_adapter("other")
        assert model.active_adapters == ["default"]
        torch.testing.assert_close(first(model(x)), before, atol=1e-6, rtol=0)
        plain = model.merge_and_unload()
        assert not any(getattr(m, "is_delta_layer", False) for m in plain.modules())
        torch.testing.assert_close(first(plain(x)), before, atol=MERGE_ATOL, rtol=0)


DOCS = Path(__file__).resolve().parent.parent / "docs"
PEFT_BOOKKEEPING = {"peft_type", "auto_mapping", "peft_version"}  # written by peft itself, not options


def config_and_doc_have_peft_s_fields(method: str, doc: str) -> None:
    """deltatune's config class has exactly peft's fields (with peft's defaults), and ``docs/<doc>``'s
    "Config fields" table has a row for each of the method's own."""
    peft_fields = {f.name: f for f in dataclasses.fields(getattr(peft, method)) if f.init}
    ours = {f.name: f for f in dataclasses.fields(getattr(deltatune, method))}
    assert set(ours) == set(peft_fields) - PEFT_BOOKKEEPING
    for name, field in ours.items():
        if field.default is not dataclasses.MISSING:
            assert field.default == peft_fields[name].default, name
    section = (DOCS / doc).read_text(encoding="utf-8").split("## Config fields", 1)[1].split("\n## ", 1)[0]
    rows = {
        match for line in section.splitlines() if line.startswith("| `") for match in re.findall(r"^\| `(\w+)`", line)
    }
    own = set(ours) - {f.name for f in dataclasses.fields(deltatune.DeltaConfig)}
    assert rows == own, sorted(rows ^ own)
