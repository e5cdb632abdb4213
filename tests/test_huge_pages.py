"""Moving filled anonymous memory onto 2 MiB pages (``runtime/huge_pages.py``): which regions of smaps qualify, a
live collapse that leaves the contents as they were, and packed weights that collapse once after packing."""

from __future__ import annotations

import sys

import pytest
import torch

from deltatune.runtime import huge_pages
from deltatune.runtime.huge_pages import HUGE_PAGE, collapsible

MIB = 1 << 20


def region(start: int, end: int, perms: str = "rw-p", path: str = "", rss: int | None = None) -> str:
    """One region of /proc/self/smaps as the kernel writes it (fields cut to those read, and one more)."""
    header = f"{start:x}-{end:x} {perms} 00000000 00:00 0"
    resident = (end - start) if rss is None else rss
    return f"{header} {path}".rstrip() + f"\nSize: {(end - start) >> 10} kB\nRss: {resident >> 10} kB\nPss: 0 kB\n"


def test_only_filled_writable_anonymous_regions_of_a_huge_page_or_more_qualify_aligned_inwards():
    base = 0x7F0000000000  # a huge-page boundary
    smaps = "".join(
        [
            region(base + 4096, base + 5 * MIB + 8192),  # anonymous, filled: [2 MiB, 4 MiB) inside it
            region(base + 8 * MIB, base + 12 * MIB, path="[heap]"),  # the heap: whole
            region(base + 16 * MIB, base + 24 * MIB, rss=0),  # a thread's untouched stack
            region(base + 32 * MIB, base + 36 * MIB, perms="r--p"),  # read-only
            region(base + 40 * MIB, base + 44 * MIB, path="/usr/lib/libtorch_cpu.so"),  # a file's pages
            region(base + 48 * MIB + 4096, base + 50 * MIB + 4096),  # no whole huge page inside
            region(base + 52 * MIB, base + 56 * MIB, path="[stack]"),
        ]
    )
    assert collapsible(smaps) == [(base + 2 * MIB, base + 4 * MIB), (base + 8 * MIB, base + 12 * MIB)]


def test_a_region_below_the_filled_share_is_left_alone():
    start = 0x7F0000000000
    size = 8 * MIB
    filled = region(start, start + size, rss=int(0.9 * size) + 4096)
    sparse = region(start, start + size, rss=int(0.8 * size))
    assert collapsible(filled) == [(start, start + size)] and collapsible(sparse) == []


def anon_huge_bytes() -> int:
    with open("/proc/self/smaps_rollup") as file:
        return next(int(line.split()[1]) << 10 for line in file if line.startswith("AnonHugePages:"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_COLLAPSE is Linux's")
def test_a_live_collapse_keeps_the_contents_and_moves_them_onto_huge_pages_where_the_kernel_can():
    torch.manual_seed(0)
    weights = torch.randn(32 * MIB // 4)  # 32 MiB, filled
    copy = weights.clone()
    before = anon_huge_bytes()
    done = huge_pages.collapse()
    assert done % HUGE_PAGE == 0 and torch.equal(weights, copy)
    if done == 0:
        pytest.skip("this kernel collapses nothing (before Linux 6.1, or transparent huge pages off)")
    assert anon_huge_bytes() >= before + 16 * MIB  # at least the tensor's inner huge pages


def test_packed_weights_collapse_once_after_the_block_that_packed_and_only_when_asked(monkeypatch):
    from deltatune.compat.torch import onednn_packing_available
    from deltatune.kernels import packed_linear
    from deltatune.kernels.packed_linear import PackedWeights
    from tiny_models import tiny_llama

    if not onednn_packing_available():
        pytest.skip("this torch has no oneDNN packing")
    calls = []
    monkeypatch.setattr(packed_linear, "collapse_to_huge_pages", lambda: calls.append(1) or 0)
    model, ids = tiny_llama().eval(), torch.tensor([[3, 9, 4, 7]])
    asked, plain = PackedWeights(model, huge_pages=True), PackedWeights(model)
    for packed in (asked, asked, plain):
        with torch.no_grad(), packed.applied():
            model(ids)
    assert calls == [1]  # the first block packed; the second reused its packs; the plain one never collapses
    with torch.no_grad():
        model.lm_head.weight.mul_(2)  # a changed weight is packed again: collapsed again
        with asked.applied():
            model(ids)
    assert calls == [1, 1]
