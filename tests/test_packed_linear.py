"""Decoding on oneDNN-packed linear weights (``kernels/packed_linear.py``): the same logits as torch's own
products, only inside the block, only the model's own layers, packed again when a weight changes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune
from deltatune.compat.torch import onednn_packing_available, onednn_packs
from deltatune.generation.engine import GenerationEngine
from deltatune.generation.sampling import SamplingParams
from deltatune.kernels.packed_linear import PackedWeights
from tiny_models import tiny_llama

pytestmark = pytest.mark.skipif(not onednn_packing_available(), reason="this torch has no oneDNN packing")


def adapted_model(config=None):
    torch.manual_seed(0)
    config = config or deltatune.LoraConfig(r=4, target_modules="all-linear")
    model = deltatune.get_delta_model(tiny_llama(), config)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:  # every method's update starts at zero (B, the rotations, ...)
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def logits(model, packed=None):
    ids = torch.tensor([[3, 9, 4, 7, 1], [5, 2, 8, 6, 11]])
    with torch.no_grad():
        if packed is None:
            return model(ids).logits
        with packed.applied():
            return model(ids).logits


def test_packed_logits_equal_torch_products_and_the_layers_are_plain_again_after_the_block():
    model = adapted_model()
    packed = PackedWeights(model)
    layers = packed.packable_layers()
    base_linears = [m for name, m in model.named_modules() if type(m) is nn.Linear and "lora_" not in name]
    assert set(layers) == set(base_linears) and len(layers) > 0  # an adapter's factors are not packed
    torch.testing.assert_close(logits(model, packed), logits(model), atol=1e-5, rtol=1e-5)
    assert not any("forward" in vars(layer) for layer in layers)


def test_bf16_weights_are_packed_only_where_the_cpu_packs_bf16_and_answer_as_plain_ones_either_way():
    """oneDNN packs bf16 only on a CPU with AVX-512 BW/VL/DQ or AVX-NE-CONVERT; elsewhere those layers stay plain
    (packing them would fail at the first forward: a bf16 server without those instructions answered 500)."""
    model = tiny_llama().to(torch.bfloat16).eval()
    packed = PackedWeights(model)
    base_linears = [m for m in model.modules() if type(m) is nn.Linear]
    assert set(packed.packable_layers()) == (set(base_linears) if onednn_packs(torch.bfloat16) else set())
    torch.testing.assert_close(logits(model, packed).float(), logits(model).float(), atol=5e-2, rtol=5e-2)


def test_layers_run_packed_inside_the_block_only_and_not_with_autograd(monkeypatch):
    import deltatune.kernels.packed_linear as packed_linear

    calls = []
    original = packed_linear.onednn_linear
    monkeypatch.setattr(packed_linear, "onednn_linear", lambda *args: calls.append(1) or original(*args))
    model = adapted_model()
    packed = PackedWeights(model)
    logits(model, packed)
    assert len(calls) == len(packed.packable_layers())
    calls.clear()
    with packed.applied():  # grad enabled: nothing is patched, autograd sees torch's products
        model(torch.tensor([[3, 4]])).logits.sum().backward()
    logits(model)
    assert calls == []


MERGING = {
    "lora": deltatune.LoraConfig(r=4, target_modules="all-linear"),
    "loha": deltatune.LoHaConfig(r=4, target_modules="all-linear"),
    "oft": deltatune.OFTConfig(r=4, oft_block_size=0, target_modules="all-linear"),
}


@pytest.mark.parametrize("method", MERGING)
def test_a_weight_changed_in_place_is_packed_again(method):
    """Merging and unmerging write into the base weights (counted by their version counters)."""
    model = adapted_model(MERGING[method])
    packed = PackedWeights(model)
    logits(model, packed)
    model.merge_adapter()  # writes B A into every base weight in place
    torch.testing.assert_close(logits(model, packed), logits(model), atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(logits(model, packed), logits(model), atol=1e-5, rtol=1e-5)
    head = next(module for name, module in model.named_modules() if name.endswith("lm_head"))
    with torch.no_grad():
        head.weight.mul_(2)
    torch.testing.assert_close(logits(model, packed), logits(model), atol=1e-4, rtol=1e-5)


def test_the_engine_on_packed_weights_answers_as_without_them():
    model = adapted_model()
    prompts = [[3, 9, 4], [5, 2, 8, 6, 11, 12], [7]]
    greedy = SamplingParams(max_new_tokens=6, temperature=0)
    plain = [row.output_ids for row in GenerationEngine(model).generate(prompts, greedy)]
    engine = GenerationEngine(model, packed_weights=PackedWeights(model))
    assert [row.output_ids for row in engine.generate(prompts, greedy)] == plain
    assert not any("forward" in vars(layer) for layer in engine.packed_weights.packable_layers())


def test_a_mixed_batch_on_packed_weights_answers_as_without_them():
    """Rows of two adapters of different ranks and the base: a Llama's q/k/v and gate/up then run as one product
    each, their adapters' A's as one too, o_proj and down_proj with theirs (the four groups' packs are the ones
    kept), with the same greedy answers."""
    model = adapted_model()
    model.add_adapter("other", deltatune.LoraConfig(r=2, target_modules="all-linear"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".other." in name:
                param.add_(torch.randn_like(param) * 0.1)
    prompts, adapters = [[3, 9, 4], [5, 2, 8, 6, 11, 12], [7], [3, 9, 4]], ["default", "other", None, "other"]
    greedy = SamplingParams(max_new_tokens=6, temperature=0)

    def answers(packed):
        engine = GenerationEngine(model, packed_weights=packed, static_weights=True)
        rows = [engine.add(prompt, greedy, adapter=name) for prompt, name in zip(prompts, adapters)]
        while engine.has_work:
            engine.step()
        return [row.output_ids for row in rows]

    packed = PackedWeights(model)
    assert answers(packed) == answers(None)
    assert sum(isinstance(key, tuple) for key in packed._packs) == 4 * len(model.base_model.model.layers)


def test_a_weight_over_the_piece_size_is_packed_in_row_blocks(monkeypatch):
    import deltatune.kernels.packed_linear as packed_linear

    torch.manual_seed(0)
    layer = nn.Linear(32, 50)  # with a bias, split as the weight's rows are
    monkeypatch.setattr(packed_linear, "PIECE_BYTES", 16 * 32 * 4)  # 16 rows a piece: 16, 16, 16, 2
    packed = PackedWeights(nn.Sequential(layer))
    x = torch.randn(3, 4, 32)
    with torch.no_grad(), packed.applied():
        out = layer(x)
    _, _, pieces = packed._packs[layer][1].args  # the kept forward: partial(_packed_forward, layer, rows, pieces)
    assert [piece.shape[0] for piece in pieces] == [16, 16, 16, 2]
    torch.testing.assert_close(out, torch.nn.functional.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)


def test_the_server_keeps_one_pack_for_its_life_unless_told_not_to():
    from deltatune.serve.scheduler import Scheduler

    model = adapted_model()
    kept, plain = Scheduler(model, [0]), Scheduler(model, [0], packed_weights=False)
    assert isinstance(kept.engine.packed_weights, PackedWeights) and plain.engine.packed_weights is None
    assert kept.engine.packed_weights.huge_pages  # a server keeps its packs: onto huge pages once packed
    assert kept.engine.static_weights and plain.engine.static_weights  # only the server's thread writes its weights


def test_the_server_packs_its_weights_before_its_first_request():
    """The packing (and the move onto huge pages, ~3 s for SmolLM2) happens when the server starts, not inside the
    first request."""
    import time

    from deltatune.serve.scheduler import Scheduler

    scheduler = Scheduler(adapted_model(), [0])
    assert not scheduler.packed_weights._packs
    scheduler.start()
    try:
        deadline = time.monotonic() + 60
        while not scheduler.packed_weights._packs and time.monotonic() < deadline:
            time.sleep(0.05)
        assert scheduler.packed_weights._packs and scheduler.rows_in_flight == 0
    finally:
        scheduler.stop()


def test_a_failed_warm_up_is_logged_and_leaves_a_fresh_engine_with_the_same_generator(monkeypatch, caplog):
    from deltatune.serve.scheduler import Scheduler

    scheduler = Scheduler(adapted_model(), [0])
    engine, generator = scheduler.engine, scheduler.engine.generator

    def fail():
        raise RuntimeError("out of memory")

    monkeypatch.setattr(engine, "step", fail)
    with caplog.at_level("WARNING", logger="deltatune.serve"):
        scheduler._warm_up()
    assert "warming up the engine failed: out of memory" in caplog.text
    assert scheduler.engine is not engine and scheduler.engine.generator is generator
    assert not scheduler.engine.has_work
