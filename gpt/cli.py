"""gpt-generate: stream text from a checkpoint or a Hugging Face GPT-2 directory."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cli_args import unescape
from cli_args.generate_args import build_parser, top_k_value


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prompt = args.prompt
    if prompt is None or prompt == "-":
        prompt = sys.stdin.read()
    if not prompt:
        parser.error("the prompt is empty")

    import torch

    from . import checkpoint, fast_defaults
    from .compile import compile_decode
    from .cuda_graphs import cuda_graph_decode
    from .device import resolve_device
    from .generate import generate
    from .quantization import quantize
    from .sampling import SamplingParams

    constraint = _constraint(args, parser)
    prediction = _read(parser, "--prediction", args.prediction) if args.prediction is not None else None
    try:
        params = SamplingParams(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=top_k_value(args.top_k),
            top_p=args.top_p,
            min_p=args.min_p,
            repetition_penalty=args.repetition_penalty,
            presence_penalty=args.presence_penalty,
            frequency_penalty=args.frequency_penalty,
            seed=args.seed,
            stop=[unescape(x) for x in args.stop],
            num_beams=args.num_beams,
            length_penalty=args.length_penalty,
            ignore_eos=args.ignore_eos,
            constraint=constraint,
            prediction=prediction,
        )
    except ValueError as e:
        parser.error(str(e))
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        parser.error(f"--device {e}")
    try:
        model, tokenizer = checkpoint.load(args.model, device=device, dtype=getattr(torch, args.dtype))
    except (OSError, ValueError) as e:
        parser.error(f"--model {args.model}: {e}")
    if constraint is not None:
        try:  # an invalid schema, regex or grammar is found here, before any output
            constraint.compile(tokenizer)
        except ValueError as e:
            parser.error(str(e))
    if args.quantize != "none":
        quantize(model, args.quantize)
    speculative = _speculative(parser, args, model, tokenizer, device, getattr(torch, args.dtype))
    fast = fast_defaults.choose(model, compile=args.compile, kv_cache_dtype=None, tokens=args.max_new_tokens)
    if fast.compile and args.num_beams == 1:
        compile_decode(model)
    if device.type == "cuda" and not args.eager:
        cuda_graph_decode(model)
    _say_if_the_context_is_short(model, tokenizer, prompt, args.max_new_tokens)
    try:
        pieces = generate(model, tokenizer, prompt, stream=True, speculative=speculative, **vars(params))
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
    except ValueError as e:
        parser.error(str(e))
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        return 130
    except BrokenPipeError:
        return 0
    sys.stdout.write("\n")
    return 0


def _speculative(parser: argparse.ArgumentParser, args, model, tokenizer, device, dtype):
    """--speculative, with the --draft-model loaded like the model; a parser error (exit 2)
    where the draft model cannot draft for it."""
    from .draft_model import DraftModelError, load_draft
    from .speculative import SpeculativeConfig

    if args.draft_model is None:
        if args.speculative == "draft":
            parser.error("--speculative draft needs a --draft-model")
        return args.speculative
    try:
        draft = load_draft(
            args.draft_model, model, tokenizer, device=device, dtype=dtype, quantize=args.quantize
        )
    except DraftModelError as e:
        parser.error(f"--draft-model {args.draft_model}: {e}")
    return SpeculativeConfig(args.speculative, draft_model=draft)


def _say_if_the_context_is_short(model, tokenizer, prompt: str, wanted: int) -> None:
    """One line on stderr when the context cannot hold --max-new-tokens after the prompt (the
    output then stops early, at the context's end)."""
    from .limits import ContextLimits

    limits = ContextLimits.of(model, tokenizer)
    n = len(tokenizer.encode(prompt))
    room = limits.room(n)
    if 0 < room < wanted:
        sys.stderr.write(
            f"gpt-generate: the model's context holds {limits.max_len} tokens; after the {n}-token "
            f"prompt, at most {room} of the {wanted} asked for are generated\n"
        )


def _read(parser: argparse.ArgumentParser, flag: str, path: str) -> str:
    """A text file an option names; a parser error (exit 2) when it cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        parser.error(f"{flag} {path}: cannot read it ({getattr(e, 'strerror', None) or e})")


def _constraint(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """The gpt.constraints.Constraint that --json-schema, --regex, --choice or --grammar asks for,
    or None. A file that cannot be read, or text that is no schema, is a parser error; what only
    compiling finds (an invalid regex, a grammar's unknown rule) is found once the model is loaded."""
    from .constraints import Constraint

    def read(flag: str, path: str) -> str:
        return _read(parser, flag, path)

    try:
        if args.json_schema is not None:
            flag = f"--json-schema {args.json_schema}"
            return Constraint.json_schema(read("--json-schema", args.json_schema), flag)
        if args.grammar is not None:
            return Constraint.grammar(read("--grammar", args.grammar), f"--grammar {args.grammar}")
        if args.regex is not None:
            return Constraint.regex(args.regex, "--regex")
        if args.choice is not None:
            return Constraint.choice(args.choice, "--choice")
    except ValueError as e:
        parser.error(str(e))
    return None


if __name__ == "__main__":
    sys.exit(main())
