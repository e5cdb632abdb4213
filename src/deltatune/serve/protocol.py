"""The OpenAI wire format: request bodies as pydantic models, and the response, chunk and error objects.

Requests take OpenAI's fields (and vLLM's ``top_k``); fields that would change the answer but are not
implemented here (logprobs, penalties, logit_bias, tools, echo...) are refused with a 400 naming them, so a
client never gets an answer it did not ask for. Errors are OpenAI's (and vLLM's) shape::

    {"error": {"message": "...", "type": "NotFoundError", "param": "model", "code": 404}}
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from deltatune.serve.errors import RequestError


def error_body(message: str, kind: str, status: int, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


# -- requests ------------------------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    include_usage: bool = False


class ContentPart(BaseModel):
    """One part of a message's content; only text parts are read."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        """The content as one string; a non-text part is refused."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise RequestError(f"content parts of type {part.type!r} are not supported; send text", "messages")
        return "".join(part.text for part in self.content)


class _Sampling(BaseModel):
    """The fields chat and text completions share."""

    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # vLLM's extra field; 0 = off
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # an int64, as vLLM takes it
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Accepted at their "off" values only (clients send them), refused otherwise:
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    logprobs: bool | int | None = None

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not s for s in stops):
            raise RequestError("stop strings must not be empty", "stop")
        return tuple(stops)

    def refuse_unsupported(self) -> None:
        """A 400 naming the first field asking for what this server does not do."""
        unsupported = {
            "presence_penalty": self.presence_penalty != 0,
            "frequency_penalty": self.frequency_penalty != 0,
            "logit_bias": bool(self.logit_bias),
            "logprobs": bool(self.logprobs),
        }
        for name, asked in unsupported.items():
            if asked:
                raise RequestError(f"{name} is not supported by deltatune serve; leave it out", name)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.tools:
            raise RequestError("tools are not supported by deltatune serve; leave them out", "tools")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise RequestError("response_format other than text is not supported by deltatune serve", "response_format")
        if self.top_logprobs:
            raise RequestError("top_logprobs is not supported by deltatune serve; leave it out", "top_logprobs")


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for text completions
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def new_tokens(self) -> int | None:
        return self.max_tokens

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.echo:
            raise RequestError("echo is not supported by deltatune serve; leave it out", "echo")
        if self.suffix:
            raise RequestError("suffix is not supported by deltatune serve; leave it out", "suffix")
        if self.best_of not in (None, self.n):
            raise RequestError("best_of is not supported by deltatune serve; use n", "best_of")


class LoadAdapterRequest(BaseModel):
    lora_name: str
    lora_path: str


class UnloadAdapterRequest(BaseModel):
    lora_name: str
    lora_int_id: int | None = None  # vLLM's; ignored


# -- responses -----------------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chat_choice(index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    message = {"role": "assistant", "content": text}
    return {"index": index, "message": message, "finish_reason": finish_reason, "logprobs": None}


def completion_choice(index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}


def chat_delta(index: int, delta: dict[str, str], finish_reason: str | None = None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}


def envelope(kind: str, request_id: str, created: int, model: str, choices: list, **extra: Any) -> dict[str, Any]:
    """A response or chunk object: ``kind`` is ``chat.completion``, ``chat.completion.chunk`` or
    ``text_completion``."""
    return {"id": request_id, "object": kind, "created": created, "model": model, "choices": choices, **extra}


def model_card(name: str, root: str, parent: str | None, created: int, max_model_len: int) -> dict[str, Any]:
    """One entry of ``GET /v1/models``, as vLLM lists a base model and its adapters."""
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "deltatune",
        "root": root,
        "parent": parent,
        "max_model_len": max_model_len,
        "permission": [],
    }
