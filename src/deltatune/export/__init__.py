"""Export to GGUF, the file format of llama.cpp, Ollama and LM Studio.

``export_model`` writes a model (or an adapter merged onto its base) with its tokenizer, chat
template and every hyper-parameter llama.cpp reads; ``export_lora`` writes a LoRA adapter as a
llama.cpp LoRA file with its scale folded in. Both write an Ollama Modelfile beside the GGUF.
"""

from deltatune.export.api import ExportResult, export_lora, export_model
from deltatune.export.quantize import OUT_TYPES

__all__ = ["OUT_TYPES", "ExportResult", "export_lora", "export_model"]
