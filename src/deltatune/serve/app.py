"""The HTTP layer: FastAPI routes in OpenAI's (and vLLM's) shapes, the API key check and the error handlers.

    GET  /health                      200 while the engine thread runs (no key needed)
    GET  /v1/models                   the base model and every adapter
    POST /v1/chat/completions         chat, streamed or not
    POST /v1/completions              text completion, streamed or not
    POST /v1/load_lora_adapter        {"lora_name", "lora_path"}: only with --adapter-root, from under it
    POST /v1/unload_lora_adapter      {"lora_name"}: only with --adapter-root

Every error is OpenAI's ``{"error": {...}}`` object; FastAPI's 422 for a bad body becomes a 400.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from deltatune.errors import DeltaTuneError
from deltatune.serve import protocol
from deltatune.serve.adapters import check_runtime_loading, under_root
from deltatune.serve.completions import Completer, Generation, GenerationFailed
from deltatune.serve.errors import RequestError, Unauthorized, Unavailable
from deltatune.serve.protocol import ChatRequest, CompletionRequest, LoadAdapterRequest, UnloadAdapterRequest

log = logging.getLogger("deltatune.serve")


def create_app(completer: Completer, api_key: str | None = None, on_shutdown: Callable[[], None] | None = None):
    """The ASGI app answering with ``completer``; ``on_shutdown`` runs when the server stops."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        if on_shutdown is not None:
            on_shutdown()

    app = FastAPI(title="deltatune serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    registry, scheduler = completer.registry, completer.scheduler
    adapter_lock = asyncio.Lock()  # one load or unload at a time

    async def check_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise Unauthorized("missing or wrong API key; send the server's --api-key as 'Authorization: Bearer KEY'")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    @app.get("/health")
    async def health() -> Any:
        if not scheduler.alive:
            raise Unavailable("the engine thread has stopped; restart the server")
        return PlainTextResponse("")

    @v1.get("/models")
    async def models() -> Any:
        created, context = protocol.now(), completer.limits.context
        cards = [protocol.model_card(registry.base_name, registry.base_root, None, created, context)]
        for adapter in registry.adapters:
            cards.append(protocol.model_card(adapter.name, str(adapter.folder), registry.base_name, created, context))
        return {"object": "list", "data": cards}

    @v1.post("/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Any:
        return await _answer(completer.start(body), body.stream, request)

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await _answer(completer.start(body), body.stream, request)

    @v1.post("/load_lora_adapter")
    async def load_lora_adapter(body: LoadAdapterRequest) -> Any:
        folder = under_root(body.lora_path, registry.adapter_root)
        async with adapter_lock:
            adapter = registry.describe(body.lora_name, folder)
            await asyncio.wrap_future(scheduler.load_adapter(adapter.folder, adapter.internal, adapter.name))
            registry.add(adapter)
        log.info("deltatune serve: loaded adapter %r from %s", adapter.name, adapter.folder)
        return PlainTextResponse(f"Success: LoRA adapter '{adapter.name}' added successfully.")

    @v1.post("/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadAdapterRequest) -> Any:
        check_runtime_loading(registry.adapter_root)
        async with adapter_lock:
            adapter = registry.remove(body.lora_name)
            await asyncio.wrap_future(scheduler.unload_adapter(adapter.internal))
        log.info("deltatune serve: unloaded adapter %r", adapter.name)
        return PlainTextResponse(f"Success: LoRA adapter '{adapter.name}' removed successfully.")

    app.include_router(v1)
    _add_error_handlers(app)
    return app


async def _answer(generation: Generation, stream: bool, request: Request) -> Any:
    """The response: SSE while streaming, else the whole answer once every choice ended (or nothing, when the
    client went away first: its rows are freed at once)."""
    if stream:
        return StreamingResponse(generation.events(), media_type="text/event-stream")
    answer = asyncio.ensure_future(generation.response())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait([answer, gone], return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not answer.done():
            answer.cancel()
            generation.cancel()
    if not answer.done() or answer.cancelled():
        return JSONResponse(protocol.error_body("the client disconnected", "ClientDisconnected", 499), 499)
    return answer.result()  # raises GenerationFailed into its handler


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body was read, so only a disconnect can arrive)."""
    while True:
        if (await request.receive())["type"] == "http.disconnect":
            return


def _add_error_handlers(app: FastAPI) -> None:
    def error(message: str, kind: str, status: int, param: str | None = None) -> JSONResponse:
        return JSONResponse(protocol.error_body(message, kind, status, param), status_code=status)

    @app.exception_handler(RequestError)
    async def request_error(_request: Request, exc: RequestError) -> JSONResponse:
        return error(str(exc), exc.type, exc.status, exc.param)

    @app.exception_handler(DeltaTuneError)
    async def config_error(_request: Request, exc: DeltaTuneError) -> JSONResponse:
        return error(str(exc), "BadRequestError", 400)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request", "type": ""}
        loc = [str(part) for part in first.get("loc", ())[1:]]
        if first.get("type") == "json_invalid":
            detail = (first.get("ctx") or {}).get("error") or first.get("msg")
            return error(f"the request body is not valid JSON ({detail}); send a JSON object", "BadRequestError", 400)
        if not loc:
            return error(
                "the request body must be a JSON object, sent with Content-Type: application/json",
                "BadRequestError",
                400,
            )
        field = ".".join(loc)
        return error(f"{field}: {first.get('msg')}", "BadRequestError", 400, field)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        kind = {404: "NotFoundError", 405: "MethodNotAllowedError"}.get(exc.status_code, "BadRequestError")
        return error(str(exc.detail), kind, exc.status_code)

    @app.exception_handler(GenerationFailed)
    async def generation_failed(_request: Request, exc: GenerationFailed) -> JSONResponse:
        return error(str(exc), "InternalServerError", 500)

    @app.exception_handler(FileNotFoundError)
    @app.exception_handler(PermissionError)
    async def file_error(_request: Request, exc: OSError) -> JSONResponse:
        return error(f"{exc.filename or ''}: {exc.strerror or exc}", "BadRequestError", 400)

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("deltatune serve: a request failed")
        return error(f"internal error: {type(exc).__name__}: {exc}", "InternalServerError", 500)
