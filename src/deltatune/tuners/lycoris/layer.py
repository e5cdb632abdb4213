"""What LoHa and LoKr layers share: a base layer plus named updates that are built as a whole weight.

Unlike LoRA, a LyCORIS update is not applied factor by factor: each forward pass builds ΔW from the
adapter's factors (the family's ``delta_weight``) and runs the base layer's own operation with W0 + ΔW::

    x ──► the base op (linear / conv) with weight W0 + ΔW and the base's bias ──► y = (W0 + ΔW) x + b

so one wrapper serves ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` (peft's three layer types), and
merging adds ΔW into W0 exactly.

peft runs the op twice, y = W0 x + b + ΔW x. One op with the summed weight gives the same y within float
rounding for one [out, in] addition, where the second op costs a product over every token in the forward
and another in the backward (its input gradient; ΔW's gradient is the same product either way). The
two-op form stays where the sum would change the arithmetic: an input or base in another dtype than the
factors (a bf16 base under fp32 factors), autocast (a bf16 W0 + ΔW would round the update at W0's
scale), or a subclass of a base type with a forward of its own.

While training, ``module_dropout`` skips an adapter's whole update and ``rank_dropout`` zeroes output rows
of ΔW; the random draws come in peft's order (module, then rows), so a seeded forward in training mode
matches peft's.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.kernels.lora_linear import autocast_dtype
from deltatune.tuners.base import DeltaLayer, master_dtype, write_weight
from deltatune.tuners.lycoris.config import LycorisConfig

# The base layer types a LyCORIS update can wrap (as in peft 0.21.2).
LYCORIS_BASES = (nn.Linear, nn.Conv1d, nn.Conv2d)


class LycorisLayer(DeltaLayer):
    """A base layer plus named updates ΔW; subclasses (``LoHaLayer``, ``LoKrLayer``) hold the factors.

    A subclass names its parameter containers (``containers``: one ``nn.ParameterDict`` per peft file key,
    keyed by adapter name), creates and initialises an adapter's factors (``create``) and builds ΔW from
    them (``factor_weight``, laid out like the base weight).
    """

    containers: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Linear | nn.Conv1d | nn.Conv2d) -> None:
        super().__init__(base_layer)
        for container in self.containers:
            setattr(self, container, nn.ParameterDict())
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.rank_dropout: dict[str, float] = {}
        self.rank_dropout_scale: dict[str, bool] = {}
        self.module_dropout: dict[str, float] = {}

    # -- adapter bookkeeping -------------------------------------------------------------
    def add(self, name: str, rank: int, alpha: float, config: LycorisConfig) -> None:
        """Create adapter ``name`` of rank ``rank`` (scale ``alpha / rank``), initialised per ``config``."""
        self.r[name] = rank
        self.alpha[name] = alpha
        self.scaling[name] = alpha / rank
        self.rank_dropout[name] = config.rank_dropout
        self.rank_dropout_scale[name] = getattr(config, "rank_dropout_scale", True)  # LoHa always rescales
        self.module_dropout[name] = config.module_dropout
        self.create(name, rank, config)

    def create(self, name: str, rank: int, config: LycorisConfig) -> None:
        """Make adapter ``name``'s factors (``new_factor``) and initialise them per ``config.init_weights``."""
        raise NotImplementedError

    def new_factor(self, container: str, name: str, shape: tuple[int, ...]) -> None:
        """An uninitialised factor of ``shape`` at ``container[name]``, on the base weight's device."""
        weight = self.base_layer.weight
        dtype = master_dtype(weight.dtype)
        getattr(self, container)[name] = nn.Parameter(torch.empty(shape, device=weight.device, dtype=dtype))

    def delete(self, name: str) -> None:
        self.forget(name)
        for container in self.containers:
            factors = getattr(self, container)
            if name in factors:  # ParameterDict.pop takes no default
                del factors[name]
        tables = (self.r, self.alpha, self.scaling, self.rank_dropout, self.rank_dropout_scale, self.module_dropout)
        for table in tables:
            table.pop(name, None)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.r)

    def adapter_parameters(self, name: str) -> Iterator[tuple[str, nn.Parameter]]:
        """(name relative to this layer, parameter) of adapter ``name``: ``hada_w1_a.<name>``, ..."""
        for container in self.containers:
            factors = getattr(self, container)
            if name in factors:
                yield f"{container}.{name}", factors[name]

    def factors(self, name: str) -> dict[str, nn.Parameter]:
        """Container name -> adapter ``name``'s factor, for the containers that hold one."""
        return {c: getattr(self, c)[name] for c in self.containers if name in getattr(self, c)}

    # -- the update ---------------------------------------------------------------------
    def factor_weight(self, name: str, scale: float) -> torch.Tensor:
        """ΔW of adapter ``name`` from its factors, shaped like the base weight: ``scale`` times the family's
        product, the scale applied to one small factor (not as a pass over the [out, in] product)."""
        raise NotImplementedError

    def delta_weight(self, name: str, rank_dropout: bool = False) -> torch.Tensor:
        """ΔW = ``factor_weight`` at scale alpha / r; with ``rank_dropout``, each output row kept with probability
        1 − p (and, where the family rescales, the kept rows divided by the share kept)."""
        delta = self.factor_weight(name, self.scaling[name])
        if rank_dropout:
            p = self.rank_dropout[name]
            keep = (torch.rand(delta.shape[0]) > p).to(delta.dtype)
            if self.rank_dropout_scale[name]:
                keep = keep / keep.mean()
            delta = delta * keep.view(-1, *[1] * (delta.dim() - 1)).to(delta.device)
        return delta

    def apply_weight(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The base layer's operation (its stride, padding, ...) with ``weight`` and ``bias``."""
        base = self.base_layer
        if isinstance(base, nn.Linear):
            return F.linear(x, weight, bias)
        conv = F.conv1d if isinstance(base, nn.Conv1d) else F.conv2d
        padding = base.padding
        if base.padding_mode != "zeros":  # padded as the base pads, so the forward is the merged layer's
            x = F.pad(x, [p for p in reversed(base.padding) for _ in range(2)], mode=base.padding_mode)
            padding = 0
        return conv(x, weight, bias, base.stride, padding, base.dilation, base.groups)

    # -- merging ------------------------------------------------------------------------
    def merged_weight(self, name: str) -> torch.Tensor:
        """W + ΔW of adapter ``name``, as a new tensor in the base weight's dtype."""
        weight = self.base_layer.weight
        return weight.data + self.delta_weight(name).detach().to(weight.dtype)

    def merge(self, names: list[str]) -> None:
        """W ← W + ΔW for each adapter of ``names`` not merged yet, in order."""
        for name in self.unmerged(names):
            write_weight(self.base_layer.weight, self.merged_weight(name))
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """W ← W − ΔW for every merged adapter, newest first."""
        weight = self.base_layer.weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            write_weight(weight, weight.detach() - self.delta_weight(name).detach().to(weight.dtype))

    # -- forward ------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        deltas = self.step_deltas()
        base = self.base_layer
        if deltas and self.folds(x, deltas, args, kwargs):
            weight = base.weight
            for delta in deltas:
                weight = weight + delta
            return self.apply_weight(x, weight, base.bias)
        result = base(x, *args, **kwargs)
        for delta in deltas:
            result = result + self.apply_weight(x.to(delta.dtype), delta).to(result.dtype)
        return result

    def step_deltas(self) -> list[torch.Tensor]:
        """ΔW of each unmerged active adapter this forward applies: while training, ``module_dropout`` skips an
        adapter and ``rank_dropout`` drops rows, drawn adapter by adapter in peft's order."""
        deltas = []
        for name in self.unmerged_active():
            if self.training and not torch.rand(1) > self.module_dropout[name]:
                continue  # this adapter's update is dropped for this step
            deltas.append(self.delta_weight(name, rank_dropout=self.training and self.rank_dropout[name] > 0))
        return deltas

    def folds(self, x: torch.Tensor, deltas: list[torch.Tensor], args: tuple, kwargs: dict) -> bool:
        """Whether the forward runs as one op with W0 + ΔW (module docstring): the base is exactly a base type,
        called with the input alone, and x, W0 and every ΔW share a dtype with autocast off."""
        weight = self.base_layer.weight
        return (
            type(self.base_layer) in LYCORIS_BASES
            and not args
            and not kwargs
            and x.dtype == weight.dtype
            and all(delta.dtype == weight.dtype for delta in deltas)
            and autocast_dtype(x.device.type) is None
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{name}: r={self.r[name]}, scaling={self.scaling[name]:g}" for name in self.r)


def kaiming(param: nn.Parameter) -> None:
    """``nn.Linear``'s default init (Kaiming-uniform, a = √5), as peft starts LyCORIS factors."""
    nn.init.kaiming_uniform_(param, a=math.sqrt(5))
