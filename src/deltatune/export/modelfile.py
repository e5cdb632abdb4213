"""An Ollama ``Modelfile`` for an exported GGUF: FROM, ADAPTER, TEMPLATE, SYSTEM and stop tokens.

Ollama's TEMPLATE is a Go template, not the Jinja chat template transformers uses, so it cannot be
translated in general. The Jinja template is rendered with marker messages instead; when it
produces ChatML (``<|im_start|>role\\ncontent<|im_end|>\\n``, SmolLM2, Qwen, ...) the matching Go
template is written, with the system prompt the Jinja template inserts by default as ``SYSTEM``.
For any other template the TEMPLATE line is left out and Ollama falls back to the chat template
stored in the GGUF itself. The system prompt an adapter was trained with (``chat_defaults``), when
there is one, is the ``SYSTEM`` line instead, whatever the template.
"""

from __future__ import annotations

import os
from pathlib import Path

from deltatune.runtime.atomic import atomic_file

CHATML_GO = "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
_SYSTEM, _USER = "\x01system-marker\x01", "\x01user-marker\x01"


def modelfile_text(gguf_name: str, tokenizer, adapter_name: str | None = None, system: str | None = None) -> str:
    """The Modelfile for ``gguf_name`` (and LoRA ``adapter_name``), paths relative to the Modelfile;
    ``system``: the system prompt the model was trained with (None: the chat template's default)."""
    lines = [f"FROM {_relative(gguf_name)}"]
    if adapter_name is not None:
        lines.append(f"ADAPTER {_relative(adapter_name)}")
    default_system = chatml_default_system(tokenizer)
    stops = []
    if default_system is not None:
        lines.append(f'TEMPLATE """{CHATML_GO}"""')
        stops.append("<|im_end|>")
    else:
        lines.append("# TEMPLATE: the chat template is not ChatML; Ollama uses the one stored in the GGUF")
    if system := system if system is not None else default_system:
        lines.append(f'SYSTEM """{system}"""')
    if tokenizer.eos_token and tokenizer.eos_token not in stops:
        stops.append(tokenizer.eos_token)
    lines.extend(f'PARAMETER stop "{stop}"' for stop in stops)
    return "\n".join(lines) + "\n"


def chatml_default_system(tokenizer) -> str | None:
    """The system prompt a ChatML chat template inserts when none is given ("" for none), or None
    when the template does not render ChatML."""
    if not tokenizer.chat_template:
        return None
    try:
        given = _render(tokenizer, [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": _USER}])
        alone = _render(tokenizer, [{"role": "user", "content": _USER}])
    except Exception:  # a template that cannot render these messages is simply not ChatML
        return None
    turn = f"<|im_start|>user\n{_USER}<|im_end|>\n<|im_start|>assistant\n"
    if given != f"<|im_start|>system\n{_SYSTEM}<|im_end|>\n{turn}" or not alone.endswith(turn):
        return None
    prefix = alone[: -len(turn)]
    if not prefix:
        return ""
    head, tail = "<|im_start|>system\n", "<|im_end|>\n"
    if prefix.startswith(head) and prefix.endswith(tail):
        return prefix[len(head) : -len(tail)]
    return None


def write_modelfile(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def _render(tokenizer, messages: list[dict[str, str]]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _relative(path: str) -> str:
    return path if os.path.isabs(path) else f"./{path}"
