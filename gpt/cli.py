"""gpt-generate: stream text from a checkpoint or a Hugging Face GPT-2 directory."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cli_args import Parser, positive_int


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="gpt-generate",
        description=(
            "Generate text from a model and stream it to the terminal. PATH is a checkpoint directory "
            "written by gpt-train / gpt.save, or a Hugging Face GPT-2 directory (config.json with "
            "model.safetensors or pytorch_model.bin)."
        ),
    )
    p.add_argument(
        "prompt",
        nargs="?",
        default=None,
        help="the prompt (for an encoder-decoder, the source text); '-' or omitted reads stdin",
    )
    p.add_argument("--model", "-m", required=True, metavar="PATH", help="checkpoint or GPT-2 directory")
    p.add_argument("--max-new-tokens", "-n", type=positive_int, default=128, help="tokens to generate (128)")
    # Small models read best a little cooler than 1, with the unlikely tail cut off.
    p.add_argument("--temperature", "-t", type=float, default=0.7, help="0 is greedy (0.7)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens; 0 = off")
    p.add_argument(
        "--top-p", type=float, default=0.95, help="nucleus sampling mass in (0, 1]; 1 = off (0.95)"
    )
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1.0)")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI presence penalty, [-2, 2]")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI frequency penalty, [-2, 2]")
    p.add_argument("--seed", type=int, default=None, help="random seed, for reproducible sampling")
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="stop when this text appears (repeatable); it is not printed",
    )
    p.add_argument("--num-beams", type=positive_int, default=1, help="beam search with this many beams")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam score = logprob / length^this")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-text")
    structured = p.add_mutually_exclusive_group()
    structured.add_argument(
        "--json-schema", metavar="FILE", help="the output is JSON valid against the JSON schema in FILE"
    )
    structured.add_argument(
        "--regex", metavar="R", help="the output matches the regular expression R in full"
    )
    structured.add_argument(
        "--choice",
        action="append",
        metavar="TEXT",
        help="the output is exactly one of the choices (repeatable: one --choice per choice)",
    )
    structured.add_argument(
        "--grammar",
        metavar="FILE",
        help="the output is a sentence of the grammar in FILE: Lark (start rule 'start') or GBNF "
        "('root ::= ...')",
    )
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (cpu)")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="weights' dtype (float32)",
    )
    p.add_argument(
        "--quantize",
        choices=["none", "int8"],
        default="none",
        help="int8: 8-bit weights and activations in every linear layer (none)",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the decode step (tens of seconds the first time; beam search stays "
        "uncompiled); default: on a CPU with a C++ compiler, for runs long enough to win the time back",
    )
    p.add_argument(
        "--eager",
        action="store_true",
        help="on a GPU, run each decode step eagerly instead of replaying a CUDA graph of it",
    )
    return p


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
    try:
        params = SamplingParams(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            min_p=args.min_p,
            repetition_penalty=args.repetition_penalty,
            presence_penalty=args.presence_penalty,
            frequency_penalty=args.frequency_penalty,
            seed=args.seed,
            stop=args.stop,
            num_beams=args.num_beams,
            length_penalty=args.length_penalty,
            ignore_eos=args.ignore_eos,
            constraint=constraint,
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
    fast = fast_defaults.choose(model, compile=args.compile, kv_cache_dtype=None, tokens=args.max_new_tokens)
    if fast.compile and args.num_beams == 1:
        compile_decode(model)
    if device.type == "cuda" and not args.eager:
        cuda_graph_decode(model)
    try:
        pieces = generate(model, tokenizer, prompt, stream=True, **vars(params))
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


def _constraint(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """The gpt.constraints.Constraint that --json-schema, --regex, --choice or --grammar asks for,
    or None. A file that cannot be read, or text that is no schema, is a parser error; what only
    compiling finds (an invalid regex, a grammar's unknown rule) is found once the model is loaded."""
    from .constraints import Constraint

    def read(flag: str, path: str) -> str:
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as e:
            parser.error(f"{flag} {path}: cannot read it ({getattr(e, 'strerror', None) or e})")

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
