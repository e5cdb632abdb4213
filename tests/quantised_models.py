"""Quantised tiny models for the QLoRA tests: bitsandbytes' modes by name, and a quantised load of a folder."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

MODES = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "fp4-double": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True),
    "nf4-double": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "int8": dict(load_in_8bit=True),
}


def quantised(folder, mode: str, compute=torch.float32, dtype=torch.float32):
    extra = {"bnb_4bit_compute_dtype": compute} if "load_in_4bit" in MODES[mode] else {}
    config = BitsAndBytesConfig(**MODES[mode], **extra)
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, device_map="cpu", dtype=dtype)
