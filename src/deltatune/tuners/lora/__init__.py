"""LoRA (Hu et al., 2021) and its variants: DoRA, rsLoRA, PiSSA/OLoRA starts, quantised bases, every layer type."""
