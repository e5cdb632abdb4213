"""From an OpenAI request to rows of the scheduler, and from their tokens back to OpenAI's answer::

    ChatRequest -> messages (+ the adapter's stored system prompt) -> chat template -> prompt ids  \\
    CompletionRequest -> prompt text(s) or token ids -> prompt ids                                  > n rows each
    tokens -> TextStream per choice (incremental text, stop strings) -> one response, or SSE chunks

Everything here runs on the event loop (the tokenizer is used from that one thread); only the scheduler's
thread touches the model.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from typing import Any

from jinja2 import TemplateError

from deltatune.data.encoding import prompt_ids
from deltatune.data.records import Message
from deltatune.errors import DeltaTuneError
from deltatune.generation.sampling import SamplingParams
from deltatune.serve import protocol
from deltatune.serve.adapters import Adapter, Registry
from deltatune.serve.errors import RequestError
from deltatune.serve.protocol import ChatRequest, CompletionRequest
from deltatune.serve.scheduler import Scheduler, Stream
from deltatune.serve.text import TextStream

_ROLES = {"developer": "system"}  # OpenAI's newer name for the system message


class GenerationFailed(Exception):
    """The engine could not answer a request (the server log has the traceback)."""


@dataclasses.dataclass(frozen=True)
class Limits:
    context: int  # the model's max_position_embeddings: prompt + answer
    max_prompt_tokens: int
    vocab_size: int


class Completer:
    """Answers chat and text completion requests with the scheduler's rows."""

    def __init__(self, scheduler: Scheduler, registry: Registry, tokenizer, limits: Limits) -> None:
        self.scheduler = scheduler
        self.registry = registry
        self.tokenizer = tokenizer
        self.limits = limits

    def start(self, request: ChatRequest | CompletionRequest) -> Generation:
        """Check ``request``, queue its rows; the ``Generation`` that yields their text."""
        request.refuse_unsupported()
        adapter = self.registry.resolve(request.model)
        stop = request.stop_strings()
        chat = isinstance(request, ChatRequest)
        prompts = [self.chat_prompt(request, adapter)] if chat else self.text_prompts(request)
        rows, params = [], []
        for prompt in prompts:
            new_tokens = self.check_length(len(prompt), request.new_tokens())
            for j in range(request.n):
                seed = None if request.seed is None else request.seed + j  # n different, reproducible answers
                rows.append(prompt)
                params.append(SamplingParams(new_tokens, request.temperature, request.top_p, request.top_k, seed=seed))
        stream = self.scheduler.submit(rows, params, adapter.internal if adapter else None)
        texts = [TextStream(self.tokenizer, stop) for _ in rows]
        return Generation(self.scheduler, stream, texts, sum(map(len, prompts)), request, chat)

    def chat_prompt(self, request: ChatRequest, adapter: Adapter | None) -> list[int]:
        messages = [Message(_ROLES.get(m.role, m.role), m.text()) for m in request.messages]
        if adapter is not None and adapter.system and not any(m.role == "system" for m in messages):
            messages.insert(0, Message("system", adapter.system))
        try:
            return prompt_ids(self.tokenizer, messages)
        except (DeltaTuneError, ValueError, TypeError, TemplateError) as exc:  # a template's raise_exception()
            raise RequestError(f"the messages do not fit the model's chat template: {exc}", "messages") from None

    def text_prompts(self, request: CompletionRequest) -> list[list[int]]:
        prompt = request.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise RequestError("prompt is empty; send text or token ids", "prompt")
        prompts = [self.tokenizer(p)["input_ids"] if isinstance(p, str) else list(p) for p in prompt]
        for ids in prompts:
            if not ids:
                raise RequestError("a prompt is empty; send text or token ids", "prompt")
            if any(not 0 <= i < self.limits.vocab_size for i in ids):
                raise RequestError(f"prompt token ids must be in [0, {self.limits.vocab_size})", "prompt")
        return prompts

    def check_length(self, prompt_tokens: int, new_tokens: int | None) -> int:
        """How many tokens a row may generate; a 400 when the prompt or the request does not fit."""
        limits = self.limits
        if prompt_tokens > limits.max_prompt_tokens:
            raise RequestError(
                f"the prompt has {prompt_tokens} tokens, more than this server's {limits.max_prompt_tokens} "
                f"(--max-prompt-tokens); shorten the messages",
                "messages",
            )
        room = limits.context - prompt_tokens
        if room < 1 or (new_tokens is not None and new_tokens > room):
            raise RequestError(
                f"this model's maximum context length is {limits.context} tokens; the prompt has {prompt_tokens} "
                f"and {new_tokens or 1} more were requested; reduce max_tokens or the prompt",
                "max_tokens",
            )
        return new_tokens or room


class Generation:
    """One request in flight: its choices' text as it arrives."""

    def __init__(
        self,
        scheduler: Scheduler,
        stream: Stream,
        texts: list[TextStream],
        prompt_tokens: int,
        request: ChatRequest | CompletionRequest,
        chat: bool,
    ) -> None:
        self.scheduler, self.stream, self.texts = scheduler, stream, texts
        self.prompt_tokens, self.request, self.chat = prompt_tokens, request, chat
        self.finish: list[str | None] = [None] * len(texts)
        self.id = protocol.new_id("chatcmpl" if chat else "cmpl")
        self.created = protocol.now()

    @property
    def done(self) -> bool:
        return all(self.finish)

    def cancel(self) -> None:
        """The client went away: free every row now."""
        if not self.done:
            self.scheduler.cancel(self.stream)

    async def pieces(self) -> AsyncIterator[tuple[int, str, str | None]]:
        """(choice index, new text, finish reason once it ended) as tokens arrive."""
        while not self.done:
            item = await self.stream.queue.get()
            if item.error is not None:
                raise GenerationFailed(item.error)
            index, text = item.index, self.texts[item.index]
            if self.finish[index]:
                continue  # a token decoded before its row's cancel reached the engine
            piece = text.push(item.token_id)
            finish = "stop" if text.stopped else item.finish
            if finish is not None:
                piece += text.finish()
                self.finish[index] = finish
                if item.finish is None:  # a stop string: the engine does not know yet
                    self.scheduler.cancel(self.stream, index)
            if piece or finish:
                yield index, piece, finish

    @property
    def usage(self) -> dict[str, int]:
        return protocol.usage(self.prompt_tokens, sum(len(t.ids) for t in self.texts))

    async def response(self) -> dict[str, Any]:
        """The whole answer, as one OpenAI response object."""
        async for _ in self.pieces():
            pass
        build = protocol.chat_choice if self.chat else protocol.completion_choice
        choices = [build(i, t.text, f) for i, (t, f) in enumerate(zip(self.texts, self.finish))]
        kind = "chat.completion" if self.chat else "text_completion"
        return protocol.envelope(kind, self.id, self.created, self.request.model, choices, usage=self.usage)

    async def events(self) -> AsyncIterator[str]:
        """The answer as server-sent events: chunks, an optional usage chunk, then ``[DONE]``."""
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        extra = {"usage": None} if self.request.include_usage else {}

        def chunk(choices: list) -> str:
            body = protocol.envelope(kind, self.id, self.created, self.request.model, choices, **extra)
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        try:
            if self.chat:
                yield chunk(
                    [protocol.chat_delta(i, {"role": "assistant", "content": ""}) for i in range(len(self.texts))]
                )
            async for index, piece, finish in self.pieces():
                if piece:
                    content = protocol.chat_delta(index, {"content": piece}) if self.chat else _text(index, piece)
                    yield chunk([content])
                if finish:
                    yield chunk([protocol.chat_delta(index, {}, finish) if self.chat else _text(index, "", finish)])
            if self.request.include_usage:
                body = protocol.envelope(kind, self.id, self.created, self.request.model, [], usage=self.usage)
                yield f"data: {json.dumps(body)}\n\n"
        except GenerationFailed as exc:
            yield f"data: {json.dumps(protocol.error_body(str(exc), 'InternalServerError', 500))}\n\n"
        finally:  # the client went away (the response task is cancelled), or the answer is complete
            self.cancel()
        yield "data: [DONE]\n\n"


def _text(index: int, text: str, finish: str | None = None) -> dict[str, Any]:
    return protocol.completion_choice(index, text, finish)
