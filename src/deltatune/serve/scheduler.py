"""The serving scheduler: one engine thread owns the model and a ``GenerationEngine``; HTTP requests talk to it
through an inbox, and get their tokens back on their own asyncio queue::

    event loop (HTTP)                         engine thread
    submit(prompts, params, adapter) --inbox-->  engine.add(..., adapter=)   \\
    cancel(stream)                   --inbox-->  engine.cancel(row)           |  between steps
    call(fn) -> Future               --inbox-->  fn() (load/unload adapters)  /
    stream.queue  <--call_soon_threadsafe--  engine.step(): one token per running row

The thread steps while any row is waiting or running and sleeps otherwise. A step that raises fails only the
rows it can blame: when the running rows decoded and the prefill of the rows joining failed, those rows are
tried again one per step, alone, so only a row whose own prefill fails gets the error; when the shared decode
itself fails, every running row fails and a fresh engine takes the waiting ones. The thread survives either
way, and says why in the server log.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

from torch import nn

from deltatune.errors import ConfigError
from deltatune.generation.engine import GenerationEngine, Row
from deltatune.generation.sampling import SamplingParams
from deltatune.kernels.packed_linear import PackedWeights
from deltatune.serve.errors import Unavailable

log = logging.getLogger("deltatune.serve")


class Delivery(NamedTuple):
    """What a request's queue receives: a token of choice ``index`` (``finish``: why it ended, if it did),
    or an ``error`` that ends the whole request."""

    index: int
    token_id: int | None
    finish: str | None = None
    error: str | None = None


@dataclasses.dataclass(eq=False)
class Stream:
    """One request as the engine thread sees it: its rows (one per choice) and where their tokens go."""

    prompts: list[list[int]]
    params: list[SamplingParams]
    adapter: str | None
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = dataclasses.field(default_factory=asyncio.Queue)
    rows: list[Row] = dataclasses.field(default_factory=list)
    closed: bool = False  # cancelled or failed: nothing more is delivered

    def deliver(self, item: Delivery) -> None:
        if self.closed:
            return
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (the server is shutting down)
            self.closed = True


class Scheduler:
    """Runs ``model`` on its own thread; ``max_batch`` rows decode at once, the rest wait their turn."""

    def __init__(
        self,
        model: nn.Module,
        stop_token_ids: Sequence[int],
        max_batch: int = 32,
        seed: int = 0,
        packed_weights: bool = True,
        prefix_cache: int = 0,
    ) -> None:
        self.model = model
        self.prefix_cache = prefix_cache
        # packed once, for the server's life, on huge pages (``runtime.huge_pages``)
        self.packed_weights = PackedWeights(model, huge_pages=True) if packed_weights else None
        self.engine = self._new_engine(stop_token_ids, max_batch, seed)
        self._inbox: list[tuple[str, Any]] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._retiring: set[str] = set()  # adapters unloaded while rows still used them
        self._suspects: list[Row] = []  # rows whose joint prefill failed: each joins alone next
        self._thread = threading.Thread(target=self._run, name="deltatune-engine", daemon=True)

    def _new_engine(self, stop_token_ids: Iterable[int], max_batch: int, seed: int = 0) -> GenerationEngine:
        """An engine on the server's packed weights; its weights are static (only this thread writes them: it
        loads and deletes adapters between steps)."""
        return GenerationEngine(
            self.model,
            stop_token_ids,
            max_batch,
            seed,
            packed_weights=self.packed_weights,
            static_weights=True,
            prefix_cache=self.prefix_cache,
        )

    # -- the HTTP side (any thread) -------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the thread after its current step; requests still open end with an error."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def rows_in_flight(self) -> int:
        """Rows waiting or decoding now (read without a lock: for health checks and tests)."""
        return len(self.engine.waiting) + len(self.engine.running) + len(self._suspects)

    def submit(self, prompts: list[list[int]], params: list[SamplingParams], adapter: str | None) -> Stream:
        """Queue one row per prompt (call from the event loop whose queue gets the tokens)."""
        stream = Stream(prompts, params, adapter, asyncio.get_running_loop())
        self._send("add", stream)
        return stream

    def cancel(self, stream: Stream, index: int | None = None) -> None:
        """Free ``stream``'s rows (or only row ``index``: its answer hit a stop string) at the next chance."""
        if index is None:
            stream.closed = True  # a client that went away: nothing more to deliver
        self._send("cancel", (stream, index))

    def load_adapter(self, folder: str | os.PathLike, internal: str, name: str) -> concurrent.futures.Future:
        """Load the adapter in ``folder`` as ``internal`` between two steps (wrapping a plain model first);
        ``name`` (its served name) is what an error calls it."""
        return self.call(lambda: self._load(folder, internal, name))

    def unload_adapter(self, internal: str) -> concurrent.futures.Future:
        """Delete adapter ``internal`` from the model once no row uses it (rows already running finish)."""
        return self.call(lambda: self._retire(internal))

    def call(self, function: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``function`` on the engine thread between two steps (adapter loading); its result or error."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._send("call", (function, future))
        return future

    def _send(self, kind: str, payload: Any) -> None:
        with self._wake:
            if self._stopping or not self._thread.is_alive():
                if kind == "cancel":
                    return
                raise Unavailable("the server is shutting down; retry on another server or after its restart")
            self._inbox.append((kind, payload))
            self._wake.notify()

    # -- the engine thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        self._warm_up()
        while True:
            with self._wake:
                while not (self._inbox or self.engine.has_work or self._suspects or self._stopping):
                    self._wake.wait()
                if self._stopping:
                    break
                inbox, self._inbox = self._inbox, []
            for kind, payload in inbox:
                self._handle(kind, payload)
            if self._suspects:
                self._step_alone(self._suspects.pop(0))
            elif self.engine.has_work:
                self._step()
            if self._retiring:
                self._delete_retired()
        self._shut_down()

    def _warm_up(self) -> None:
        """Pack the weights before the first request rather than in it (and move them onto huge pages: about 3 s
        for SmolLM2): one greedy token of a one-token prompt on the base model, answered to no one. A failure
        here is logged; the requests that follow meet it (and report it) themselves."""
        if self.packed_weights is None:
            return
        try:
            self.engine.add([0], SamplingParams(max_new_tokens=1, temperature=0), adapter=None)
            while self.engine.has_work:
                self.engine.step()
        except Exception as error:  # the server starts anyway; each request meets and reports its own error
            log.warning("warming up the engine failed: %s", error)
            self._replace_engine()

    def _replace_engine(self) -> None:
        """A new engine in place of one a failure left in an unknown state, drawing from the same generator."""
        old = self.engine
        self.engine = self._new_engine(old.stop_token_ids, old.max_batch)
        self.engine.generator = old.generator

    def _handle(self, kind: str, payload: Any) -> None:
        try:
            if kind == "add":
                self._add(payload)
            elif kind == "cancel":
                stream, index = payload
                for row in stream.rows if index is None else stream.rows[index : index + 1]:
                    if row.finish_reason is None:
                        self.engine.cancel(row)
            else:
                function, future = payload
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(function())
                    except BaseException as exc:  # the caller gets it; the thread goes on
                        future.set_exception(exc)
        except Exception as exc:
            log.exception("deltatune serve: the engine thread could not handle a %s", kind)
            if kind in ("add", "cancel"):
                self._fail(payload if kind == "add" else payload[0], exc)

    def _add(self, stream: Stream) -> None:
        if stream.closed:  # cancelled before it reached the engine
            return
        for index, (prompt, params) in enumerate(zip(stream.prompts, stream.params)):
            stream.rows.append(self.engine.add(prompt, params, request_id=(stream, index), adapter=stream.adapter))

    def _load(self, folder: str | os.PathLike, internal: str, name: str) -> None:
        """Load an adapter; refuse it (and leave the model as it was) unless it can share a batch with others."""
        from deltatune.model import DeltaModel

        if isinstance(self.model, DeltaModel):
            self.model.load_adapter(folder, internal)
        else:  # the first adapter: rows already running name no adapter (None), so they keep the bare base
            self.model = DeltaModel.from_pretrained(self.model, folder, adapter_name=internal).eval()
            self.engine.model = self.model
        try:
            self.model.check_mixable(internal)
        except ConfigError as exc:
            self.model.delete_adapter(internal)
            raise ConfigError(str(exc).replace(repr(internal), f"{name!r} ({folder})")) from None

    def _retire(self, internal: str) -> None:
        self._retiring.add(internal)
        self._delete_retired()

    def _delete_retired(self) -> None:
        rows = [*self.engine.waiting, *self.engine.running, *self._suspects]
        used = {row.request_id[0].adapter for row in rows if row.finish_reason is None}
        for internal in self._retiring - used:
            self.model.delete_adapter(internal)
            self._retiring.discard(internal)

    def _step(self) -> None:
        waiting = list(self.engine.waiting)
        running = [(row, len(row.output_ids)) for row in self.engine.running]
        try:
            events = self.engine.step()
        except Exception as exc:
            log.exception("deltatune serve: a generation step failed")
            self._recover(exc, waiting, running)
            return
        for event in events:
            stream, index = event.row.request_id
            stream.deliver(Delivery(index, event.token_id, event.row.finish_reason if event.finished else None))

    def _step_alone(self, row: Row) -> None:
        """A step in which ``row`` is the only one joining (so a failed prefill is its own)."""
        if row.finish_reason is not None:  # cancelled meanwhile
            return
        held, self.engine.waiting = self.engine.waiting, [row]
        try:
            self._step()
        finally:
            self.engine.waiting = [*self.engine.waiting, *held]

    def _recover(self, exc: Exception, waiting: list[Row], running: list[tuple[Row, int]]) -> None:
        """After a failed step: fail the rows to blame, deliver what the others made, keep the engine usable."""
        engine = self.engine
        joining = [row for row in waiting if not any(row is other for other in engine.waiting)]
        decoded = [row for row, count in running if len(row.output_ids) > count]
        if running and not decoded:  # the shared decode failed: no row can be blamed alone
            blamed = [*engine.running, *joining]
            self._replace_engine()
            self.engine.waiting = engine.waiting
        else:  # the joining rows' prefill failed; the running rows decoded their token
            pristine = [row for row in joining if not row.output_ids and row not in engine.running]
            if len(joining) > 1 and len(pristine) == len(joining):  # try each alone to find the culprit
                self._suspects += joining
                blamed = []
            else:
                blamed = joining
            for row in blamed:
                if row.finish_reason is None:
                    engine.cancel(row)
            for row in decoded:
                stream, index = row.request_id
                stream.deliver(Delivery(index, row.output_ids[-1], row.finish_reason))
        for stream in {row.request_id[0] for row in blamed}:
            self._fail(stream, exc)

    def _fail(self, stream: Stream, exc: BaseException) -> None:
        """End every row of ``stream`` and tell its request why."""
        for row in stream.rows:
            if row.finish_reason is None:
                self.engine.cancel(row)
        stream.deliver(Delivery(-1, None, error=f"generation failed: {type(exc).__name__}: {exc}"))
        stream.closed = True

    def _shut_down(self) -> None:
        streams = {row.request_id[0] for row in [*self.engine.waiting, *self.engine.running, *self._suspects]}
        streams |= {payload for kind, payload in self._inbox if kind == "add"}
        for stream in streams:
            stream.deliver(Delivery(-1, None, error="the server is shutting down"))
            stream.closed = True
        for kind, payload in self._inbox:
            if kind == "call":
                payload[1].cancel()
