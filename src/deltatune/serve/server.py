"""Putting the server together: the base model and its startup adapters, the scheduler's thread, the app, and
uvicorn around it (in the main thread for ``deltatune serve``, in a background thread for tests)::

    ServeOptions --check_options (no torch)--> [Adapter entries] --load_service--> Service(app, scheduler, ...)
    Service.server(host, port) -> uvicorn.Server   (its shutdown stops the engine thread)
"""

from __future__ import annotations

import dataclasses
import sys
import threading

from deltatune.errors import ConfigError
from deltatune.serve.adapters import Adapter, Registry
from deltatune.serve.completions import Completer, Limits
from deltatune.serve.options import ServeOptions, base_model, check_options, served_name
from deltatune.serve.scheduler import Scheduler


@dataclasses.dataclass
class Service:
    """A loaded server: the app to run, and what it answers with."""

    app: object
    completer: Completer

    @property
    def scheduler(self) -> Scheduler:
        return self.completer.scheduler

    @property
    def registry(self) -> Registry:
        return self.completer.registry

    def server(self, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", announce: bool = False):
        """A ``uvicorn.Server`` for the app (``announce``: print the address on stderr once it listens)."""
        import uvicorn

        class Server(uvicorn.Server):
            async def startup(self, sockets=None) -> None:
                await super().startup(sockets)
                if announce and self.started:
                    bound_host, bound_port = self.servers[0].sockets[0].getsockname()[:2]
                    names = ", ".join([registry.base_name, *(a.name for a in registry.adapters)])
                    print(
                        f"deltatune serve: http://{bound_host}:{bound_port}/v1 answering as {names}",
                        file=sys.stderr,
                        flush=True,
                    )

        registry = self.registry
        return Server(uvicorn.Config(self.app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5))


def load_service(options: ServeOptions, api_key: str | None = None) -> Service:
    """Load the base model and the startup adapters, start the engine thread, build the app."""
    import torch

    from deltatune.runtime.loading import DTYPES, load_causal_lm, load_tokenizer, model_folder
    from deltatune.runtime.quantization import is_quantized_model
    from deltatune.serve.app import create_app

    entries = check_options(options)
    path = model_folder(base_model(options, entries))
    model = load_causal_lm(path, DTYPES[options.dtype], quantization=options.quantization).eval()
    if torch.cuda.is_available() and not is_quantized_model(model):  # 4-/8-bit layers were placed as they loaded
        model.to("cuda")
    tokenizer = load_tokenizer(path)
    context = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
    max_prompt = options.max_prompt_tokens or context
    if max_prompt > context:
        raise ConfigError(f"--max-prompt-tokens={max_prompt} is more than the model's context ({context} tokens)")
    eos = model.generation_config.eos_token_id if model.generation_config else None
    stop = {tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
    scheduler = Scheduler(
        model,
        sorted(stop),
        max_batch=options.max_concurrent,
        seed=options.seed,
        packed_weights=options.packed_weights,
        prefix_cache=options.prefix_cache,
    )
    registry = Registry(served_name(options, entries), str(path), options.adapter_root)
    vocab = model.get_input_embeddings().weight.shape[0]
    limits = Limits(context=context, max_prompt_tokens=max_prompt, vocab_size=vocab)
    scheduler.start()
    try:
        for name, folder, _ in entries:
            adapter: Adapter = registry.describe(name, folder)
            scheduler.load_adapter(adapter.folder, adapter.internal, adapter.name).result()
            registry.add(adapter)
    except BaseException:
        scheduler.stop()
        raise
    completer = Completer(scheduler, registry, tokenizer, limits)
    return Service(create_app(completer, api_key, on_shutdown=scheduler.stop), completer)


class Background:
    """A server on a background thread (tests, notebooks): ``with Background(service) as url: ...``."""

    def __init__(self, service: Service, host: str = "127.0.0.1", port: int = 0) -> None:
        self.service = service
        self.server = service.server(host, port, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, name="deltatune-serve", daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread stopped before it listened")
            threading.Event().wait(0.02)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}/v1"

    def __exit__(self, *exc_info) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.service.scheduler.stop()
