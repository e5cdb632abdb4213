"""Hub model ids ("Org/Name") resolve through the Hugging Face cache, offline, with no network call.

The cache is laid out the way huggingface_hub writes it (``models--Org--Name/snapshots/<commit>/`` and
``refs/main`` holding the commit) from a tiny model. huggingface_hub reads ``HF_HUB_CACHE`` and
``HF_HUB_OFFLINE`` once, at import, so the in-process tests set its constants as well as the
environment; the command-line test runs in a fresh process that reads the environment itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import constants

from deltatune.errors import ConfigError
from deltatune.runtime.loading import (
    base_model_id,
    load_causal_lm,
    load_tokenizer,
    model_folder,
)
from sft_helpers import save_tiny_chat_model

REPO_ID = "DeltaTuneTests/Tiny-Chat"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_chat_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def hub_cache(tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An offline Hugging Face cache holding ``REPO_ID`` (files linked from the tiny model)."""
    cache = tmp_path / "hf" / "hub"
    repo = cache / f"models--{REPO_ID.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for file in tiny_model.iterdir():
        (snapshot / file.name).symlink_to(file)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for name, value in {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_a_cached_hub_id_resolves_offline_and_loads(hub_cache: Path) -> None:
    folder = model_folder(REPO_ID)
    assert folder == hub_cache / f"models--{REPO_ID.replace('/', '--')}" / "snapshots" / COMMIT
    model, tokenizer = load_causal_lm(folder), load_tokenizer(folder)
    ids = tokenizer("Hello", return_tensors="pt").input_ids
    assert model(input_ids=ids).logits.shape[-1] == model.config.vocab_size
    assert base_model_id(REPO_ID) == REPO_ID  # an adapter records the id, so it finds its base in any cache


def test_an_uncached_hub_id_offline_is_a_one_line_error_naming_the_fix(hub_cache: Path) -> None:
    with pytest.raises(ConfigError) as error:
        model_folder("DeltaTuneTests/Not-Cached")
    message = str(error.value)
    assert "\n" not in message
    assert "model='DeltaTuneTests/Not-Cached'" in message and str(hub_cache) in message
    assert "`hf download DeltaTuneTests/Not-Cached`" in message and "unset HF_HUB_OFFLINE" in message


def test_a_local_folder_wins_over_a_hub_id_and_a_bad_name_still_says_what_works(
    hub_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model: Path
) -> None:
    local = tmp_path / "work"
    (local / "DeltaTuneTests").mkdir(parents=True)
    (local / REPO_ID).symlink_to(tiny_model)
    monkeypatch.chdir(local)
    assert model_folder(REPO_ID) == Path(REPO_ID)
    with pytest.raises(ConfigError, match="is not a model folder .*or a hub id"):
        model_folder("no-such-model")


def test_the_embedded_default_never_asks_the_hub(hub_cache: Path) -> None:
    # Not in this cache, offline: the embedded copy answers for its name and its hub id.
    assert model_folder("smollm2") == model_folder("HuggingFaceTB/SmolLM2-135M-Instruct")


@pytest.mark.subprocess
def test_generate_takes_a_hub_id(hub_cache: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "deltatune.cli.main", "generate", "--model", REPO_ID, "--max-new-tokens", "2", "Hi"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    done = subprocess.run(
        [sys.executable, "-m", "deltatune.cli.main", "generate", "--model", "DeltaTuneTests/Not-Cached", "Hi"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 2 and "hf download DeltaTuneTests/Not-Cached" in done.stderr
