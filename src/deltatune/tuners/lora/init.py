"""Weight-aware LoRA initialisations: PiSSA, OLoRA and orthogonal, with peft 0.21's numerics.

Each function takes the base weight W0 laid out [out, in] and returns the starting factors
A [r, in], B [out, r] and, for the methods that move the principal part of W0 into the adapter,
the residual base weight that replaces W0::

    PiSSA  (Meng et al., 2024, arXiv:2404.02948)   W0 = U S Vᵀ (SVD)   B = U_r √(S_r/s)   A = √(S_r/s) V_rᵀ
    OLoRA  (Büyükakyüz, 2024, arXiv:2406.01775)     W0 = Q R    (QR)    B = Q_r            A = R_r
    both:  W0 ← W0 − s · B A      so  W0_new + s · B A = W0: the model's output at step 0 is the base model's.

    orthogonal: A = (G1 Q_odd)ᵀ, B = G2ᵀ Q_even with Q a random r x r orthogonal matrix and G1, G2
    Gaussian; rows of Q are orthogonal, so B A = 0 while neither factor is zero. W0 is kept.

A trained PiSSA/OLoRA adapter only fits its residual base. ``plain_lora`` turns it into an ordinary
rank-2r LoRA for the ORIGINAL base, as peft's ``path_initial_model_for_weight_conversion`` does::

    W0 + s (B A − B0 A0) = W0 + s [B | −B0] [A ; A0]        (A0, B0: the factors at initialisation)

``pissa_niter_<n>`` replaces the full SVD by ``torch.svd_lowrank`` (Halko et al.'s randomised SVD,
n subspace iterations), drawing from torch's global generator exactly as peft does, so the same
seed gives the same factors. Everything is computed in fp32; the residual and the factors are then
rounded to the base weight's dtype, as peft stores them (fp32, fp16 or bf16; anything else, e.g. a
quantised weight, is refused as peft does: initialise on the full-precision model and quantise the
residual afterwards). The caller keeps the factors in its own master dtype.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from deltatune.errors import ConfigError
from deltatune.tuners.lora.config import LoraConfig

# The base weight dtypes peft's PiSSA and OLoRA accept.
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class InitialFactors(NamedTuple):
    """Starting adapter factors, plus the new base weight [out, in] (None when the base is kept)."""

    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    base: torch.Tensor | None


def changes_base(method: str) -> bool:
    """Whether ``method`` replaces the base weight by a residual (PiSSA and OLoRA do)."""
    return method == "olora" or method.startswith("pissa")


def check_initialisable(method: bool | str, base: nn.Module, rank: int) -> None:
    """Refuse, before anything is changed, a weight-based ``method`` that cannot start on layer ``base``."""
    if method in (True, False, "gaussian") or isinstance(base, nn.Embedding):  # embeddings keep theirs, as in peft
        return
    if not isinstance(base, (nn.Linear, Conv1D)):
        raise ConfigError(
            f"init_lora_weights={method!r} works on Linear/Conv1D layers only (as in peft), not on "
            f"{type(base).__name__}; leave this layer out of target_modules or use True"
        )
    if method == "orthogonal" and rank % 2:
        raise ConfigError(f"init_lora_weights='orthogonal' needs an even rank, got r={rank}; use an even r")
    if method != "orthogonal":
        weight = base.weight
        _check_decomposable(method, weight.T if isinstance(base, Conv1D) else weight, rank)


def initial_factors(method: str, weight: torch.Tensor, rank: int, scaling: float) -> InitialFactors:
    """The factors ``method`` ("pissa", "pissa_niter_<n>", "olora" or "orthogonal") starts from.

    ``weight`` is the dense base weight [out, in]; it is read, never written.
    """
    if method == "orthogonal":
        return orthogonal(weight.shape[1], weight.shape[0], rank, weight.dtype, weight.device)
    _check_decomposable(method, weight, rank)
    if method == "olora":
        return olora(weight, rank, scaling)
    niter = re.fullmatch(r"pissa(?:_niter_([1-9][0-9]*))?", method)
    if niter is None:
        raise ConfigError(f"init_lora_weights={method!r} is not a weight-based initialisation")
    return pissa(weight, rank, scaling, int(niter.group(1)) if niter.group(1) else None)


def pissa(weight: torch.Tensor, rank: int, scaling: float, niter: int | None = None) -> InitialFactors:
    """PiSSA: the top-``rank`` singular triplets, split evenly as √S between B and A (full SVD if ``niter`` is None)."""
    w = weight.to(torch.float32)
    if niter is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    else:
        u, s, v = torch.svd_lowrank(w, rank, niter=niter)
        vh = v.t()
    root = torch.sqrt(s / scaling)
    a = root[:, None] * vh
    b = u * root[None, :]
    return _with_residual(w, a, b, scaling, weight.dtype)


def olora(weight: torch.Tensor, rank: int, scaling: float) -> InitialFactors:
    """OLoRA: B = the first ``rank`` columns of Q, A = the first ``rank`` rows of R, W0 = Q R."""
    w = weight.to(torch.float32)
    q, r = torch.linalg.qr(w)
    return _with_residual(w, r[:rank].contiguous(), q[:, :rank].contiguous(), scaling, weight.dtype)


def orthogonal(
    in_features: int, out_features: int, rank: int, dtype: torch.dtype, device: torch.device | None = None
) -> InitialFactors:
    """Orthogonal init: nonzero A and B with B A = 0; draws on the CPU generator in peft's order, rounds to
    ``dtype``."""
    q, _ = torch.linalg.qr(torch.randn(rank, rank))
    q_odd, q_even = q[0::2], q[1::2]  # [r/2, r] each, rows mutually orthogonal
    a = (torch.randn(in_features, rank // 2) @ q_odd).T / 10.0
    b = torch.randn(rank // 2, out_features).T @ q_even / 10.0
    return InitialFactors(_placed(a, dtype, device), _placed(b, dtype, device), None)


def _placed(factor: torch.Tensor, dtype: torch.dtype, device: torch.device | None) -> torch.Tensor:
    return factor.contiguous().to(dtype=dtype, device=device)


def _with_residual(
    w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, dtype: torch.dtype
) -> InitialFactors:
    """The factors rounded to ``dtype`` as peft stores them, and W0 − s · B A (peft's association: (s · B) @ A)
    from the unrounded fp32 factors, in ``dtype``."""
    return InitialFactors(a.to(dtype), b.to(dtype), (w - scaling * b @ a).to(dtype))


def _check_decomposable(method: str, weight: torch.Tensor, rank: int) -> None:
    if weight.dtype not in _FLOAT_DTYPES:
        raise ConfigError(
            f"init_lora_weights={method!r} needs a float32/float16/bfloat16 base weight, got {weight.dtype}; "
            f"initialise on the unquantised model and quantise the residual afterwards"
        )
    if rank > min(weight.shape):
        raise ConfigError(
            f"init_lora_weights={method!r} needs r <= min(in, out) = {min(weight.shape)} for a "
            f"{weight.shape[1]}->{weight.shape[0]} layer, got r={rank}; lower r (or its rank_pattern entry)"
        )


def plain_lora(
    config: LoraConfig, tensors: Mapping[str, torch.Tensor], initial: Mapping[str, torch.Tensor]
) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """A trained PiSSA/OLoRA adapter (``config``, file ``tensors``) as a plain LoRA of rank 2r for the original base.

    ``initial`` holds the same adapter's file tensors right after initialisation, before training.
    The scaling of every module is kept: r and alpha double (alpha grows by √2 under rsLoRA).
    """
    if not isinstance(config, LoraConfig):
        raise ConfigError(f"convert_to_lora_from applies to LoRA adapters only, not {config.peft_type}")
    method = str(config.init_lora_weights)
    if not changes_base(method):
        raise ConfigError(
            f"convert_to_lora_from converts PiSSA/OLoRA adapters, but this one has "
            f"init_lora_weights={config.init_lora_weights!r}, "
            f"which kept the base weights; save it without convert_to_lora_from"
        )
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ConfigError(
            "convert_to_lora_from does not combine use_rslora=True with rank_pattern/alpha_pattern (as in peft); "
            "save the adapter with its residual base instead"
        )
    converted = {}
    for key, tensor in tensors.items():
        if not key.endswith(("lora_A.weight", "lora_B.weight")):
            raise ConfigError(
                f"convert_to_lora_from handles adapters made only of lora_A/lora_B factors, but the file has {key}; "
                f"save the adapter with its residual base instead"
            )
        start = initial.get(key)
        if start is None or start.shape != tensor.shape:
            found = "no tensor" if start is None else f"shape {tuple(start.shape)}"
            raise ConfigError(
                f"convert_to_lora_from: the initial adapter has {found} for {key} (expected {tuple(tensor.shape)}); "
                f"pass the folder saved right after this adapter was created"
            )
        start = start.to(device=tensor.device, dtype=tensor.dtype)
        a_factor = key.endswith("lora_A.weight")
        converted[key] = torch.cat([tensor, start], dim=0) if a_factor else torch.cat([tensor, -start], dim=1)
    widened = dataclasses.replace(
        config,
        init_lora_weights=True,
        r=2 * config.r,
        lora_alpha=config.lora_alpha * (math.sqrt(2) if config.use_rslora else 2),
        rank_pattern={key: 2 * value for key, value in config.rank_pattern.items()},
        alpha_pattern={key: 2 * value for key, value in config.alpha_pattern.items()},
    )
    return widened, converted
