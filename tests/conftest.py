"""Shared fixtures."""

import os
from pathlib import Path

import pytest
import torch

from deltatune.runtime.assets import smollm2_path

# Tiny test models are dominated by per-op overhead, and two threads contending for two cores
# made them up to 100x slower; one thread keeps the suite fast and its timings stable. The variable
# also keeps `deltatune train` from choosing threads by the machine's load (and printing a notice
# about it) when tests call the CLI in-process: its output must not depend on what else runs.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The converted SmolLM2-135M-Instruct folder (converted once into the user cache)."""
    return smollm2_path()
