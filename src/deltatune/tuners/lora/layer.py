"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., 2021, arXiv:2106.09685).

A frozen weight W0 [out, in] gets a trainable low-rank update::

        x ──► W0 (frozen) ─────────────────────┐
        │                                      (+) ──► y = W0 x + s · B A dropout(x)
        └──► dropout ──► A [r, in] ──► B [out, r]

with B initialised to zero (so training starts at exactly the base model) and
s = lora_alpha / r (``lora_alpha / sqrt(r)`` for rsLoRA). Only A and B train: 2·r·d parameters
per square d x d projection instead of d². Merging adds s · B A into W0, so inference costs
nothing extra; unmerging subtracts it again.

One wrapper class per base layer type (``nn.Linear`` and GPT-2 ``Conv1D`` here; ``nn.Embedding`` in
``embedding.py``, convolutions in ``conv.py``); each holds any number of named adapters over ONE shared base
layer; DoRA, the one variant, is ``dora.py``. Parameter
names follow peft (``lora_A.<adapter>.weight``, ``lora_embedding_A.<adapter>``) so that the key
mapping to peft's files is a pure rename.

``LoraLinear`` trains through one fused autograd function (``deltatune.kernels.lora_linear``:
the LoRA terms are added into the base GEMM's output, only x and the rank-r products are
saved). Where it does not apply (hooks or a subclass on the base layer, a trainable base
weight, dropout under ``torch.compile``) the layer takes the plain path below, which is also
available on demand: ``LoraLinear.fused = False`` for every layer, ``layer.fused = False`` for one.
The projections of a gated MLP go one level further, as one function (``lora_mlp.py``).
Injection, merging and removal are the tuner's (``lora_tuner.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from deltatune.compat.torch import has_hooks
from deltatune.kernels import LoraFactors, fused_lora_linear
from deltatune.kernels.base_weight import QUANTIZED_LINEARS, dense, logical_shape
from deltatune.kernels.dora_linear import fused_dora_linear
from deltatune.kernels.dora_linear import weight_norm as dora_weight_norm
from deltatune.kernels.lora_linear import autocast_dtype
from deltatune.tuners.base import DeltaLayer, master_dtype, write_weight
from deltatune.tuners.lora.config import LoraConfig
from deltatune.tuners.lora.dora import DoraVariant
from deltatune.tuners.lora.fallback import linear_fallback_reason, log_fallback
from deltatune.tuners.lora.init import check_initialisable, initial_factors
from deltatune.tuners.lora.rows import add_per_row, forget_stack


class LoraLayer(DoraVariant, DeltaLayer):
    """A base layer plus named low-rank updates; subclasses define the update's shape and math."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.init_dora()

    # -- adapter bookkeeping -------------------------------------------------------------
    def add(self, name: str, rank: int, alpha: float, config: LoraConfig) -> None:
        """Create adapter ``name`` with rank ``rank`` and initialise it per ``config``."""
        forget_stack(self)
        self.r[name] = rank
        self.lora_alpha[name] = alpha
        self.scaling[name] = config.scaling(rank, alpha)
        self.lora_dropout[name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        weight = self.base_weight
        dtype = master_dtype(weight.dtype)
        self._create(name, rank, weight.device, dtype)
        self._initialise(name, config.init_lora_weights)
        if config.use_dora:
            self.add_magnitude(name, dtype)

    def delete(self, name: str) -> None:
        forget_stack(self)
        self.forget(name)
        for container in [*self._containers(), self.lora_dropout, self.lora_magnitude_vector]:
            if name in container:  # ModuleDict/ParameterDict.pop takes no default
                del container[name]
        for table in (self.r, self.lora_alpha, self.scaling):
            table.pop(name, None)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.r)

    @property
    def base_weight(self) -> nn.Parameter:
        """The frozen weight the updates add to (``base_layer.weight``; a layer whose base keeps it
        elsewhere, such as an attention's ``in_proj_weight``, says so here)."""
        return self.base_layer.weight

    def adapter_parameters(self, name: str) -> Iterator[tuple[str, nn.Parameter]]:
        """(name relative to this layer, parameter) of adapter ``name``."""
        for prefix, container in [*self._named_containers(), ("lora_magnitude_vector", self.lora_magnitude_vector)]:
            if name in container:
                item = container[name]
                if isinstance(item, nn.Parameter):
                    yield f"{prefix}.{name}", item
                else:
                    for pname, param in item.named_parameters():
                        yield f"{prefix}.{name}.{pname}", param

    # -- merging ------------------------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        """s · B A laid out like the base weight, in ``merge_dtype``."""
        raise NotImplementedError

    @property
    def merge_dtype(self) -> torch.dtype:
        """The dtype updates are merged in: the base weight's, or fp32 where it is stored quantised (as integers)."""
        dtype = self.base_weight.dtype
        return dtype if dtype.is_floating_point else torch.float32

    def merged_weight(self, name: str, dora_scale: torch.Tensor | None = None) -> torch.Tensor:
        """The base weight with adapter ``name`` merged in, as a new tensor: W + s·BA, or for DoRA
        ``dora_scale`` ⊙ (W + s·BA) per unit (row) of ``rows``, the scale m / ||W0 + s·BA|| by default."""
        merged = dense(self.base_weight.data) + self.delta_weight(name)
        if name in self.lora_magnitude_vector:
            self.scale_rows(merged, self.dora_scale(name) if dora_scale is None else dora_scale)
        return merged

    def check_mergeable(self) -> None:
        """Raise ``MergeError`` when this layer's updates cannot be written into its weight (the tuner asks
        every layer before it merges any; ``merge`` asks again)."""

    def merge(self, names: list[str]) -> None:
        """W ← ``merged_weight(name)`` for each adapter in ``names`` not merged yet, in order.

        As in peft, a DoRA adapter's norm is taken over the unmerged base weight, so that merging in
        turn computes what the forward pass computes with the adapters applied in turn.
        """
        pending = self.unmerged(names)
        if pending:
            self.check_mergeable()
            forget_stack(self)  # DoRA's stacked scales read the base weight
        base = self.unmerged_base_weight() if any(n in self.lora_magnitude_vector for n in pending) else None
        for name in pending:
            scale = None
            if name in self.lora_magnitude_vector:  # kept as merged, so that unmerge inverts it exactly
                scale = self._merged_dora_scales[name] = self.dora_scale(name, base)
            write_weight(self.base_weight, self.merged_weight(name, scale))
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """W ← W − s·BA (DoRA: W / scale − s·BA) for every merged adapter, newest first."""
        while self.merged_adapters:
            name = self.merged_adapters[-1]
            write_weight(self.base_weight, self._without_merged(dense(self.base_weight.data), name))
            self.merged_adapters.pop()
            self._merged_dora_scales.pop(name, None)

    def unmerged_base_weight(self) -> torch.Tensor:
        """W0: the base weight with every merged adapter taken out again (a new tensor)."""
        weight = dense(self.base_weight.data).clone()  # merging writes into the base weight's storage
        for name in reversed(self.merged_adapters):
            weight = self._without_merged(weight, name)
        return weight

    def _without_merged(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        """``weight`` with merged adapter ``name`` taken out, as a new tensor."""
        if name in self._merged_dora_scales:
            weight = self.scale_rows(weight.clone(), 1 / self._merged_dora_scales[name])
        return weight - self.delta_weight(name)

    # -- forward ------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.add_adapters(x, self.base_layer(x, *args, **kwargs))

    def add_adapters(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``result`` (the base layer's output for ``x``) with the adapters' terms added, each row's own in a mixed
        batch: the forward after the base layer (a joined product, ``joined.py``, computes the base output)."""
        if self.row_groups is not None and not self.disabled:
            return add_per_row(self, x, result, self.row_groups)
        for name in self.unmerged_active():
            lora = self.lora_output(x, name).to(result.dtype)
            result = self.dora_output(result, lora, name) if name in self.lora_magnitude_vector else result + lora
        return result

    def lora_output(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """s · B A dropout(x) for adapter ``name``."""
        raise NotImplementedError

    # -- per-type hooks -----------------------------------------------------------------
    def _named_containers(self) -> list[tuple[str, nn.ModuleDict | nn.ParameterDict]]:
        raise NotImplementedError

    def _containers(self) -> list[nn.ModuleDict | nn.ParameterDict]:
        return [container for _, container in self._named_containers()]

    def _create(self, name: str, rank: int, device: torch.device, dtype: torch.dtype) -> None:
        raise NotImplementedError

    def _initialise(self, name: str, init: bool | str) -> None:
        """A: Kaiming-uniform (as nn.Linear) or N(0, 1/r); B: zero. ``False`` keeps both modules' own random init.

        PiSSA, OLoRA and orthogonal (``lora_init.py``) apply to ``LoraLinear`` only, as in peft;
        PiSSA and OLoRA also replace the base weight by the residual W0 − s · B A. As in peft, the
        factors are then rounded to a half-precision base's dtype (the master copy stays fp32).
        """
        lora_a, lora_b = self.lora_A[name].weight, self.lora_B[name].weight
        base = self.base_weight
        check_initialisable(init, self.base_layer, self.r[name])
        if init not in (True, False, "gaussian"):
            weight = dense(base)
            start = initial_factors(init, weight.T if self.fan_in_fan_out else weight, self.r[name], self.scaling[name])
            with torch.no_grad():
                lora_a.copy_(start.a)
                lora_b.copy_(start.b)
                if start.base is not None:
                    base.copy_(start.base.T if self.fan_in_fan_out else start.base)
        elif init is not False:
            if init == "gaussian":
                nn.init.normal_(lora_a, std=1 / self.r[name])
            else:
                nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))
            nn.init.zeros_(lora_b)
        if base.dtype.is_floating_point and base.dtype != lora_a.dtype:
            with torch.no_grad():
                for factor in (lora_a, lora_b):
                    factor.copy_(factor.to(base.dtype))

    def extra_repr(self) -> str:
        return ", ".join(f"{name}: r={self.r[name]}, scaling={self.scaling[name]:g}" for name in self.r)


class LoraBias:
    """peft's ``lora_bias``, mixed into the layers whose B is a module (Linear, convolutions): B gets a
    trainable bias b, zero at start, so the update is s · (B A x + b); merging adds s · b to the base bias."""

    def add(self, name: str, rank: int, alpha: float, config: LoraConfig) -> None:
        super().add(name, rank, alpha, config)
        if config.lora_bias:
            weight = self.lora_B[name].weight
            bias = torch.zeros(weight.shape[0], device=weight.device, dtype=weight.dtype)
            self.lora_B[name].bias = nn.Parameter(bias)

    def merge_bias(self, name: str, sign: int) -> None:
        """Base bias += sign · s · b for adapter ``name``; nothing when its B has no bias."""
        bias = self.lora_B[name].bias
        if bias is not None:
            base_bias = self.base_layer.bias
            write_weight(
                base_bias, base_bias.detach() + (sign * self.scaling[name] * bias.detach()).to(base_bias.dtype)
            )

    def merge(self, names: list[str]) -> None:
        pending = self.unmerged(names)
        super().merge(names)
        for name in pending:
            self.merge_bias(name, 1)

    def unmerge(self) -> None:
        merged = list(self.merged_adapters)
        super().unmerge()
        for name in merged:
            self.merge_bias(name, -1)


class LoraLinear(LoraBias, LoraLayer):
    """LoRA on ``nn.Linear`` (weight [out, in]) or GPT-2 ``Conv1D`` (weight [in, out], fan_in_fan_out).

    Runtime options (class attributes; set on an instance to change one layer), never saved:
    ``fused`` (default True) trains through ``deltatune.kernels.lora_linear``; ``fuse_mlp`` (default
    True, with ``fused``) lets a gated MLP run its three projections as one function
    (``deltatune.tuners.lora.mlp``); ``compile_mlp`` (default None: on CUDA only) compiles that
    function's elementwise steps into single kernels; ``adapter_dtype``
    (default None: the activation dtype) is the dtype of the rank-r math; ``torch.float32``
    keeps it all in fp32 for bf16/fp16 models.
    """

    fused: bool = True
    fuse_mlp: bool = True
    compile_mlp: bool | None = None
    adapter_dtype: torch.dtype | None = None

    def __init__(self, base_layer: nn.Linear | Conv1D) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        shape = logical_shape(base_layer.weight)  # a 4-bit weight's own .shape is its packed storage
        in_features, out_features = shape[::-1] if not self.fan_in_fan_out else shape
        self.in_features, self.out_features = in_features, out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def _named_containers(self):
        return [("lora_A", self.lora_A), ("lora_B", self.lora_B)]

    def _create(self, name, rank, device, dtype):
        self.lora_A[name] = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B[name] = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=dtype)

    def delta_weight(self, name: str) -> torch.Tensor:
        delta = (self.lora_B[name].weight @ self.lora_A[name].weight) * self.scaling[name]
        delta = delta.T if self.fan_in_fan_out else delta
        return delta.to(self.merge_dtype)

    def lora_output(self, x: torch.Tensor, name: str) -> torch.Tensor:
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        x = self.lora_dropout[name](x.to(lora_a.weight.dtype))
        return lora_b(lora_a(x)) * self.scaling[name]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.row_groups is not None:  # a mixed batch (first: a decoding step checks nothing else)
            return super().forward(x, *args, **kwargs)
        names = self.unmerged_active()
        if not names or args or kwargs or x.shape[-1] != self.in_features:
            return super().forward(x, *args, **kwargs)
        if not self.fusable(x, names):
            if self.fused and self.training and torch.is_grad_enabled() and not torch.compiler.is_compiling():
                has_b_bias = any(self.lora_B[name].bias is not None for name in names)
                log_fallback(
                    f"LoRA on {type(self.base_layer).__name__}", linear_fallback_reason(self.base_layer, x, has_b_bias)
                )
            return super().forward(x, *args, **kwargs)
        base = self.base_layer
        fused = fused_dora_linear if any(name in self.lora_magnitude_vector for name in names) else fused_lora_linear
        return fused(x, base.weight, base.bias, self.factors(names), self.fan_in_fan_out, self.adapter_dtype)

    def factors(self, names: list[str]) -> list[LoraFactors]:
        """The adapters ``names`` as the fused functions take them (dropout p only while training)."""
        return [
            LoraFactors(
                self.lora_A[name].weight,
                self.lora_B[name].weight,
                self.scaling[name],
                self._dropout_p(name),
                self.lora_magnitude_vector[name] if name in self.lora_magnitude_vector else None,
                self.weight_norm(name) if name in self.lora_magnitude_vector else None,
            )
            for name in names
        ]

    def rows(self, weight: torch.Tensor) -> torch.Tensor:
        """[out, in]: ``nn.Linear``'s own layout, the transpose of ``Conv1D``'s."""
        return weight.t() if self.fan_in_fan_out else weight

    def weight_norm(self, name: str, weight: torch.Tensor | None = None) -> torch.Tensor:
        """||W + s·BA|| per output row from rank-r products (``kernels.dora_linear.weight_norm``), fp32."""
        weight = self.base_weight if weight is None else weight
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        return dora_weight_norm(weight, a, b, self.scaling[name], self.fan_in_fan_out)

    def _dropout_p(self, name: str) -> float:
        dropout = self.lora_dropout[name]
        return dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0

    def fusable(self, x: torch.Tensor, names: list[str]) -> bool:
        """The fused function reproduces the base layer exactly: a plain, hook-free, frozen Linear/Conv1D."""
        return (
            self.fused
            and self.row_groups is None
            and is_frozen_plain_linear(self.base_layer, x)
            and not (torch.compiler.is_compiling() and any(self._dropout_p(name) > 0 for name in names))
            and not any(self.lora_B[name].bias is not None for name in names)  # the fused function has no B bias
        )


def is_frozen_plain_linear(module: nn.Module, x: torch.Tensor) -> bool:
    """``module`` is exactly ``nn.Linear``/``Conv1D`` with a frozen weight, no hooks, and ``x``'s dtype (or autocast);
    or exactly a bitsandbytes 4-/8-bit Linear, frozen, hook-free, computing in ``x``'s dtype, autocast off."""
    if type(module).__name__ in QUANTIZED_LINEARS:
        return (
            not has_hooks(module)
            and not module.weight.requires_grad
            and getattr(module, "compute_dtype", None) in (None, x.dtype)
            and autocast_dtype(x.device.type) is None
        )
    return (
        type(module) in (nn.Linear, Conv1D)
        and not has_hooks(module)
        and not module.weight.requires_grad
        and (x.dtype == module.weight.dtype or autocast_dtype(x.device.type) is not None)
    )
