"""Bottleneck adapters (Houlsby et al., 2019, arXiv:1902.00751; Pfeiffer et al., 2021, arXiv:2005.00247).

A small residual module is placed at the end of a sub-block (attention or MLP) of every layer::

    x ──► out_proj (frozen) ──► y ──────────────────────────────────────────────────────────(+) ──► y'
                                │                                                            ▲
                                └──► down [m, d] ──► act ──► up [d, m] ──► dropout ──► · s ──┘

    y' = y + s · dropout(up(act(down(y))))

d is the sub-block's output width and m << d (``d // reduction_factor`` or ``bottleneck_size``);
down and up have biases, so a site trains 2·d·m + d + m parameters. ``up`` starts at zero, so the
adapted model computes exactly the base model until training moves it. The non-linearity means
the adapter cannot be folded into any weight: there is no merge.

Placement wraps the projection that ends each sub-block (found per architecture in ``PLACEMENTS``),
so no transformers code is edited: "houlsby" adapts the attention output and the MLP output of every
layer, "pfeiffer" only the MLP output. In BERT-style models that projection comes before dropout and
``LayerNorm(h + residual)``, where Houlsby et al. put the adapter. Several named adapters share one
wrapper; active adapters each see the same y and their outputs are summed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.pytorch_utils import Conv1D

from deltatune.errors import MergeError, TargetError
from deltatune.tuners.base import Tuner, master_dtype, replace_module
from deltatune.tuners.bottleneck.config import BottleneckConfig
from deltatune.tuners.targeting import LINEAR_TYPES, walk_modules


class Sites(NamedTuple):
    """The projections that end a layer's attention block and its MLP, named relative to the layer."""

    attention: str
    mlp: str


_O_DOWN = Sites("self_attn.o_proj", "mlp.down_proj")
_BERT = Sites("attention.output.dense", "output.dense")
_DENSE_4H = Sites("self_attention.dense", "mlp.dense_4h_to_h")
_OUT_FC = Sites("attn.out_proj", "mlp.fc_out")

# config.model_type -> sites. Add an entry here for an architecture deltatune does not know yet.
PLACEMENTS: dict[str, Sites] = {
    **dict.fromkeys(
        (
            "llama",
            "mistral",
            "qwen2",
            "qwen3",
            "gemma",
            "gemma2",
            "gemma3_text",
            "olmo",
            "olmo2",
            "phi3",
            "stablelm",
            "cohere",
            "granite",
            "smollm3",
        ),
        _O_DOWN,
    ),
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra"), _BERT),
    **dict.fromkeys(("falcon", "bloom"), _DENSE_4H),
    **dict.fromkeys(("gptj", "codegen"), _OUT_FC),
    "gpt2": Sites("attn.c_proj", "mlp.c_proj"),
    "gpt_bigcode": Sites("attn.c_proj", "mlp.c_proj"),
    "gpt_neo": Sites("attn.attention.out_proj", "mlp.c_proj"),
    "gpt_neox": Sites("attention.dense", "mlp.dense_4h_to_h"),
    "phi": Sites("self_attn.dense", "mlp.fc2"),
    "opt": Sites("self_attn.out_proj", "fc2"),
    "starcoder2": Sites("self_attn.o_proj", "mlp.c_proj"),
    "distilbert": Sites("attention.out_lin", "ffn.lin2"),
}


def site_suffixes(sites: Sites, placement: str) -> tuple[str, ...]:
    """The layer-relative names adapted by ``placement``: both sites for "houlsby", the MLP for "pfeiffer"."""
    return (sites.attention, sites.mlp) if placement == "houlsby" else (sites.mlp,)


def site_layer(name: str, suffix: str) -> int | None:
    """The layer index when ``name`` is ``<...>.<layer list>.<index>.<suffix>``, else None.

    Exact: ``bert.encoder.layer.3.output.dense`` is the MLP site of layer 3, while
    ``bert.encoder.layer.3.attention.output.dense`` is not (its suffix is longer).
    """
    match = re.fullmatch(rf"(?:.*\.)?[^.]+\.(?P<index>\d+)\.{re.escape(suffix)}", name)
    return int(match["index"]) if match else None


def model_sites(model: nn.Module) -> Sites:
    """The sites for ``model``: by ``config.model_type``, else the first known pair its layers hold."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in PLACEMENTS:
        return PLACEMENTS[model_type]
    linear_names = [name for name, module in walk_modules(model) if isinstance(module, LINEAR_TYPES)]
    for sites in dict.fromkeys(PLACEMENTS.values()):
        if all(any(site_layer(name, suffix) is not None for name in linear_names) for suffix in sites):
            return sites
    in_layers = (re.fullmatch(r"(?:.*\.)?[^.]+\.\d+\.(?P<rest>.+)", name) for name in linear_names)
    found = sorted({match["rest"] for match in in_layers if match})
    raise TargetError(
        f"no bottleneck placement for model_type={model_type!r}: none of the known attention/MLP output "
        f"projections is in its layers, which hold {', '.join(found) or 'no linear modules'}; register the two "
        f"that end attention and MLP, e.g. deltatune.tuners.bottleneck.tuner.PLACEMENTS[{model_type!r}] = "
        f"Sites('attn.out', 'mlp.out')"
    )


def find_sites(model: nn.Module, config: BottleneckConfig) -> list[str]:
    """Full names of the modules ``config`` adapts in ``model``, in model order."""
    suffixes = site_suffixes(model_sites(model), config.placement)
    wanted = config.layers_to_transform
    layers = None if wanted in (None, []) else {wanted} if isinstance(wanted, int) else set(wanted)
    indexed = []  # (name, layer index) of every site; a name matches at most one suffix exactly
    for name, _ in walk_modules(model):
        for suffix in suffixes:
            index = site_layer(name, suffix)
            if index is not None:
                indexed.append((name, index))
    if not indexed:
        raise TargetError(
            f"this {type(model).__name__} has no module named <layers>.<index>.{' or '.join(suffixes)}; "
            f"fix the PLACEMENTS entry of its model_type in deltatune.tuners.bottleneck.tuner"
        )
    selected = [name for name, index in indexed if layers is None or index in layers]
    if not selected:
        present = sorted({index for _, index in indexed})
        raise TargetError(
            f"layers_to_transform={wanted!r} selects none of this model's layers {present}; pick indices from that list"
        )
    return selected


def output_features(name: str, module: nn.Module) -> int:
    """d, the output width of the projection an adapter follows (``nn.Linear`` or GPT-2 ``Conv1D``)."""
    if isinstance(module, Conv1D):
        return module.weight.shape[1]
    if isinstance(module, nn.Linear):
        return module.out_features
    raise TargetError(
        f"bottleneck site {name!r} is a {type(module).__name__}; an adapter follows an nn.Linear or Conv1D output "
        f"projection: fix its entry in deltatune.tuners.bottleneck.tuner.PLACEMENTS"
    )


class BottleneckLayer(nn.Module):
    """An output projection followed by named residual bottlenecks: ``y + Σ s · dropout(up(act(down(y))))``."""

    is_delta_layer = True

    def __init__(self, base_layer: nn.Module, features: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.features = features
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.adapter_act = nn.ModuleDict()
        self.adapter_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.disabled = False

    def add(self, name: str, width: int, config: BottleneckConfig) -> None:
        """Create adapter ``name`` with bottleneck width ``width`` (m), initialised per ``config``."""
        weight = self.base_layer.weight
        dtype = master_dtype(weight.dtype)
        self.adapter_down[name] = nn.Linear(self.features, width, device=weight.device, dtype=dtype)
        self.adapter_up[name] = nn.Linear(width, self.features, device=weight.device, dtype=dtype)
        self.adapter_act[name] = ACT2FN[config.non_linearity]
        self.adapter_dropout[name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scaling[name] = config.scaling
        self._initialise(name, config.init_weights)

    def _initialise(self, name: str, init: str) -> None:
        """down: Kaiming-uniform or N(0, 0.01²) truncated at ±0.02; its bias, up and up's bias: zero."""
        down, up = self.adapter_down[name], self.adapter_up[name]
        if init == "normal":
            nn.init.trunc_normal_(down.weight, std=0.01, a=-0.02, b=0.02)
        else:
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
        for tensor in (down.bias, up.weight, up.bias):
            nn.init.zeros_(tensor)

    def delete(self, name: str) -> None:
        for container in (self.adapter_down, self.adapter_up, self.adapter_act, self.adapter_dropout):
            if name in container:  # ModuleDict.pop takes no default
                del container[name]
        self.scaling.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    @property
    def adapter_names(self) -> list[str]:
        return list(self.scaling)

    def adapter_parameters(self, name: str) -> Iterator[tuple[str, nn.Parameter]]:
        """(name relative to this layer, parameter) of adapter ``name``: down and up, weights and biases."""
        for prefix, container in (("adapter_down", self.adapter_down), ("adapter_up", self.adapter_up)):
            if name in container:
                for pname, param in container[name].named_parameters():
                    yield f"{prefix}.{name}.{pname}", param

    def bottleneck(self, y: torch.Tensor, name: str) -> torch.Tensor:
        """s · dropout(up(act(down(y)))) for adapter ``name``, in the adapter's dtype."""
        down = self.adapter_down[name]
        hidden = self.adapter_act[name](down(y.to(down.weight.dtype)))
        return self.adapter_dropout[name](self.adapter_up[name](hidden)) * self.scaling[name]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return y
        result = y
        for name in self.active_adapters:
            if name in self.scaling:
                result = result + self.bottleneck(y, name).to(y.dtype)
        return result

    def extra_repr(self) -> str:
        return ", ".join(
            f"{name}: {self.features} -> {self.adapter_down[name].out_features} -> {self.features}, "
            f"scaling={self.scaling[name]:g}"
            for name in self.scaling
        )


class BottleneckTuner(Tuner):
    """Injects, switches and removes bottleneck adapters; refuses to merge them."""

    config_class = BottleneckConfig
    layer_class = BottleneckLayer

    def inject(self, model: nn.Module, config: BottleneckConfig, adapter_name: str) -> None:
        plan = []
        for name in find_sites(model, config):  # validate every site before the model is touched
            module = model.get_submodule(name)
            base = module.base_layer if isinstance(module, BottleneckLayer) else module
            features = output_features(name, base)
            plan.append((name, module, features, config.bottleneck_width(features)))
        for name, module, features, width in plan:
            if not isinstance(module, BottleneckLayer):
                module = replace_module(model, name, BottleneckLayer(module, features))
            module.add(adapter_name, width, config)

    def merge(self, model: nn.Module, adapter_names: list[str], safe_merge: bool = False) -> None:
        raise MergeError(
            "bottleneck adapters add a non-linearity (y + s·up(act(down(y)))) and cannot be merged into the base "
            "weights; keep the adapter loaded for inference, or call unload() to get the base model back"
        )
