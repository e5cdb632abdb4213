"""Which transformers architectures become which llama.cpp architecture, and how their tensors move.

Each supported ``config.model_type`` maps to an ``Architecture``: the GGUF architecture name, the
hyper-parameters llama.cpp reads for it, and the per-tensor changes between the two layouts:

* tensor names come from the ``gguf`` package's own HF -> GGUF name map
  (``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight``);
* GPT-2's ``Conv1D`` weights are stored [in, out]; GGUF wants the ``nn.Linear`` layout [out, in];
* llama.cpp's ``llama`` architecture rotates interleaved pairs of each head's q/k rows, while
  transformers rotates the first half against the second half. The rows of one head are
  reordered so that llama.cpp pairs the same dimensions::

      HF rows of a head:   x0 x1 x2 x3 | y0 y1 y2 y3      (rotate_half pairs xi with yi)
      GGUF rows:           x0 y0 x1 y1 x2 y2 x3 y3      (interleaved pairs)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import gguf
import torch

from deltatune.errors import ConfigError
from deltatune.export.hparams import gpt2_hparams, llama_hparams


@dataclass(frozen=True)
class Architecture:
    """How one transformers ``model_type`` is written for llama.cpp."""

    gguf_arch: gguf.MODEL_ARCH
    write_hparams: Callable[[gguf.GGUFWriter, object], None]
    permute_qk: bool = False  # llama.cpp's "llama" rope: interleave each head's rotary halves
    conv1d_suffixes: tuple[str, ...] = ()  # weights stored [in, out] (GPT-2 Conv1D)

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(gguf.MODEL_ARCH.LLAMA, llama_hparams, permute_qk=True),
    "mistral": Architecture(gguf.MODEL_ARCH.LLAMA, llama_hparams, permute_qk=True),
    "qwen2": Architecture(gguf.MODEL_ARCH.QWEN2, llama_hparams),
    "qwen3": Architecture(gguf.MODEL_ARCH.QWEN3, llama_hparams),
    "gpt2": Architecture(
        gguf.MODEL_ARCH.GPT2, gpt2_hparams, conv1d_suffixes=("c_attn.weight", "c_proj.weight", "c_fc.weight")
    ),
}


def architecture_for(config) -> Architecture:
    """The export recipe of a transformers config; a one-line ``ConfigError`` for anything else."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise ConfigError(f"model_type={model_type!r} cannot be exported to GGUF yet; supported: {supported}")
    return ARCHITECTURES[model_type]


class TensorNamer:
    """Maps a model's state-dict names to GGUF names and puts each tensor in llama.cpp's layout."""

    def __init__(self, architecture: Architecture, config) -> None:
        self.architecture = architecture
        self.config = config
        self._names = gguf.get_tensor_name_map(architecture.gguf_arch, _layers(config))

    def gguf_name(self, hf_name: str) -> str:
        """``blk.N.attn_q.weight`` for ``model.layers.N.self_attn.q_proj.weight``; a ``ConfigError``
        naming the tensor when llama.cpp has no place for it."""
        name = self._names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ConfigError(
                f"tensor {hf_name!r} has no place in llama.cpp's {self.architecture.name!r} "
                f"architecture; it cannot be exported to GGUF"
            )
        return name

    def to_gguf_layout(self, hf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor as llama.cpp reads it: Conv1D weights transposed, llama's q/k rows interleaved."""
        if hf_name.endswith(self.architecture.conv1d_suffixes):
            tensor = tensor.T
        return self.permute_rows(hf_name, tensor)

    def permute_rows(self, hf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Reorder the output rows of a q/k projection (weight, bias, or a LoRA B) for llama's rope."""
        if not self.architecture.permute_qk:
            return tensor
        module = hf_name.rsplit(".", 1)[0]
        if module.endswith("q_proj"):
            return interleave_heads(tensor, self.config.num_attention_heads)
        if module.endswith("k_proj"):
            heads = getattr(self.config, "num_key_value_heads", None) or self.config.num_attention_heads
            return interleave_heads(tensor, heads)
        return tensor


def interleave_heads(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Per head, reorder rows [x0..x(h-1), y0..y(h-1)] to [x0, y0, x1, y1, ...] (see the module doc)."""
    half = rows.shape[0] // heads // 2
    return rows.reshape(heads, 2, half, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def _layers(config) -> int:
    return getattr(config, "num_hidden_layers", None) or config.n_layer
