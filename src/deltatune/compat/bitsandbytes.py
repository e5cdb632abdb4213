"""bitsandbytes' CPU repacking of 4-bit weights, and the canonical layout deltatune keeps instead.

On a CPU with AVX512-BF16, bitsandbytes 0.50 rewrites a ``Linear4bit`` weight in place on its first
eval-mode, no-grad forward, for its CPU inference kernel, and never unpacks it in a forward again::

    canonical (what training, merging and saving read)        packed for the CPU kernel
    codes   [(n·k+1)/2, 1]: two 4-bit codes a byte, row-major  ─►  [n, k/2]: tiles of 32 rows × 2 columns
    absmax  [n·k/64] fp32 (double quantisation: 8-bit + state2) ─►  [k/64, n] bf16: transposed, rounded, un-nested

Its inverse (``_convert_weight_packed_for_cpu_inverse``, which its own save and ``.cuda()`` call) restores
the codes but leaves ``absmax`` transposed and bf16 unless the weight was double-quantised, and
re-quantises the scales when it was: every weight read after it is scrambled or moved.

deltatune does not rely on that inverse. ``remember_canonical`` keeps a reference to a weight's canonical
scales before bitsandbytes can repack it (no copy: the packed state gets new tensors); ``canonical``
reads the canonical codes and scales back (codes re-laid by ``unpack_codes``, this module's own inverse
of the tiling; scales from the reference); ``restore_canonical`` puts them back in place. Evaluation keeps
bitsandbytes' fast kernel and its numbers (peft's too); training, merging and DoRA's norms read the
weight as it was quantised, however many evaluations came before.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

_log = logging.getLogger(__name__)
_TILE_ROWS = 32  # bitsandbytes' block_n: rows interleaved per packed tile
_MEMO = "deltatune_canonical"  # attribute on a QuantState object: its canonical scales


@dataclass(frozen=True)
class CanonicalScales:
    """A 4-bit weight's scales as it was quantised, and its codes' storage shape and dtype."""

    absmax: torch.Tensor
    nested: bool
    state2: Any
    offset: Any
    dtype: torch.dtype
    code_shape: torch.Size
    code_dtype: torch.dtype


def is_packed_for_cpu(weight: torch.Tensor) -> bool:
    """Whether bitsandbytes has repacked this 4-bit weight for its CPU inference kernel."""
    return bool(getattr(weight.quant_state, "packing_format_for_cpu", False))


def avoid_failing_repacks(model: nn.Module) -> None:
    """Switch bitsandbytes' CPU repacking off for the 4-bit layers of ``model`` whose shape it cannot pack:
    it needs whole tiles of 32 rows and whole blocks across a row (out % 32 == 0, in % blocksize == 0), and
    otherwise fails inside an evaluation (``shape '[32, 0]' is invalid``). Such layers evaluate as they train."""
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if getattr(module, "support_avx512bf16_for_cpu", False) and state is not None:
            rows, columns = state.shape
            if rows % _TILE_ROWS or columns % state.blocksize:
                module.support_avx512bf16_for_cpu = False


def remember_canonical(weight: torch.Tensor) -> None:
    """Keep a reference to ``weight``'s canonical scales on its quant state (once; nothing when packed)."""
    state = weight.quant_state
    if getattr(state, _MEMO, None) is None and not is_packed_for_cpu(weight):
        setattr(
            state,
            _MEMO,
            CanonicalScales(
                state.absmax,
                bool(state.nested),
                getattr(state, "state2", None),
                getattr(state, "offset", None),
                state.dtype,
                weight.data.shape,
                weight.data.dtype,
            ),
        )


def canonical(weight: torch.Tensor) -> tuple[torch.Tensor, CanonicalScales]:
    """(codes, scales) of a 4-bit weight in the canonical layout, whatever bitsandbytes did to it; ``weight``
    itself is left as it is."""
    state = weight.quant_state
    memo: CanonicalScales | None = getattr(state, _MEMO, None)
    if not is_packed_for_cpu(weight):
        if memo is None:  # never packed while deltatune looked: the state is the canonical one
            remember_canonical(weight)
            memo = getattr(state, _MEMO)
        return weight.data, memo  # (bitsandbytes' own inverse may have rewritten the scales: the memo is right)
    if memo is None:
        memo = _scales_from_packed(weight)
    codes = unpack_codes(weight.data, state.shape).view(memo.code_dtype).reshape(memo.code_shape)
    return codes, memo


def restore_canonical(weight: torch.Tensor) -> None:
    """Put ``weight`` back into the canonical layout in place (codes and scales), so that bitsandbytes' own
    forward and save read it as it was quantised; nothing when it already is."""
    state = weight.quant_state
    memo = getattr(state, _MEMO, None)
    if not is_packed_for_cpu(weight) and (memo is None or state.absmax is memo.absmax):
        return
    codes, memo = canonical(weight)
    weight.data = codes
    state.absmax, state.nested, state.dtype = memo.absmax, memo.nested, memo.dtype
    if memo.nested:
        state.state2, state.offset = memo.state2, memo.offset
    state.packing_format_for_cpu = False
    setattr(state, _MEMO, memo)


def unpack_codes(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The canonical codes [n·k/2] uint8 of a weight of logical ``shape`` [n, k] from bitsandbytes' CPU packing.

    The packing cuts the code matrix into tiles of 32 rows × 2 columns; a tile's 64 codes, in (row, column)
    order, go into 32 bytes, code i in byte i's low nibble and code i + 32 in its high one. Canonical storage
    is row-major, two codes a byte, the first in the high nibble.
    """
    n, k = shape
    tiles = packed.reshape(-1, _TILE_ROWS)  # one tile (32 rows x 2 columns) a row, tiles of a row band in order
    codes = torch.cat((tiles & 0xF, tiles >> 4), dim=1)  # its 64 codes in (row, column) order
    codes = codes.reshape(n // _TILE_ROWS, k // 2, _TILE_ROWS, 2).transpose(1, 2).reshape(-1, 2)  # row-major pairs
    return (codes[:, 0] << 4) | codes[:, 1]


def _scales_from_packed(weight: torch.Tensor) -> CanonicalScales:
    """Scales read back from the packed bf16 ones, for a weight repacked before deltatune saw it (bitsandbytes'
    rounding to bf16 cannot be undone)."""
    state = weight.quant_state
    _log.warning(
        "a 4-bit weight was repacked by bitsandbytes' CPU inference kernel before deltatune wrapped it: its block "
        "scales were rounded to bf16 there and are read back as they are (wrap the model before evaluating it)"
    )
    absmax = state.absmax.t().reshape(-1).float()
    memo = CanonicalScales(
        absmax,
        False,
        None,
        None,
        getattr(state, "original_dtype", torch.float32),
        getattr(state, "original_qshape", torch.Size(((state.shape[0] * state.shape[1] + 1) // 2, 1))),
        getattr(state, "original_storage_type", None) or torch.uint8,
    )
    setattr(state, _MEMO, memo)
    return memo
