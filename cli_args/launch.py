"""The commands' entry points. Each imports its command (torch, for all but gpt-chat: seconds)
only after this torch-free module is running, so that Ctrl-C at any point, start-up included,
ends the command with one line and exit status 130 instead of a traceback; gpt-generate also
answers `--help` and argument errors before that import."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence


def _run(module: str, prog: str, argv: Sequence[str] | None, before=None) -> int:
    try:
        if before is not None:
            before(argv)
        code = importlib.import_module(module).main(argv)
    except KeyboardInterrupt:
        sys.stderr.write(f"\n{prog}: interrupted\n")
        return 130
    return 0 if code is None else code


def _generate_first(argv: Sequence[str] | None) -> None:
    from .generate_args import build_parser

    args = build_parser().parse_args(argv)  # --help and bad arguments: answered now, without torch
    if args.prompt in (None, "-") and sys.stdin.isatty():
        sys.stderr.write("gpt-generate: reading the prompt from standard input (end it with Ctrl-D)\n")


def generate(argv: Sequence[str] | None = None) -> int:
    return _run("gpt.cli", "gpt-generate", argv, _generate_first)


def train(argv: Sequence[str] | None = None) -> int:
    return _run("training.cli", "gpt-train", argv)


def serve(argv: Sequence[str] | None = None) -> int:
    return _run("server.cli", "gpt-serve", argv)


def chat(argv: Sequence[str] | None = None) -> int:
    return _run("client.chat", "gpt-chat", argv)


def evaluate(argv: Sequence[str] | None = None) -> int:
    return _run("training.eval_cli", "gpt-eval", argv)
