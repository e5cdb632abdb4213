"""The one seam between LoRA math and how a base layer stores its weight.

Everything that needs the frozen base weight as numbers (the fused kernels' GEMMs, DoRA's weight
norm, merging, SVD-based initialisations) asks ``dense`` for it, so a stored format other than a
plain tensor (a quantised one) is turned into numbers here and nowhere else, one call at a time:
nothing d x k in the compute dtype has to be kept between forward and backward.
"""

from __future__ import annotations

import torch


def dense(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``weight`` as a plain dense tensor, in ``dtype`` when given (no copy when it already is one)."""
    return weight if dtype is None or weight.dtype == dtype else weight.to(dtype)
