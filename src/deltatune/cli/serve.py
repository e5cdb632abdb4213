"""``deltatune serve``: an OpenAI-compatible HTTP server for one base model and many LoRA adapters."""

from __future__ import annotations

import argparse
import os
import sys

HELP = "serve a model and its LoRA adapters over an OpenAI-compatible HTTP API"
EXAMPLES = """\
examples:
  deltatune serve --adapter support=outputs/support/adapter --adapter legal=outputs/legal/adapter
  deltatune serve --model smollm2 --adapter-root outputs --api-key "$KEY" --port 8080

  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "support", "messages": [{"role": "user", "content": "Hi"}]}'

A request's "model" names an adapter (or the base model's served name); requests for different adapters share
one batch. Listens on 127.0.0.1 unless --host says otherwise; see docs/serving.md.
"""


def add_parser(commands: argparse._SubParsersAction, name: str) -> None:
    from deltatune.cli.generate import add_packed_weights_argument
    from deltatune.serve.options import DTYPE_NAMES, PREFIX_CACHE_TOKENS, QUANTIZATION_NAMES

    parser = commands.add_parser(
        name,
        help=HELP,
        description="Answer OpenAI chat and text completion requests with a base model and its LoRA adapters.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model", help="base model folder, 'smollm2' or a hub id (default: the first adapter's base, else smollm2)"
    )
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="serve the adapter folder PATH as model NAME (repeatable)",
    )
    parser.add_argument(
        "--served-model-name", help="the base model's name in the API (default: --model as given, e.g. smollm2)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one (default: 8000)")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("DELTATUNE_API_KEY"),
        help="require 'Authorization: Bearer KEY' on every /v1 route (default: $DELTATUNE_API_KEY, else none)",
    )
    parser.add_argument(
        "--max-concurrent",
        type=int,
        default=32,
        help="most sequences decoding at once; more wait in a queue (default: 32)",
    )
    parser.add_argument(
        "--max-prompt-tokens", type=int, help="longest prompt accepted (default: the model's context length)"
    )
    parser.add_argument("--dtype", default="float32", choices=DTYPE_NAMES, help="weights' dtype (default: float32)")
    parser.add_argument(
        "--quantization",
        default="none",
        choices=QUANTIZATION_NAMES,
        help="hold the base's linear layers in 4 or 8 bits, as train's quantization= (needs bitsandbytes)",
    )
    add_packed_weights_argument(parser)
    parser.add_argument(
        "--prefix-cache",
        type=int,
        default=PREFIX_CACHE_TOKENS,
        metavar="TOKENS",
        help="keep the keys and values of up to TOKENS tokens of prompt starts that requests share (a system "
        f"prompt), per adapter, and prefill only the rest of a prompt that begins with one; 0: none "
        f"(default: {PREFIX_CACHE_TOKENS})",
    )
    parser.add_argument(
        "--adapter-root",
        metavar="DIR",
        help="allow POST /v1/load_lora_adapter and /v1/unload_lora_adapter, for adapter folders under DIR only",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=("critical", "error", "warning", "info", "debug"),
        help="server log detail on stderr (default: info: one line per request)",
    )


def run(args: argparse.Namespace) -> int:
    from deltatune.errors import ConfigError
    from deltatune.serve.options import ServeOptions, check_options

    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port={args.port} must be in 0-65535")
    options = ServeOptions(
        model=args.model,
        adapters=args.adapter,
        served_model_name=args.served_model_name,
        max_concurrent=args.max_concurrent,
        max_prompt_tokens=args.max_prompt_tokens,
        dtype=args.dtype,
        quantization=args.quantization,
        adapter_root=args.adapter_root,
        packed_weights=args.packed_weights,
        prefix_cache=args.prefix_cache,
    )
    check_options(options)  # bad flags and folders answer before torch loads
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(
            f"deltatune serve: warning: listening on {args.host} without --api-key: anyone who can reach this port "
            f"can use the model{' and load adapters' if args.adapter_root else ''}",
            file=sys.stderr,
        )
    from deltatune.serve.server import load_service

    service = load_service(options, api_key=args.api_key)
    try:
        service.server(args.host, args.port, args.log_level, announce=True).run()
    except KeyboardInterrupt:
        pass
    finally:
        service.scheduler.stop()
    print("deltatune serve: stopped", file=sys.stderr)
    return 0
