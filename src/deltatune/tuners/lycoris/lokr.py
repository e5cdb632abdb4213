"""LoKr: the update is a Kronecker product of two small factors (Yeh et al., 2023, arXiv:2309.14859)::

    ΔW = s · kron(w1, w2)        W [out, in], out = a · b, in = c · d, w1 [a, c], w2 [b, d (· k…)], s = alpha / r

(a, b) and (c, d) split out and in / groups by ``kron_factors`` (the divisor pair nearest √n, or
``decompose_factor``). Each factor is kept in full, or as a rank-r product where that is smaller than half
its larger side: ``lokr_w2_a @ lokr_w2_b`` when r < max(b, d) / 2, ``lokr_w1_a @ lokr_w1_b`` when also
``decompose_both`` and r < max(a, c) / 2 — exactly peft's choice, since the file holds whichever it made.
A convolution's kernel rides on w2: in full [b, d, k…], as a product with the kernel in its columns, or
(``use_effective_conv2d``) as a Tucker form around ``lokr_t2`` [r, r, k0, k1].

``init_weights=True`` starts w1 (or ``lokr_w1_a``) at zero, "lycoris" w2 (or ``lokr_w2_b``), False nothing.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from deltatune.tuners.lycoris.config import LycorisConfig
from deltatune.tuners.lycoris.layer import LycorisLayer, kaiming
from deltatune.tuners.lycoris.loha import kernel_size, tucker_core_shape, tucker_kernel, uses_tucker


def kron_factors(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m · n = ``dimension``, as peft's ``factorization`` splits it.

    ``factor`` dividing ``dimension``: (factor, dimension / factor), in that order. Otherwise the divisors of
    ``dimension`` are walked upwards from 1 (only those ≤ ``factor`` when it is positive) while the smaller
    side is below the larger, and the last pair reached is returned smaller side first: 12 → (3, 4),
    128 → (8, 16), a prime p → (1, p).
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    small, large = 1, dimension
    while small < large:
        divisor = next(d for d in range(small + 1, dimension + 1) if dimension % d == 0)
        if divisor > limit:
            break
        small, large = divisor, dimension // divisor
    return min(small, large), max(small, large)


class LoKrLayer(LycorisLayer):
    """LoKr on ``nn.Linear``, ``nn.Conv1d`` or ``nn.Conv2d``."""

    containers = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")

    def create(self, name: str, rank: int, config: LycorisConfig) -> None:
        base = self.base_layer
        out_features, in_features = base.weight.shape[:2]  # a convolution's is in / groups
        kernel = kernel_size(base)
        (a, b), (c, d) = (kron_factors(n, config.decompose_factor) for n in (out_features, in_features))
        if config.decompose_both and rank < max(a, c) / 2:
            self.new_factor("lokr_w1_a", name, (a, rank))
            self.new_factor("lokr_w1_b", name, (rank, c))
        else:
            self.new_factor("lokr_w1", name, (a, c))
        if rank >= max(b, d) / 2:
            self.new_factor("lokr_w2", name, (b, d, *kernel))
        elif uses_tucker(base, config):
            self.new_factor("lokr_t2", name, tucker_core_shape(rank, kernel))
            self.new_factor("lokr_w2_a", name, (rank, b))
            self.new_factor("lokr_w2_b", name, (rank, d))
        else:
            self.new_factor("lokr_w2_a", name, (b, rank))
            self.new_factor("lokr_w2_b", name, (rank, d * math.prod(kernel)))
        self._initialise(name, config.init_weights)

    def _initialise(self, name: str, init: bool | str) -> None:
        """Kaiming-uniform everywhere except the zero factor ``init`` names, drawn in peft's order (so a
        seeded start is peft's)."""
        zero = {True: ("lokr_w1", "lokr_w1_a"), "lycoris": ("lokr_w2", "lokr_w2_b"), False: ()}[init]
        with torch.no_grad():
            for container in self.containers:
                factors = getattr(self, container)
                if name in factors:
                    if container in zero:
                        nn.init.zeros_(factors[name])
                    else:
                        kaiming(factors[name])

    def factor_weight(self, name: str, scale: float) -> torch.Tensor:
        factors = self.factors(name)
        w1 = factors["lokr_w1"] if "lokr_w1" in factors else factors["lokr_w1_a"] @ factors["lokr_w1_b"]
        w1 = w1 * scale  # on the small factor [a, c], not on the [out, in] product
        if "lokr_w2" in factors:
            w2 = factors["lokr_w2"]
        elif "lokr_t2" in factors:
            w2 = tucker_kernel(factors["lokr_t2"], factors["lokr_w2_a"], factors["lokr_w2_b"])
        else:
            w2 = factors["lokr_w2_a"] @ factors["lokr_w2_b"]
        if w2.dim() == 4:  # a 2-d kernel (or a Tucker core's): w1 gets unit kernel dims
            w1 = w1[:, :, None, None]
        # torch.kron pads the smaller side's shape with leading 1s (a full 1-d kernel w2 [b, d, k]), as in peft
        return torch.kron(w1, w2.contiguous()).reshape(self.base_layer.weight.shape)
