"""Several adapters in one batch (``DeltaModel.adapter_rows``): every row's logits and gradients equal that row run
alone with its adapter set (the base alone for None), for LoRA and DoRA of different ranks and targets, Conv1D and
embedding layers, in eval and training mode; equal peft's own mixed batch (``adapter_names=``); the generation
engine's mixed-adapter rows equal transformers' ``generate`` per adapter; what cannot mix is refused by name."""

from __future__ import annotations

import peft
import pytest
import torch

import deltatune
from deltatune import DeltaModel, LoraConfig
from deltatune.errors import ConfigError, MergeError
from deltatune.generation.engine import GenerationEngine
from deltatune.generation.sampling import SamplingParams
from tiny_models import perturb_trainable, tiny_gpt2, tiny_llama, token_inputs

ADAPTERS = {  # different ranks, targets and kinds; "emb" adapts the input embedding too
    "a": LoraConfig(r=4, target_modules="all-linear"),
    "b": LoraConfig(r=8, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"]),
    "dora": LoraConfig(r=2, target_modules=["k_proj", "o_proj", "up_proj"], use_dora=True),
    "emb": LoraConfig(r=3, target_modules=["embed_tokens", "gate_proj"]),
}
ROWS = ["a", None, "b", "dora", "a", "emb", "b", None]


def mixed_model(make=tiny_llama, adapters=ADAPTERS) -> DeltaModel:
    """A model holding every adapter of ``adapters``, each perturbed (B starts at zero) so each changes the output."""
    model = None
    torch.manual_seed(0)  # A's initialisation
    for seed, (name, config) in enumerate(adapters.items()):
        if model is None:
            model = deltatune.get_delta_model(make(), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
        model.set_adapter(name)
        perturb_trainable(model, seed=seed + 1)
    return model


def alone(model: DeltaModel, name: str | None, **inputs) -> torch.Tensor:
    """The logits with only adapter ``name`` applied (None: the base model)."""
    if name is None:
        with model.disable_adapter():
            return model(**inputs).logits
    model.set_adapter(name)
    return model(**inputs).logits


def assert_rows_run_alone(
    model: DeltaModel, rows: list[str | None], inputs: dict, reference=None, check_weights: bool = True
) -> None:
    """``model``'s mixed-batch logits, row by row, equal ``reference`` (default: ``model``) with that row's adapter
    alone."""
    with torch.no_grad(), model.adapter_rows(rows, check_weights):
        mixed = model(**inputs).logits
    for row, name in enumerate(rows):
        with torch.no_grad():
            expected = alone(reference or model, name, input_ids=inputs["input_ids"][row : row + 1])
        torch.testing.assert_close(mixed[row : row + 1], expected, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def model():
    return mixed_model().eval()


@pytest.mark.parametrize("length", [6, 1], ids=["prompt", "one token"])
def test_each_row_equals_its_adapter_alone(model, length):
    """Without autograd, a prompt (prefill) and one token per row (decoding) take the batched way
    (tuners/lora/rows.py; the grouped way runs under autograd, below): blocks of 2, 2, 1 and 1 rows (padded),
    ranks 4, 8, 2 and 3 (padded), a DoRA adapter, rows without one."""
    inputs = token_inputs(batch=len(ROWS), length=length)
    assert_rows_run_alone(model, ROWS, inputs)
    # the adapters really differ, so the comparison above could fail
    first = inputs["input_ids"][:1]
    with torch.no_grad():
        outputs = [alone(model, name, input_ids=first) for name in [None, *ADAPTERS]]
    assert all((x - y).abs().max() > 1e-3 for i, x in enumerate(outputs) for y in outputs[i + 1 :])


@pytest.mark.parametrize("name", ["a", "dora"])
@pytest.mark.parametrize("length", [5, 1])
def test_one_adapter_on_every_row_is_one_block(model, name, length):
    """The batch is the block: two plain products added in place (LoRA), the general way for DoRA's scale."""
    assert_rows_run_alone(model, [name] * 4, token_inputs(batch=4, length=length))


def test_one_adapter_on_every_row_and_the_block_restores_the_model(model):
    inputs = token_inputs(batch=3, length=5)
    with torch.no_grad():
        expected = alone(model, "b", **inputs)
        model.set_adapter("a")
        with model.adapter_rows(["b"] * 3):
            mixed = model(**inputs).logits
        after = model(**inputs).logits
        torch.testing.assert_close(mixed, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(after, alone(model, "a", **inputs))  # "a" active again outside the block


def test_training_mode_gradients_equal_the_rows_run_apart():
    """Under autograd in training mode (the fused LoRA and gated-MLP paths step aside for mixed rows), the summed
    loss's gradient for each adapter equals the sum of its rows' gradients run apart."""
    model = mixed_model().train()
    for config in model.peft_config.values():
        assert config.lora_dropout == 0
    inputs = token_inputs(batch=len(ROWS), length=6)
    params = {name: p for name, p in model.named_parameters() if ".lora_" in name}
    for p in params.values():
        p.requires_grad_(True)
    with model.adapter_rows(ROWS):
        model(**inputs).logits.square().mean(-1).sum().backward()
    mixed = {name: p.grad.clone() for name, p in params.items() if p.grad is not None}
    model.zero_grad()
    for row, name in enumerate(ROWS):
        if name is not None:
            model.set_adapter(name)
            for p in params.values():
                p.requires_grad_(True)
            model(input_ids=inputs["input_ids"][row : row + 1]).logits.square().mean(-1).sum().backward()
    apart = {name: p.grad for name, p in params.items() if p.grad is not None}
    assert mixed.keys() == apart.keys() and len(mixed) > 20
    for name in mixed:
        torch.testing.assert_close(mixed[name], apart[name], atol=1e-5, rtol=1e-4, msg=name)


def test_gpt2_conv1d_rows():
    adapters = {
        "x": LoraConfig(r=4, target_modules=["c_attn", "c_fc"]),
        "y": LoraConfig(r=2, target_modules=["c_proj"], use_dora=True),
    }
    model = mixed_model(tiny_gpt2, adapters).eval()
    assert_rows_run_alone(model, ["y", "x", None, "x"], token_inputs(batch=4, length=5))


def test_equals_peft_mixed_batch(tmp_path):
    """peft's ``adapter_names=`` forward on the same adapters (LoRA only: peft refuses DoRA in a mixed batch)."""
    lora_only = {name: config for name, config in ADAPTERS.items() if not config.use_dora}
    model = mixed_model(adapters=lora_only).eval()
    for name in lora_only:
        model.save_pretrained(tmp_path, selected_adapters=[name])
    reference = None
    for name in lora_only:
        folder = tmp_path / name
        if reference is None:
            reference = peft.PeftModel.from_pretrained(tiny_llama(), folder, adapter_name=name)
        else:
            reference.load_adapter(folder, adapter_name=name)
    reference.eval()
    rows = [name for name in ROWS if name != "dora"]
    inputs = token_inputs(batch=len(rows), length=6)
    with torch.no_grad():
        theirs = reference(**inputs, adapter_names=[name or "__base__" for name in rows]).logits
        with model.adapter_rows(rows):
            ours = model(**inputs).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_adapters_rows_in_order_are_sliced_not_gathered(model):
    """Each adapter's rows consecutive, in the layer's order, blocks of one width: the blocks are a slice."""
    from deltatune.tuners.rows import RowGroups

    rows = ["a", "a", "b", "b", None]
    assert RowGroups.of(rows).blocks({"a": 0, "b": 1}, torch.device("cpu")).sliced
    assert not RowGroups.of(["a", "b", "a", "b", None]).blocks({"a": 0, "b": 1}, torch.device("cpu")).sliced
    for length in (1, 4):
        assert_rows_run_alone(model, rows, token_inputs(batch=len(rows), length=length))


@pytest.mark.parametrize("length", [1, 4])
def test_a_short_last_block_without_base_rows_is_gathered_not_sliced(model, length):
    """Two rows of "a", one of "b", none for the base: b's block is padded with the zero row, whose index (the row
    count) continues the rows' order, so the blocks must not pass for a slice of the batch (they did: a server's
    decoding step with such rows failed). Through the engine too, rows leaving in turn."""
    from deltatune.tuners.rows import RowGroups

    rows = ["a", "a", "b"]
    blocks = RowGroups.of(rows).blocks({"a": 0, "b": 1}, torch.device("cpu"))
    assert blocks.padded and not blocks.sliced
    assert_rows_run_alone(model, rows, token_inputs(batch=len(rows), length=length))
    engine = GenerationEngine(model, static_weights=True)
    prompts = [[5, 9, 2][:length], [8, 1, 3, 4][:length], [7, 7, 6]]
    sizes = [SamplingParams(max_new_tokens=n, temperature=0) for n in (3, 6, 9)]
    mixed = [engine.add(prompt, size, adapter=name) for prompt, size, name in zip(prompts, sizes, rows)]
    while engine.has_work:
        engine.step()
    for prompt, size, name, row in zip(prompts, sizes, rows, mixed):
        single = GenerationEngine(model)
        alone = single.add(prompt, size, adapter=name)
        while single.has_work:
            single.step()
        assert row.output_ids == alone.output_ids, name


@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_every_batch_in_the_engines_order_equals_its_rows_alone(model, count):
    """Every batch of ``count`` rows as the engine orders them (each adapter's rows together, in the model's order,
    the base's last: blocks of every width, with and without base rows), decoding and prefill: each row equals its
    adapter alone."""
    import itertools

    for rows in itertools.combinations_with_replacement(["a", "b", "dora", None], count):
        for length in (1, 3):
            assert_rows_run_alone(model, list(rows), token_inputs(batch=count, length=length))


def test_the_engine_keeps_each_adapters_rows_together(model):
    """Rows join in any order; the engine orders them by adapter (the model's order, the base's last), and
    each row still answers as it does alone."""
    greedy = SamplingParams(max_new_tokens=6, temperature=0)
    names = ["b", None, "a", "b", "a", "dora"]
    prompts = [[5 + i, 9, 2 + i] for i in range(len(names))]
    engine = GenerationEngine(model, max_batch=8)
    rows = [engine.add(prompt, greedy, adapter=name) for prompt, name in zip(prompts, names)]
    engine.step()
    assert [row.adapter for row in engine.running] == ["a", "a", "b", "b", "dora", None]
    while engine.has_work:
        engine.step()
    for prompt, name, row in zip(prompts, names, rows):
        single = GenerationEngine(model)
        alone = single.add(prompt, greedy, adapter=name)
        while single.has_work:
            single.step()
        assert row.output_ids == alone.output_ids, name


def test_engine_rows_with_different_adapters_equal_generate_per_adapter(model):
    prompts = [[5, 6, 7, 8, 9], [11, 12], [3, 4, 5, 6, 7, 8, 9, 10, 11], [40], [7, 7, 7]]
    names = ["dora", "a", None, "b", "emb"]
    greedy = SamplingParams(max_new_tokens=8, temperature=0)
    engine = GenerationEngine(model, stop_token_ids=[model.config.eos_token_id], max_batch=3)  # rows join, leave
    rows = [engine.add(prompt, greedy, adapter=name) for prompt, name in zip(prompts, names)]
    while engine.has_work:
        engine.step()
    answers = set()
    for prompt, name, row in zip(prompts, names, rows):
        with torch.no_grad():
            if name is None:
                with model.disable_adapter():
                    out = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=0)
            else:
                model.set_adapter(name)
                out = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert row.output_ids == out[0, len(prompt) :].tolist(), name
        answers.add((tuple(prompt[:1]), tuple(row.output_ids)))
    assert len(answers) == len(prompts)


def test_what_cannot_mix_is_refused_by_name(tmp_path):
    model = mixed_model(adapters={"a": ADAPTERS["a"]})
    model.add_adapter("head", LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    model.add_adapter("tokens", LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[1, 2]))
    with pytest.raises(ConfigError, match=r"adapter 'head' cannot share a batch .*whole modules \(lm_head\)"):
        model.check_mixable("head")
    with pytest.raises(ConfigError, match="'tokens' cannot share a batch .*trainable_token_indices"):
        with model.adapter_rows(["a", "tokens"]):
            pass
    with pytest.raises(ConfigError, match="no adapter named 'nope'"):
        GenerationEngine(model).add([1, 2], SamplingParams(), adapter="nope")
    ia3_config = deltatune.IA3Config(target_modules=["k_proj"], feedforward_modules=[])
    ia3 = deltatune.get_delta_model(tiny_llama(), ia3_config)
    with pytest.raises(ConfigError, match="its method is IA3, and only LoRA and DoRA adapters mix"):
        ia3.check_mixable("default")
    plain = GenerationEngine(tiny_llama())
    with pytest.raises(ConfigError, match="needs a DeltaModel"):
        plain.add([1, 2], SamplingParams(), adapter="a")
    base_row = plain.add([1, 2], SamplingParams(max_new_tokens=2, temperature=0), adapter=None)  # the model as is
    while plain.has_work:
        plain.step()
    assert len(base_row.output_ids) == 2
    model.merge_adapter(["a"])
    with pytest.raises(MergeError, match="unmerge_adapter"):
        with model.adapter_rows(["a"]):
            pass


def test_rows_must_match_the_batch(model):
    with pytest.raises(ConfigError, match="the batch has 2 rows but 3 adapter names"), torch.no_grad():
        with model.adapter_rows(["a", "b", None]):
            model(**token_inputs(batch=2, length=4))


def test_the_stack_follows_changed_weights(model):
    """The stacked factors are rebuilt when an adapter's weights change in place (a training step, a load)."""
    inputs = token_inputs(batch=4, length=1)
    rows = ["a", "b", "dora", None]
    with torch.no_grad():
        with model.adapter_rows(rows):
            before = model(**inputs).logits
        factor = model.base_model.model.layers[0].mlp.down_proj.lora_B["a"].weight
        factor.add_(0.5)
        with model.adapter_rows(rows):
            after = model(**inputs).logits
        expected = alone(model, "a", input_ids=inputs["input_ids"][:1])
        factor.sub_(0.5)
    assert (after[0] - before[0]).abs().max() > 1e-3
    torch.testing.assert_close(after[:1], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after[1:], before[1:])


def test_saved_adapters_load_side_by_side_and_mix(tmp_path, model):
    """The serving path: adapters saved apart, loaded into one base with ``load_adapter``, mixed per row."""
    for name in ("a", "dora"):
        model.save_pretrained(tmp_path, selected_adapters=[name])
    served = DeltaModel.from_pretrained(tiny_llama(), tmp_path / "a", adapter_name="a")
    served.load_adapter(tmp_path / "dora", adapter_name="dora")
    served.eval()
    assert_rows_run_alone(served, ["dora", None, "a"], token_inputs(batch=3, length=5), reference=model)


def test_adapters_added_and_deleted_between_batches_mix_rightly():
    """``adapter_rows`` keeps the adapted layers and each adapter's mixability between calls; adding or deleting
    an adapter (a server loading one at run time) must renew both."""
    model = mixed_model(adapters={"a": ADAPTERS["a"]}).eval()
    inputs = token_inputs(batch=3, length=4)
    assert_rows_run_alone(model, ["a", None, "a"], inputs)
    model.add_adapter("new", LoraConfig(r=2, target_modules=["lm_head", "up_proj"]))  # a module "a" leaves alone
    model.set_adapter("new")
    perturb_trainable(model, seed=11)  # its B starts at zero
    assert_rows_run_alone(model, ["new", "a", None], inputs)
    model.delete_adapter("new")
    model.add_adapter("new", LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with pytest.raises(ConfigError, match="'new' cannot share a batch"):
        model.check_mixable("new")


def test_the_stack_follows_an_adapter_deleted_and_added_again_under_its_name():
    """A server unloading an adapter and loading another under the same name and rank: new parameter objects,
    which the kept stack's version counters cannot see, so deleting or adding an adapter drops it."""
    adapters = {"a": ADAPTERS["a"], "b": LoraConfig(r=4, target_modules="all-linear")}
    model = mixed_model(adapters=adapters).eval()
    rows, inputs = ["a", "b", None], token_inputs(batch=3, length=1)  # one token per row: the batched way
    assert_rows_run_alone(model, rows, inputs)
    model.delete_adapter("b")
    model.add_adapter("b", adapters["b"])
    model.set_adapter("b")
    perturb_trainable(model, seed=21)
    assert_rows_run_alone(model, rows, inputs)


def test_a_decoding_step_stacks_only_the_adapters_its_batch_names():
    """A server holding many adapters reads, at each decoding step, the factors of those its rows name; a batch
    naming other adapters next gets them (and the right logits)."""
    adapters = {name: LoraConfig(r=r, target_modules="all-linear") for name, r in (("a", 4), ("b", 8), ("c", 2))}
    model = mixed_model(adapters=adapters).eval()
    layer = model.base_model.model.layers[0].self_attn.q_proj
    inputs = token_inputs(batch=3, length=1)
    for rows in (["a", "b", None], ["c", None, "b"], ["c", "a", "a"]):
        assert_rows_run_alone(model, rows, inputs)
        held = [name for name in adapters if name in rows]
        stack = layer.__dict__["_adapter_stack"]
        assert list(stack.order) == held and stack.a.shape[0] == len(held)
        assert stack.a.shape[1] == stack.b.shape[1] == max(layer.r[name] for name in held)


def test_rows_leaving_cut_the_stack_from_the_one_built():
    """Rows of some adapters leave (a decoding batch shrinks): each layer's stack is cut from the last one built,
    slots selected and ranks trimmed (no rebuild), and every row still equals its adapter alone; the full set again
    is the built stack itself."""
    adapters = {"a": LoraConfig(r=4, target_modules="all-linear"), "b": LoraConfig(r=8, target_modules="all-linear")}
    adapters["c"] = LoraConfig(r=2, target_modules="all-linear", use_dora=True)
    model = mixed_model(adapters=adapters).eval()
    layer = model.base_model.model.layers[0].mlp.down_proj
    inputs = token_inputs(batch=3, length=1)
    assert_rows_run_alone(model, ["a", "b", "c"], inputs)
    built = layer.__dict__["_adapter_stack_built"]
    for rows, held in ((["a", "c", "c"], ("a", "c")), (["c", None, "c"], ("c",)), (["a", "b", None], ("a", "b"))):
        assert_rows_run_alone(model, rows, inputs)
        stack = layer.__dict__["_adapter_stack"]
        assert layer.__dict__["_adapter_stack_built"] is built and stack is not built
        slots = torch.tensor([built.order[name] for name in held])
        rank = max(layer.r[name] for name in held)
        assert torch.equal(stack.a, built.a[slots, :rank]) and torch.equal(stack.b, built.b[slots, :rank])
    assert_rows_run_alone(model, ["a", "b", "c"], inputs)
    assert layer.__dict__["_adapter_stack"] is built


def test_unchecked_blocks_use_and_cut_the_kept_stacks_without_reading_their_tensors(monkeypatch):
    """``check_weights=False`` (a static-weight engine's decoding steps): the stacks kept from a checked block are
    reused, and cut as rows leave, without reading one version counter or data pointer; every row still equals its
    adapter alone. The same blocks checked read them."""
    import deltatune.tuners.lora.rows as lora_rows

    adapters = {"a": LoraConfig(r=4, target_modules="all-linear"), "b": LoraConfig(r=8, target_modules="all-linear")}
    adapters["c"] = LoraConfig(r=2, target_modules="all-linear", use_dora=True)
    model = mixed_model(adapters=adapters).eval()
    inputs = token_inputs(batch=3, length=1)
    assert_rows_run_alone(model, ["a", "b", "c"], inputs)  # checked: the stacks are built
    reads, stamps = [], lora_rows.write_stamps
    monkeypatch.setattr(lora_rows, "write_stamps", lambda tensors: reads.append(len(tensors)) or stamps(tensors))
    for check_weights in (False, True):
        for rows in (["a", "b", "c"], ["a", "c", None], ["c", None, None]):
            assert_rows_run_alone(model, rows, inputs, check_weights=check_weights)
        assert bool(reads) == check_weights


def test_a_static_weight_engine_checks_the_adapters_when_rows_join_not_at_each_step(model, monkeypatch):
    """``GenerationEngine(static_weights=True)`` (the server's): prefills check the stacked adapters, decoding steps
    do not; a row joining mid-way is checked at its prefill; the answers are those of an engine checking always."""
    blocks, adapter_rows = [], model.adapter_rows

    def recording(names, check_weights=True):
        blocks.append(check_weights)
        return adapter_rows(names, check_weights)

    monkeypatch.setattr(model, "adapter_rows", recording)
    greedy = SamplingParams(max_new_tokens=4, temperature=0)
    answers = {}
    for static in (True, False):
        blocks.clear()
        engine = GenerationEngine(model, static_weights=static)
        rows = [engine.add([5, 9, 2], greedy, adapter="a"), engine.add([7, 3], greedy, adapter="dora")]
        engine.step()  # the first rows' prefill
        engine.step()  # a decoding step
        rows.append(engine.add([4, 4, 8], greedy, adapter="b"))
        while engine.has_work:
            engine.step()  # a decoding step, then the new row's prefill, then decoding steps
        assert blocks == ([True, False, False, True, False, False, False] if static else [True] * 7)
        answers[static] = [row.output_ids for row in rows]
    assert answers[True] == answers[False]


def test_merging_drops_the_kept_stacks():
    """A merge writes the base weight (DoRA's stacked scale reads it), and an unmerge writes it back with other
    roundings: the stacks go, so that an unchecked block after the unmerge cannot use a stale scale."""
    model = mixed_model(adapters={"a": ADAPTERS["a"], "dora": ADAPTERS["dora"]}).eval()
    layer = model.base_model.model.layers[0].self_attn.k_proj
    inputs = token_inputs(batch=3, length=1)
    assert_rows_run_alone(model, ["dora", "a", None], inputs)
    assert "_adapter_stack" in vars(layer) and "_adapter_stack_built" in vars(layer)
    model.merge_adapter(["dora"])
    assert "_adapter_stack" not in vars(layer) and "_adapter_stack_built" not in vars(layer)
    model.unmerge_adapter()
    assert_rows_run_alone(model, ["dora", "a", None], inputs, check_weights=False)


def test_a_stack_is_not_cut_from_changed_weights():
    """An adapter written in place after the stack was built: a smaller batch naming it is rebuilt, not cut from the
    stale stack (DoRA's scale follows a changed base weight too)."""
    adapters = {"a": LoraConfig(r=4, target_modules="all-linear"), "b": LoraConfig(r=4, target_modules="all-linear")}
    adapters["c"] = LoraConfig(r=2, target_modules="all-linear", use_dora=True)
    model = mixed_model(adapters=adapters).eval()
    layer = model.base_model.model.layers[0].self_attn.q_proj
    inputs = token_inputs(batch=3, length=1)
    for changed, rows in ((layer.lora_A["a"].weight, ["a", None, "a"]), (layer.base_weight, ["c", "c", None])):
        assert_rows_run_alone(model, ["a", "b", "c"], inputs)
        built = layer.__dict__["_adapter_stack_built"]
        with torch.no_grad():
            changed.mul_(1.5)
        assert_rows_run_alone(model, rows, inputs)
        assert layer.__dict__["_adapter_stack_built"] is not built


def test_blocks_naming_the_same_rows_share_one_grouping_and_its_worked_out_blocks(model):
    """A server's decoding steps name the same adapters step after step: the grouping (and the blocks, slots and
    held adapters it worked out) is made once, and made anew for other names."""
    layer = model.base_model.model.layers[0].self_attn.q_proj
    names = ["a", "b", None, "a"]
    with model.adapter_rows(names):
        first = layer.row_groups
    with model.adapter_rows(list(names)):
        assert layer.row_groups is first
    with model.adapter_rows(["b", "a", None, "a"]):
        assert layer.row_groups is not first and layer.row_groups.names == ("b", "a", None, "a")


def test_every_change_of_the_adapters_state_moves_the_adapters_version():
    """What the generation engine keeps across decoding steps is valid while ``adapters_version`` stays."""
    model = mixed_model()
    changes = [
        lambda: model.set_adapter("b"),
        lambda: model.add_adapter("c", LoraConfig(r=2, target_modules=["q_proj"])),
        lambda: model.delete_adapter("c"),
        lambda: model.merge_adapter(["a"]),
        lambda: model.unmerge_adapter(),
    ]
    for change in changes:
        before = model.adapters_version
        change()
        assert model.adapters_version > before, change
    before = model.adapters_version
    with model.disable_adapter():
        assert model.adapters_version > before
