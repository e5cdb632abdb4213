"""A tiny chat model with tiny random LoRA adapters on disk, a server over them on a free loopback port, and the
in-process answers (transformers' greedy ``generate`` on the base and one adapter alone) to compare with."""

from __future__ import annotations

import contextlib
import functools
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from openai import OpenAI
from transformers import AutoTokenizer, LlamaForCausalLM

import deltatune
from deltatune.serve.options import ServeOptions
from deltatune.serve.server import Background, Service, load_service


def save_adapter(
    model_dir: Path, folder: Path, seed: int, r: int = 4, system: str | None = None, **options: Any
) -> Path:
    """A LoRA adapter (on every linear layer unless ``options`` say otherwise) of the model in ``model_dir``, its
    factors random (lora_B too, so it changes the answers), saved to ``folder`` (with a stored system prompt when
    ``system``)."""
    base = LlamaForCausalLM.from_pretrained(model_dir)
    config = deltatune.LoraConfig(**{"r": r, "lora_alpha": 2 * r, "target_modules": "all-linear", **options})
    model = deltatune.get_delta_model(base, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * (0.3 if "lora_B" in _ else 1.0))
    model.save_pretrained(folder)
    if system is not None:
        (folder / "deltatune.json").write_text(json.dumps({"system": system}), encoding="utf-8")
    return folder


class Reference:
    """In-process greedy answers: transformers' ``generate`` on the base model, or the base with one adapter."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self._models: dict[Path | None, torch.nn.Module] = {}

    def model(self, adapter: Path | None) -> torch.nn.Module:
        if adapter not in self._models:
            base = LlamaForCausalLM.from_pretrained(self.model_dir).eval()
            model = base if adapter is None else deltatune.DeltaModel.from_pretrained(base, adapter).eval()
            self._models[adapter] = model
        return self._models[adapter]

    def ids(self, adapter: Path | None, prompt: list[int], max_tokens: int) -> list[int]:
        with torch.no_grad():
            out = self.model(adapter).generate(
                torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False, pad_token_id=0
            )
        return out[0, len(prompt) :].tolist()

    def chat(self, adapter: Path | None, messages: list[dict], max_tokens: int) -> str:
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        prompt = prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt
        return self.tokenizer.decode(self.ids(adapter, list(prompt), max_tokens), skip_special_tokens=True)

    def complete(self, adapter: Path | None, prompt: str, max_tokens: int) -> str:
        ids = self.tokenizer(prompt)["input_ids"]
        return self.tokenizer.decode(self.ids(adapter, ids, max_tokens), skip_special_tokens=True)


@contextlib.contextmanager
def serving(
    model_dir: Path, adapters: dict[str, Path], api_key: str | None = None, **options
) -> Iterator[tuple[str, Service]]:
    """(base URL, the service) of a server over ``model_dir`` and ``adapters`` on a free loopback port."""
    flags = [f"{name}={path}" for name, path in adapters.items()]
    service = load_service(ServeOptions(model=str(model_dir), adapters=flags, **options), api_key=api_key)
    with Background(service) as url:
        yield url, service


def client(url: str, api_key: str = "-") -> OpenAI:
    return OpenAI(base_url=url, api_key=api_key, max_retries=0, timeout=60)


@functools.cache
def tiny_setup() -> tuple[Path, dict[str, Path]]:
    """(the tiny chat model's folder, three adapters: "plain" (r=4), "terse" (r=8, a stored system prompt),
    "dora" (DoRA, r=4)), saved once per test process."""
    from sft_helpers import save_tiny_chat_model

    root = Path(tempfile.mkdtemp(prefix="deltatune-serve-"))
    model_dir = save_tiny_chat_model(root / "model")
    adapters = {
        "plain": save_adapter(model_dir, root / "adapters" / "plain", seed=1),
        "terse": save_adapter(model_dir, root / "adapters" / "terse", seed=2, r=8, system=TERSE),
        "dora": save_adapter(model_dir, root / "adapters" / "dora", seed=3, use_dora=True),
    }
    return model_dir, adapters


TERSE = "You answer in one word."
