"""Fused autograd functions for the tuners (plain torch, device-agnostic): see ``lora_linear.py``."""

from deltatune.kernels.lora_linear import LoraFactors, fused_lora_linear

__all__ = ["LoraFactors", "fused_lora_linear"]
