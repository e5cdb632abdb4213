"""What deltatune assumes about other libraries' private behaviour (``deltatune.compat``): each test fails
loudly when an upgrade changes it, naming what to revisit."""

from __future__ import annotations

import pytest
import torch

from deltatune.compat.bitsandbytes import (
    canonical,
    is_packed_for_cpu,
    remember_canonical,
    restore_canonical,
)

bnb = pytest.importorskip("bitsandbytes")


def linear_4bit(quant_type: str, double: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(128, 96, compute_dtype=torch.float32, quant_type=quant_type, compress_statistics=double)
    layer.load_state_dict(torch.nn.Linear(128, 96).state_dict())
    return layer.to("cpu")


def repack(layer: torch.nn.Module) -> None:
    """bitsandbytes' own trigger: an eval-mode forward without gradients, with its CPU kernel switched on."""
    layer.support_avx512bf16_for_cpu = True  # the switch its forward reads (set from the CPU's flags)
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(2, 128))


CASES = [("nf4", False), ("fp4", False), ("nf4", True)]


@pytest.mark.parametrize(("quant_type", "double"), CASES)
def test_bitsandbytes_repacks_a_4bit_weight_on_an_eval_forward_and_canonical_reads_it_back(quant_type, double):
    layer = linear_4bit(quant_type, double)
    weight = layer.weight
    codes, scales = weight.data.clone(), weight.quant_state.absmax.clone()
    remember_canonical(weight)
    repack(layer)
    if not is_packed_for_cpu(weight):
        pytest.fail("bitsandbytes no longer repacks 4-bit weights on an eval forward: compat.bitsandbytes is moot")
    assert weight.data.shape == (96, 64) and weight.quant_state.absmax.dtype == torch.bfloat16  # the packed layout
    read_codes, memo = canonical(weight)
    assert torch.equal(read_codes, codes), "bitsandbytes' CPU packing of the codes changed: update unpack_codes"
    assert torch.equal(memo.absmax, scales) and memo.nested == double
    assert is_packed_for_cpu(weight)  # reading left it as bitsandbytes has it
    restore_canonical(weight)
    assert not is_packed_for_cpu(weight) and torch.equal(weight.data, codes)
    assert torch.equal(weight.quant_state.absmax, scales) and weight.quant_state.nested == double


@pytest.mark.parametrize(("quant_type", "double"), CASES)
def test_bitsandbytes_own_inverse_still_moves_the_scales(quant_type, double):
    """Why deltatune keeps the scales itself: bitsandbytes' inverse (its save and .cuda() call it) leaves them
    transposed and bf16 (re-quantised under double quantisation). When this fails, bitsandbytes fixed it: docs/qlora.md
    says what bitsandbytes does and needs the update."""
    from bitsandbytes.functional import (
        _convert_weight_packed_for_cpu_inverse,
        dequantize_4bit,
    )

    layer = linear_4bit(quant_type, double)
    before = dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    repack(layer)
    codes, state = _convert_weight_packed_for_cpu_inverse(layer.weight.data, layer.weight.quant_state)
    assert (dequantize_4bit(codes, state) - before).abs().max() > 0


def test_a_weight_repacked_before_deltatune_saw_it_is_read_with_its_bf16_scales_and_a_warning(caplog):
    layer = linear_4bit("nf4", False)
    expected = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    repack(layer)  # no remember_canonical first
    with caplog.at_level("WARNING", logger="deltatune.compat.bitsandbytes"):
        codes, scales = canonical(layer.weight)
    assert "rounded to bf16" in caplog.text
    from deltatune.kernels.base_weight import dense

    read = dense(layer.weight, torch.float32)
    assert (read - expected).abs().max() <= expected.abs().max() * 2**-8  # bf16 scales: relative error <= 2^-9


def test_bitsandbytes_cannot_repack_a_layer_narrower_than_a_block_so_deltatune_keeps_it_canonical():
    from deltatune.compat.bitsandbytes import avoid_failing_repacks

    layer = bnb.nn.Linear4bit(32, 32, compute_dtype=torch.float32, quant_type="nf4").to("cpu")
    with pytest.raises(RuntimeError, match="invalid for input"):  # when this passes, bitsandbytes packs these now
        repack(layer)
    layer = bnb.nn.Linear4bit(32, 32, compute_dtype=torch.float32, quant_type="nf4").to("cpu")
    wide = bnb.nn.Linear4bit(128, 96, compute_dtype=torch.float32, quant_type="nf4").to("cpu")
    model = torch.nn.Sequential(layer, wide)
    model.apply(lambda m: setattr(m, "support_avx512bf16_for_cpu", True) if hasattr(m, "compute_dtype") else None)
    avoid_failing_repacks(model)
    assert not layer.support_avx512bf16_for_cpu and wide.support_avx512bf16_for_cpu
    model.eval()
    with torch.no_grad():
        layer(torch.randn(2, 32))
    assert not is_packed_for_cpu(layer.weight)
