"""``deltatune chat``: an interactive conversation on stdin with a model (and an adapter)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from deltatune.cli.generate import (
    add_generation_arguments,
    add_model_arguments,
    load_model,
    packed_weights,
    sampling,
    system_messages,
    system_prompt,
)

HELP = "chat with a model (and an adapter) on the terminal"
EXAMPLES = """\
examples:
  deltatune chat --adapter outputs/quickstart/adapter
  deltatune chat --model outputs/merged --system "Answer in one sentence." --temperature 0.7

In the chat: /reset forgets the conversation, /exit (or Ctrl-D, or Ctrl-C at the prompt) ends it;
Ctrl-C while the model answers stops that answer (the question and answer are left out of the conversation).
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
    from deltatune.train.evaluate import answer

    model, tokenizer = load_model(args)
    packed = packed_weights(args, model)
    system = system_prompt(args)
    return converse(
        lambda messages: answer(model, tokenizer, messages, args.max_new_tokens, **options, packed_weights=packed),
        system,
        interactive=sys.stdin.isatty(),
    )


def converse(reply: Callable[[list], str], system: str | None, interactive: bool) -> int:
    """The chat loop on stdin: ``reply(messages)`` answers the conversation so far. Ctrl-C while it answers
    drops that exchange and asks again; Ctrl-C (or Ctrl-D, or /exit) at the prompt ends the chat."""
    from deltatune.data import Message

    print("chat: /reset forgets the conversation, /exit or Ctrl-D ends it; Ctrl-C stops an answer", file=sys.stderr)
    messages = system_messages(system)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            print(file=sys.stderr)  # the prompt line ends at "^C"
            break
        text = line.strip()
        if text == "/exit":
            break
        if text == "/reset":
            messages = system_messages(system)
            print("(conversation cleared)", file=sys.stderr)
            continue
        if not text:
            continue
        messages.append(Message("user", text))
        try:
            answered = reply(messages)
        except KeyboardInterrupt:
            messages.pop()  # no answer: the question leaves the conversation too
            print("\n(answer stopped; the question is left out of the conversation)", file=sys.stderr)
            continue
        messages.append(Message("assistant", answered))
        print(answered + ("\n" if interactive else ""), flush=True)
    return 0
