"""Shared fixtures."""

from pathlib import Path

import pytest
import torch

from deltatune.assets import smollm2_path

# Tiny test models are dominated by per-op overhead, and two threads contending for two cores
# made them up to 100x slower; one thread keeps the suite fast and its timings stable.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The converted SmolLM2-135M-Instruct folder (converted once into the user cache)."""
    return smollm2_path()
