"""``deltatune chat``: an interactive conversation on stdin with a model (and an adapter)."""

from __future__ import annotations

import argparse
import sys

from .generate import add_generation_arguments, add_model_arguments, load_model, sampling, system_messages

HELP = "chat with a model (and an adapter) on the terminal"
EXAMPLES = """\
examples:
  deltatune chat --adapter outputs/quickstart/adapter
  deltatune chat --model outputs/merged --system "Answer in one sentence." --temperature 0.7

In the chat: /reset forgets the conversation, /exit (or Ctrl-D) ends it.
"""


def add_parser(commands: argparse._SubParsersAction, name: str) -> None:
    parser = commands.add_parser(
        name,
        help=HELP,
        description="Talk to the model: each line you type is a user message; the whole conversation is the prompt.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser)
    add_generation_arguments(parser)


def run(args: argparse.Namespace) -> int:
    options = sampling(args)
    from ..data import Message
    from ..train.evaluate import answer

    model, tokenizer = load_model(args)
    interactive = sys.stdin.isatty()
    print("chat: /reset forgets the conversation, /exit or Ctrl-D ends it", file=sys.stderr)
    messages = system_messages(args)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        text = line.strip()
        if text == "/exit":
            break
        if text == "/reset":
            messages = system_messages(args)
            print("(conversation cleared)", file=sys.stderr)
            continue
        if not text:
            continue
        messages.append(Message("user", text))
        reply = answer(model, tokenizer, messages, args.max_new_tokens, **options)
        messages.append(Message("assistant", reply))
        print(reply + ("\n" if interactive else ""), flush=True)
    return 0
