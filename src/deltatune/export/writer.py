"""Write one GGUF file atomically: metadata and tensors are gathered in memory first, so every
refusal happens before the file is opened, and the file appears whole under its name or not at all."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import gguf
import torch

from deltatune.export import quantize
from deltatune.runtime.atomic import atomic_file

F32_TENSORS = ("rope_freqs.weight",)  # llama.cpp reads these as f32 whatever the file type


def build_writer(arch: str, kind: str, out_type: str, name: str) -> gguf.GGUFWriter:
    """A GGUF writer with no file yet: ``general.*`` keys for a "model" or an "adapter" file."""
    writer = gguf.GGUFWriter(None, arch)
    writer.add_type(kind)
    writer.add_name(name)
    writer.add_file_type(quantize.file_type(out_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    return writer


def add_tensors(writer: gguf.GGUFWriter, tensors: Mapping[str, torch.Tensor], out_type: str) -> None:
    for name, tensor in tensors.items():
        encoded = quantize.encode(tensor.numpy(), out_type, keep_f32=name in F32_TENSORS)
        writer.add_tensor(name, encoded.data, raw_dtype=encoded.kind)


def write_gguf(writer: gguf.GGUFWriter, path: str | os.PathLike) -> Path:
    """Write the gathered file to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = logging.getLogger("gguf.gguf_writer").level
    logging.getLogger("gguf.gguf_writer").setLevel(logging.WARNING)  # its per-file plan is noise here
    try:
        with atomic_file(path) as tmp:
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
    finally:
        writer.close()
        logging.getLogger("gguf.gguf_writer").setLevel(previous)
    return path
