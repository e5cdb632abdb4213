"""(IA)³ (Liu et al., 2022): learned vectors rescaling activations (peft's IA3)."""
