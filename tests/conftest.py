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


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """tests' tiny llama at hidden 64 / intermediate 128: bitsandbytes' CPU inference kernel (eval mode) needs
    in_features to be a multiple of its 64-value blocks."""
    from transformers import LlamaForCausalLM

    from tiny_models import tiny_llama

    folder = tmp_path_factory.mktemp("tiny_llama")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = tiny_llama().config
        config.hidden_size, config.intermediate_size, config.head_dim = 64, 128, 16
        LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def pytest_collection_modifyitems(items):
    """A test that runs child processes or converts models is slow too: ``-m "not slow"`` is the fast tier."""
    for item in items:
        if any(item.get_closest_marker(kind) for kind in ("subprocess", "multiprocess", "conversion")):
            item.add_marker(pytest.mark.slow)
