"""``export_model`` / ``export_lora``: what ``deltatune export`` does, as library calls.

    adapter folder --merge onto its base--> model --> OUT.gguf (+ OUT.Modelfile)
    model folder / "smollm2" -------------> model --> OUT.gguf (+ OUT.Modelfile)
    adapter folder (lora=True) -----------> OUT.gguf (llama.cpp LoRA) + base GGUF + OUT.Modelfile

Everything that can refuse (architecture, tensors, tokenizer, adapter features) runs before a
file is opened; each file is written atomically.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import gguf
from transformers import AutoConfig

from deltatune.config import DeltaConfig
from deltatune.data.chat_defaults import stored_system
from deltatune.export.architectures import architecture_for
from deltatune.export.lora import check_exportable, lora_tensors
from deltatune.export.modelfile import modelfile_text, write_modelfile
from deltatune.export.quantize import check_out_type
from deltatune.export.tokenizer import add_tokenizer
from deltatune.export.weights import model_tensors
from deltatune.export.writer import add_tensors, build_writer, write_gguf
from deltatune.io import read_adapter_weights


@dataclass(frozen=True)
class ExportResult:
    """The files one export wrote."""

    gguf: Path
    modelfile: Path
    base_gguf: Path | None = None  # the model a LoRA GGUF applies to

    def ollama_command(self) -> str:
        return f"ollama create {self.gguf.stem} -f {self.modelfile}"


def export_model(
    source: str | os.PathLike,
    output: str | os.PathLike,
    out_type: str = "f16",
    *,
    model: str | None = None,
    pre_tokenizer: str | None = None,
) -> ExportResult:
    """Write ``source`` (a model folder, "smollm2", or an adapter merged onto its base) as a GGUF model."""
    from deltatune.runtime.loading import load_causal_lm, load_tokenizer, model_folder
    from deltatune.saved import load_adapted, tokenizer_for

    check_out_type(out_type)
    output = Path(output)
    if _is_adapter(source):
        _, base_path = _adapter_base(source, model)
        architecture_for(AutoConfig.from_pretrained(base_path, local_files_only=True))
        adapted, base_path = load_adapted(source, model)
        network = adapted.merge_and_unload(safe_merge=True)
        tokenizer = tokenizer_for(source, base_path)
    else:
        folder = model_folder(source)
        architecture_for(AutoConfig.from_pretrained(folder, local_files_only=True))
        network, tokenizer = load_causal_lm(folder), load_tokenizer(folder)
    writer = model_writer(network, tokenizer, out_type, Path(source).name, pre_tokenizer)
    write_gguf(writer, output)
    text = modelfile_text(output.name, tokenizer, system=stored_system(source))  # an adapter's or merged folder's
    modelfile = write_modelfile(output.with_suffix(".Modelfile"), text)
    return ExportResult(output, modelfile)


def export_lora(
    adapter: str | os.PathLike,
    output: str | os.PathLike,
    out_type: str = "f16",
    *,
    model: str | None = None,
    base_gguf: str | os.PathLike | None = None,
    pre_tokenizer: str | None = None,
) -> ExportResult:
    """Write a LoRA adapter as a llama.cpp LoRA GGUF, plus its base model as a GGUF (unless
    ``base_gguf`` names one already exported) and a Modelfile using both."""
    from deltatune.runtime.loading import load_causal_lm
    from deltatune.saved import tokenizer_for

    check_out_type(out_type)
    output = Path(output)
    config, base_path = _adapter_base(adapter, model)
    check_exportable(config, str(adapter))
    base_config = AutoConfig.from_pretrained(base_path, local_files_only=True)
    architecture = architecture_for(base_config)
    tensors = lora_tensors(read_adapter_weights(adapter), config, architecture, base_config)
    if base_gguf is not None and not Path(base_gguf).is_file():
        raise FileNotFoundError(
            f"base GGUF {base_gguf} does not exist; export the base model first or drop --base-gguf"
        )
    writer = build_writer(architecture.name, "adapter", out_type, Path(adapter).name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(config.lora_alpha))
    add_tensors(writer, tensors, out_type)
    tokenizer = tokenizer_for(adapter, base_path)
    if base_gguf is None:
        base_gguf = output.with_name(f"{output.stem}-base{output.suffix}")
        base_writer = model_writer(load_causal_lm(base_path), tokenizer, out_type, base_path.name, pre_tokenizer)
        write_gguf(base_writer, base_gguf)
    write_gguf(writer, output)
    modelfile = output.with_suffix(".Modelfile")
    base_ref = os.path.relpath(Path(base_gguf).resolve(), modelfile.parent.resolve())
    write_modelfile(
        modelfile, modelfile_text(base_ref, tokenizer, adapter_name=output.name, system=stored_system(adapter))
    )
    return ExportResult(output, modelfile, Path(base_gguf))


def model_writer(network, tokenizer, out_type: str, name: str, pre_tokenizer: str | None = None) -> gguf.GGUFWriter:
    """A GGUF writer holding ``network``'s hyper-parameters, tokenizer and tensors, not yet written."""
    architecture = architecture_for(network.config)
    writer = build_writer(architecture.name, "model", out_type, name)
    architecture.write_hparams(writer, network.config)
    add_tokenizer(writer, tokenizer, network.config.vocab_size, pre_tokenizer)
    add_tensors(writer, model_tensors(network, architecture), out_type)
    return writer


def _is_adapter(source: str | os.PathLike) -> bool:
    return (Path(source) / "adapter_config.json").is_file()


def _adapter_base(adapter: str | os.PathLike, model: str | None) -> tuple[DeltaConfig, Path]:
    from deltatune.saved import adapter_base

    return adapter_base(adapter, model)
