"""DeltaModel semantics on tiny llama / GPT-2: counts, init, merging, switching, loading and atomic saves."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

import deltatune.io
from deltatune import (
    AdapterLoadError,
    ConfigError,
    DeltaModel,
    LoraConfig,
    MergeError,
    get_delta_model,
)
from deltatune.tuners.lora.layer import LoraLayer
from tiny_models import build, token_inputs

INPUTS = token_inputs()
# Square (d x d) projections of each tiny model: q_proj / o_proj of llama, attn.c_proj of GPT-2.
SQUARE_TARGETS = {"llama": ["q_proj", "o_proj"], "gpt2": ["attn.c_proj"]}
D_MODEL = 32
N_LAYERS = 2


@pytest.fixture(autouse=True, scope="module")
def single_thread() -> Iterator[None]:
    """Tiny matrices: on a shared 2-core CPU a second thread only adds contention (10x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**INPUTS).logits


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every base weight by its name in the plain model (LoRA layers' base_layer prefixes dropped)."""
    state = model.state_dict()
    return {name.replace(".base_layer", ""): p.detach().clone() for name, p in state.items() if "lora_" not in name}


def assert_identical(before: dict[str, torch.Tensor], model: nn.Module) -> None:
    after = weights(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(before[name], after[name]) for name in before), "a base weight changed"


def lora_model(kind: str = "llama", targets="all-linear", seed: int = 0, **kwargs) -> DeltaModel:
    """A tiny model with one adapter whose B is random (init_lora_weights=False), so it changes the logits."""
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **kwargs)
    return get_delta_model(build(kind), config)


def lora_layers(model: nn.Module) -> list[LoraLayer]:
    return [module for module in model.modules() if isinstance(module, LoraLayer)]


# -- counts and init -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(SQUARE_TARGETS))
@pytest.mark.parametrize("r", [1, 4, 8])
def test_trainable_count_is_the_lora_paper_formula(kind: str, r: int, capsys: pytest.CaptureFixture) -> None:
    targets = SQUARE_TARGETS[kind]
    model = get_delta_model(build(kind), LoraConfig(r=r, target_modules=targets))
    adapted = len(lora_layers(model))
    assert adapted == len(targets) * N_LAYERS
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == 2 * adapted * D_MODEL * r
    assert total == sum(p.numel() for p in build(kind).parameters()) + trainable

    model.print_trainable_parameters()
    ours = capsys.readouterr().out
    peft.get_peft_model(build(kind), peft.LoraConfig(r=r, target_modules=targets)).print_trainable_parameters()
    assert ours == capsys.readouterr().out
    assert ours.startswith(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: ")


def test_print_matches_peft_with_modules_to_save(capsys: pytest.CaptureFixture) -> None:
    kwargs = {"r": 2, "target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}
    get_delta_model(build("llama"), LoraConfig(**kwargs)).print_trainable_parameters()
    ours = capsys.readouterr().out
    peft.get_peft_model(build("llama"), peft.LoraConfig(**kwargs)).print_trainable_parameters()
    assert ours == capsys.readouterr().out


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("init", [True, "gaussian"])
def test_fresh_adapter_gives_exactly_the_base_logits(kind: str, init) -> None:
    reference = logits(build(kind))
    model = get_delta_model(build(kind), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=init))
    assert torch.equal(logits(model), reference)
    assert all(torch.count_nonzero(layer.lora_B["default"].weight) == 0 for layer in lora_layers(model))


# -- merging ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merge_unmerge_round_trip(kind: str) -> None:
    model = lora_model(kind)
    original = weights(model)
    reference, unmerged = logits(build(kind)), logits(model)
    assert not torch.allclose(unmerged, reference, atol=1e-3)

    model.merge_adapter()
    assert model.merged_adapters == ["default"]
    assert torch.allclose(logits(model), unmerged, atol=1e-5)
    changed = weights(model)
    assert any(not torch.equal(changed[name], original[name]) for name in original)

    model.unmerge_adapter()
    assert model.merged_adapters == []
    for name, tensor in weights(model).items():
        torch.testing.assert_close(tensor, original[name], atol=1e-6, rtol=0)
    assert torch.allclose(logits(model), unmerged, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merge_and_unload_returns_a_plain_transformers_model(kind: str, tmp_path: Path) -> None:
    model = lora_model(kind, modules_to_save=["lm_head"] if kind == "llama" else None)
    expected = logits(model)
    plain = model.merge_and_unload()
    assert type(plain) is type(build(kind))
    modules = [(name, type(module).__module__) for name, module in plain.named_modules()]
    assert [(name, where) for name, where in modules if not where.startswith(("torch.", "transformers."))] == []
    for name, _ in plain.named_parameters():
        assert not any(part in name for part in ("lora_", "base_layer", "modules_to_save", "original_module")), name
    assert torch.allclose(logits(plain), expected, atol=1e-5)

    plain.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.allclose(logits(reloaded), expected, atol=1e-5)


def test_unload_returns_the_original_weights() -> None:
    base = build("llama")
    original = weights(base)
    model = lora_model("llama", modules_to_save=["lm_head"])
    model.base_model.lm_head.modules_to_save["default"].weight.data.add_(1.0)
    plain = model.unload()
    assert not lora_layers(plain) and type(plain.lm_head) is nn.Linear
    assert_identical(original, plain)
    assert torch.equal(logits(plain), logits(base))


@pytest.mark.parametrize("poisoned_layer", [0, -1], ids=["first", "last"])
def test_safe_merge_refuses_nan_and_changes_nothing(poisoned_layer: int) -> None:
    model = lora_model("llama", targets=["q_proj", "v_proj", "down_proj"])
    layers = lora_layers(model)
    assert len(layers) == 3 * N_LAYERS
    layers[poisoned_layer].lora_B["default"].weight.data[0, 0] = float("nan")
    before = weights(model)
    with pytest.raises(MergeError, match="NaN") as info:
        model.merge_adapter(safe_merge=True)
    assert "\n" not in str(info.value)
    assert_identical(before, model)
    assert model.merged_adapters == []
    with pytest.raises(MergeError):
        model.merge_and_unload(safe_merge=True)
    assert_identical(before, model)
    assert len(lora_layers(model)) == 3 * N_LAYERS and model.peft_config


def test_safe_merge_of_two_adapters_refuses_when_only_the_second_is_bad() -> None:
    model = lora_model("llama", targets=["q_proj"])
    model.add_adapter("bad", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    lora_layers(model)[-1].lora_B["bad"].weight.data.fill_(float("inf"))
    before = weights(model)
    with pytest.raises(MergeError, match="'bad'"):
        model.merge_adapter(["default", "bad"], safe_merge=True)
    assert_identical(before, model)
    assert model.merged_adapters == []


# -- disable_adapter -------------------------------------------------------------------------


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_disable_adapter_gives_base_logits_and_restores(merged: bool) -> None:
    reference = logits(build("llama"))
    model = lora_model("llama")
    adapted = logits(model)
    if merged:
        model.merge_adapter()
    with model.disable_adapter():
        assert torch.allclose(logits(model), reference, atol=1e-5)
        assert model.merged_adapters == []
    assert model.merged_adapters == (["default"] if merged else [])
    assert torch.allclose(logits(model), adapted, atol=1e-5)

    with pytest.raises(RuntimeError, match="boom"), model.disable_adapter():
        raise RuntimeError("boom")
    assert model.merged_adapters == (["default"] if merged else [])
    assert torch.allclose(logits(model), adapted, atol=1e-5)


def test_disable_adapter_also_bypasses_modules_to_save() -> None:
    reference = logits(build("llama"))
    model = lora_model("llama", targets=["q_proj"], modules_to_save=["lm_head"])
    model.base_model.lm_head.modules_to_save["default"].weight.data.mul_(2.0)
    with model.disable_adapter():
        assert torch.equal(logits(model), reference)
    assert not torch.allclose(logits(model), reference, atol=1e-3)


# -- several adapters ------------------------------------------------------------------------


@pytest.fixture
def two_adapters(tmp_path: Path) -> tuple[DeltaModel, dict[str, torch.Tensor]]:
    """A llama with adapters "default" (all-linear) and "b" (q/v only), and the logits of each alone."""
    model = lora_model("llama")
    alone = {"base": logits(build("llama")), "default": logits(model)}
    torch.manual_seed(1)
    model.add_adapter("b", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    assert model.active_adapters == ["default"], "a new adapter must not become active"
    model.save_pretrained(tmp_path, selected_adapters=["b"])
    alone["b"] = logits(DeltaModel.from_pretrained(build("llama"), tmp_path / "b", adapter_name="b"))
    return model, alone


def test_set_adapter_switches_between_each_adapters_own_logits(two_adapters) -> None:
    model, alone = two_adapters
    assert torch.equal(logits(model), alone["default"])
    model.set_adapter("b")
    assert model.active_adapter == "b"
    assert torch.equal(logits(model), alone["b"])
    assert not torch.allclose(alone["b"], alone["default"], atol=1e-3)
    assert not torch.allclose(alone["b"], alone["base"], atol=1e-3)
    model.set_adapter("default")
    assert torch.equal(logits(model), alone["default"])
    with pytest.raises(ConfigError, match="no adapter named 'c'"):
        model.set_adapter("c")
    assert model.active_adapters == ["default"]


def test_set_adapter_with_a_list_sums_both_deltas(two_adapters) -> None:
    model, _ = two_adapters
    model.set_adapter(["default", "b"])
    q_proj = model.base_model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, D_MODEL)
    with torch.no_grad():
        expected = q_proj.base_layer(x) + q_proj.lora_output(x, "default") + q_proj.lora_output(x, "b")
        assert torch.allclose(q_proj(x), expected, atol=1e-6)
    both = logits(model)
    model.merge_adapter()
    assert sorted(model.merged_adapters) == ["b", "default"]
    assert torch.allclose(logits(model), both, atol=1e-5)


def test_only_the_active_adapters_parameters_train(two_adapters) -> None:
    model, _ = two_adapters
    for active in (["b"], ["default"], ["default", "b"]):
        model.set_adapter(active)
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        names = [name for name, _ in model.named_parameters() if "lora_" in name]
        expected = {name for name in names if any(f".{adapter}." in name for adapter in active)}
        assert trainable == expected and trainable


def test_delete_adapter_falls_back_and_the_last_one_leaves_plain_modules(two_adapters) -> None:
    model, alone = two_adapters
    model.set_adapter("b")
    model.delete_adapter("b")
    assert model.active_adapters == ["default"] and list(model.peft_config) == ["default"]
    assert torch.equal(logits(model), alone["default"])
    assert not any("lora_A.b" in name for name, _ in model.named_parameters())
    model.delete_adapter("default")
    assert model.active_adapters == [] and not model.peft_config
    assert not lora_layers(model)
    assert all(type(m).__module__.startswith(("torch", "transformers")) for m in model.base_model.modules())
    assert torch.equal(logits(model), alone["base"])


def test_merged_adapter_cannot_be_deleted_or_joined_and_nothing_changes(two_adapters) -> None:
    model, alone = two_adapters
    model.merge_adapter()
    merged = weights(model)
    with pytest.raises(MergeError, match="unmerge"):
        model.delete_adapter("default")
    with pytest.raises(ConfigError, match="unmerge"):
        model.add_adapter("c", LoraConfig(target_modules=["q_proj"]))
    assert list(model.peft_config) == ["default", "b"] and model.active_adapters == ["default"]
    assert model.merged_adapters == ["default"]
    assert_identical(merged, model)
    model.unmerge_adapter()
    model.delete_adapter("default")
    assert list(model.peft_config) == ["b"] and model.active_adapters == ["b"]
    assert torch.allclose(logits(model), alone["b"], atol=1e-5)  # merge + unmerge rounds the base weights


def test_load_adapter_keeps_the_active_adapter(two_adapters, tmp_path: Path) -> None:
    model, alone = two_adapters
    model.load_adapter(tmp_path / "b", "c")
    assert model.active_adapters == ["default"]
    assert torch.equal(logits(model), alone["default"])
    assert not any(".c." in name for name, p in model.named_parameters() if p.requires_grad)
    model.set_adapter("c")
    assert torch.equal(logits(model), alone["b"])


@pytest.mark.parametrize("name", ["a.b", "x/y", ""])
def test_bad_adapter_names_are_rejected(name: str) -> None:
    base = build("llama")
    with pytest.raises(ConfigError, match="adapter name"):
        get_delta_model(base, LoraConfig(target_modules=["q_proj"]), adapter_name=name)
    assert not lora_layers(base)
    model = get_delta_model(base, LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="adapter name"):
        model.add_adapter(name, LoraConfig(target_modules=["q_proj"]))
    assert list(model.peft_config) == ["default"]


# -- loading ---------------------------------------------------------------------------------


@pytest.fixture
def saved_adapter(tmp_path: Path) -> tuple[Path, torch.Tensor]:
    """An all-linear r=4 llama adapter saved in tmp_path/"adapter", and the logits it gives."""
    model = lora_model("llama")
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", logits(model)


@pytest.mark.parametrize("is_trainable", [False, True])
def test_from_pretrained_reproduces_logits_and_freezes_unless_trainable(saved_adapter, is_trainable: bool) -> None:
    path, expected = saved_adapter
    model = DeltaModel.from_pretrained(build("llama"), path, is_trainable=is_trainable)
    assert torch.equal(logits(model), expected)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    if is_trainable:
        assert trainable and all("lora_" in name for name in trainable)
    else:
        assert trainable == []


def _rewrite_weights(path: Path, change) -> str:
    """Apply ``change`` to the adapter's tensors in place; return the first key (the one changed)."""
    file = path / deltatune.io.WEIGHTS_NAME
    tensors = load_file(file)
    key = sorted(tensors)[0]
    change(tensors, key)
    save_file(tensors, file)
    return key


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (
            lambda t, k: t.__setitem__(k, torch.zeros(3, *t[k].shape[1:])),
            r"has shape \(3, (\d+)\) but the model expects \(4, \1\)",
        ),
        (lambda t, k: t.__setitem__(k, t[k].T.contiguous()), r"has shape \((\d+), 4\) but the model expects \(4, \1\)"),
        (lambda t, k: t.__setitem__(k + ".extra", t[k].clone()), r"\.extra has no matching parameter"),
        (lambda t, k: t.pop(k), "the file lacks"),
        (lambda t, k: t.__setitem__(k, t[k].to(torch.int32)), "dtype torch.int32"),
    ],
    ids=["wrong-rank", "transposed", "extra-key", "missing-key", "int-dtype"],
)
def test_bad_adapter_file_is_refused_and_leaves_the_model_unchanged(saved_adapter, change, match: str) -> None:
    path, _ = saved_adapter
    key = _rewrite_weights(path, change)
    base = build("llama")
    before = weights(base)
    with pytest.raises(AdapterLoadError, match=match) as info:
        DeltaModel.from_pretrained(base, path)
    assert key in str(info.value) and "\n" not in str(info.value)
    assert not lora_layers(base)
    assert_identical(before, base)

    model = lora_model("llama", targets=["q_proj"])
    reference, trained_before = logits(model), weights(model)
    with pytest.raises(AdapterLoadError, match=match):
        model.load_adapter(path, "other")
    assert list(model.peft_config) == ["default"] and model.active_adapters == ["default"]
    assert [layer.adapter_names for layer in lora_layers(model)] == [["default"]] * N_LAYERS
    assert_identical(trained_before, model)
    assert torch.equal(logits(model), reference)


def test_pickle_adapter_is_refused_unless_allowed(saved_adapter) -> None:
    path, expected = saved_adapter
    tensors = load_file(path / deltatune.io.WEIGHTS_NAME)
    (path / deltatune.io.WEIGHTS_NAME).unlink()
    torch.save(tensors, path / deltatune.io.PICKLE_WEIGHTS_NAME)
    base = build("llama")
    with pytest.raises(AdapterLoadError, match="allow_pickle=True"):
        DeltaModel.from_pretrained(base, path)
    assert not lora_layers(base)
    assert torch.equal(logits(DeltaModel.from_pretrained(base, path, allow_pickle=True)), expected)


# -- atomic save -----------------------------------------------------------------------------


def _adapter_files(path: Path) -> dict[str, bytes]:
    return {file.name: file.read_bytes() for file in sorted(path.iterdir())}


def _half_write_then(action):
    """A stand-in for safetensors' save_file that writes half the real bytes, then calls ``action``."""

    def torn_save_file(tensors, filename, metadata=None):
        save_file(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        action()

    return torn_save_file


def test_crash_during_save_keeps_the_previous_adapter(saved_adapter, monkeypatch: pytest.MonkeyPatch) -> None:
    path, expected = saved_adapter
    good = _adapter_files(path)
    assert set(good) == {"adapter_config.json", "adapter_model.safetensors"}

    def crash() -> None:
        raise OSError("disk full")

    monkeypatch.setattr(deltatune.io, "save_file", _half_write_then(crash))
    changed = lora_model("llama", seed=5, targets=["q_proj"])  # another config, too
    with pytest.raises(OSError, match="disk full"):
        changed.save_pretrained(path)
    assert _adapter_files(path) == good  # no temp file left, old files untouched
    assert torch.equal(logits(DeltaModel.from_pretrained(build("llama"), path)), expected)


@pytest.mark.subprocess
def test_sigkill_during_save_keeps_the_previous_adapter(saved_adapter) -> None:
    """A real crash: the saving process dies by SIGKILL half-way through writing the weights."""
    path, expected = saved_adapter
    good = _adapter_files(path)
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import deltatune.io
        from test_model_semantics import _half_write_then, lora_model
        deltatune.io.save_file = _half_write_then(lambda: os.kill(os.getpid(), signal.SIGKILL))
        lora_model("llama", seed=5).save_pretrained({str(path)!r})
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()[-2000:]
    files = _adapter_files(path)
    leftovers = set(files) - set(good)
    assert all(name.startswith(".") and name.endswith(".tmp") for name in leftovers), leftovers
    assert {name: files[name] for name in good} == good
    assert torch.equal(logits(DeltaModel.from_pretrained(build("llama"), path)), expected)


def test_save_renames_the_weights_before_the_config(saved_adapter, monkeypatch: pytest.MonkeyPatch) -> None:
    """io's contract: weights first, then the config that describes them."""
    path, _ = saved_adapter
    renamed = []
    real_replace = os.replace

    def recording_replace(src, dst):
        renamed.append(Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr(deltatune.io.os, "replace", recording_replace)
    lora_model("llama", seed=5).save_pretrained(path)
    assert renamed == ["adapter_model.safetensors", "adapter_config.json"]


def test_nested_disable_adapter_keeps_the_outer_block_disabled():
    """Leaving an inner ``disable_adapter()`` must not switch the adapter back on inside the outer one."""
    model = get_delta_model(
        build("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    batch = token_inputs()
    with model.disable_adapter():
        base = model(**batch).logits
    with model.disable_adapter():
        with model.disable_adapter():
            pass
        assert torch.equal(model(**batch).logits, base)
    assert not torch.equal(model(**batch).logits, base)


def test_an_adapter_added_to_an_eval_model_is_in_eval_mode():
    model = get_delta_model(build("llama"), LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.5))
    model.train()
    model.add_adapter("second", LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.5))
    model.eval()
    model.add_adapter("third", LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.5))
    assert not any(module.training for module in model.modules())
