"""AdaLoRA: LoRA in SVD form whose ranks a budget allocator prunes while training (config, layers, allocator, tuner)."""
