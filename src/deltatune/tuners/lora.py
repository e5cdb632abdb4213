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
``lora_embedding.py``, convolutions in ``lora_conv.py``); each holds any number of named adapters over ONE shared base layer. Parameter
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

from ..config import LoraConfig
from ..errors import MergeError
from ..kernels import LoraFactors, fused_lora_linear
from ..kernels.lora_linear import autocast_dtype


class LoraLayer(nn.Module):
    """A base layer plus named low-rank updates; subclasses define the update's shape and math."""

    is_delta_layer = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False

    # -- adapter bookkeeping -------------------------------------------------------------
    def add(self, name: str, rank: int, alpha: float, config: LoraConfig) -> None:
        """Create adapter ``name`` with rank ``rank`` and initialise it per ``config``."""
        self.r[name] = rank
        self.lora_alpha[name] = alpha
        self.scaling[name] = config.scaling(rank, alpha)
        self.lora_dropout[name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        weight = self.base_layer.weight
        # Master weights stay fp32 when the base is half precision (peft does the same).
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        self._create(name, rank, weight.device, dtype)
        self._initialise(name, config.init_lora_weights)

    def delete(self, name: str) -> None:
        if name in self.merged_adapters:
            raise MergeError(f"adapter {name!r} is merged into the base weights; unmerge it before deleting it")
        for container in [*self._containers(), self.lora_dropout]:
            if name in container:  # ModuleDict/ParameterDict.pop takes no default
                del container[name]
        for table in (self.r, self.lora_alpha, self.scaling):
            table.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    @property
    def adapter_names(self) -> list[str]:
        return list(self.r)

    def adapter_parameters(self, name: str) -> Iterator[tuple[str, nn.Parameter]]:
        """(name relative to this layer, parameter) of adapter ``name``."""
        for prefix, container in self._named_containers():
            if name in container:
                item = container[name]
                if isinstance(item, nn.Parameter):
                    yield f"{prefix}.{name}", item
                else:
                    for pname, param in item.named_parameters():
                        yield f"{prefix}.{name}.{pname}", param

    # -- merging ------------------------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        """s · B A laid out like the base weight, in the base weight's dtype."""
        raise NotImplementedError

    def unmerged(self, names: list[str]) -> list[str]:
        """The adapters of ``names`` this layer holds and has not merged yet."""
        return [name for name in names if name in self.r and name not in self.merged_adapters]

    def merge(self, names: list[str]) -> None:
        """W0 += s · B A for each adapter in ``names`` not merged yet."""
        for name in self.unmerged(names):
            self.base_layer.weight.data += self.delta_weight(name)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """W0 -= s · B A for every merged adapter, newest first."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            self.base_layer.weight.data -= self.delta_weight(name)

    # -- forward ------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for name in self.unmerged_active():
            result = result + self.lora_output(x, name).to(result.dtype)
        return result

    def unmerged_active(self) -> list[str]:
        """The adapters whose update the forward pass adds: active, not merged, layer not disabled."""
        if self.disabled:
            return []
        return [name for name in self.active_adapters if name in self.r and name not in self.merged_adapters]

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
        """A: Kaiming-uniform (as nn.Linear) or N(0, 1/r); B: zero. ``False`` leaves both random."""
        lora_a, lora_b = self.lora_A[name].weight, self.lora_B[name].weight
        if init is False:
            nn.init.kaiming_uniform_(lora_b, a=math.sqrt(5))
            return
        if init == "gaussian":
            nn.init.normal_(lora_a, std=1 / self.r[name])
        else:
            nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))
        nn.init.zeros_(lora_b)

    def extra_repr(self) -> str:
        return ", ".join(f"{name}: r={self.r[name]}, scaling={self.scaling[name]:g}" for name in self.r)


class LoraLinear(LoraLayer):
    """LoRA on ``nn.Linear`` (weight [out, in]) or GPT-2 ``Conv1D`` (weight [in, out], fan_in_fan_out).

    Runtime options (class attributes; set on an instance to change one layer), never saved:
    ``fused`` (default True) trains through ``deltatune.kernels.lora_linear``; ``fuse_mlp`` (default
    True, with ``fused``) lets a gated MLP run its three projections as one function
    (``deltatune.tuners.lora_mlp``); ``compile_mlp`` (default None: on CUDA only) compiles that
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
        in_features, out_features = base_layer.weight.shape[::-1] if not self.fan_in_fan_out else base_layer.weight.shape
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
        return delta.to(self.base_layer.weight.dtype)

    def lora_output(self, x: torch.Tensor, name: str) -> torch.Tensor:
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        x = self.lora_dropout[name](x.to(lora_a.weight.dtype))
        return lora_b(lora_a(x)) * self.scaling[name]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        names = self.unmerged_active()
        if not names or args or kwargs or x.shape[-1] != self.in_features or not self.fusable(x, names):
            return super().forward(x, *args, **kwargs)
        base = self.base_layer
        return fused_lora_linear(x, base.weight, base.bias, self.factors(names), self.fan_in_fan_out, self.adapter_dtype)

    def factors(self, names: list[str]) -> list[LoraFactors]:
        """The adapters ``names`` as the fused functions take them (dropout p only while training)."""
        return [
            LoraFactors(self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name], self._dropout_p(name))
            for name in names
        ]

    def _dropout_p(self, name: str) -> float:
        dropout = self.lora_dropout[name]
        return dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0

    def fusable(self, x: torch.Tensor, names: list[str]) -> bool:
        """The fused function reproduces the base layer exactly: a plain, hook-free, frozen Linear/Conv1D."""
        return (
            self.fused
            and is_frozen_plain_linear(self.base_layer, x)
            and not (torch.compiler.is_compiling() and any(self._dropout_p(name) > 0 for name in names))
        )


def is_frozen_plain_linear(module: nn.Module, x: torch.Tensor) -> bool:
    """``module`` is exactly ``nn.Linear``/``Conv1D`` with a frozen weight, no hooks, and ``x``'s dtype (or autocast)."""
    return (
        type(module) in (nn.Linear, Conv1D)
        and not has_hooks(module)
        and not module.weight.requires_grad
        and (x.dtype == module.weight.dtype or autocast_dtype(x.device.type) is not None)
    )


def has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` does more than its class's ``forward``: hooks (its own or global), a patched forward."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or "forward" in vars(module)
        or nn.modules.module._global_forward_hooks
        or nn.modules.module._global_forward_pre_hooks
        or nn.modules.module._global_backward_hooks
        or nn.modules.module._global_backward_pre_hooks
    )
