"""Generation: one batched sampler with a KV cache, shared by GRPO's rollouts, serving, ``generate`` and
evaluation (``engine.GenerationEngine``; per-token choice in ``sampling``)."""
