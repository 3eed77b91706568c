"""gpt-generate's arguments, in a module that imports nothing heavy: `--help` and argument errors
answer at once, before torch is imported (see cli_args.launch)."""

from __future__ import annotations

import argparse

from . import Parser, positive_int


def top_k_value(k: int) -> int:
    """--top-k as the library takes it: -1 means off, as 0 does (and as the server reads it)."""
    return 0 if k == -1 else k


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="gpt-generate",
        description=(
            "Generate text from a model and stream it to the terminal. PATH is a checkpoint directory "
            "written by gpt-train / gpt.save (or a run directory: its best/ checkpoint), or a Hugging "
            "Face GPT-2 directory (config.json with model.safetensors or pytorch_model.bin)."
        ),
    )
    p.add_argument(
        "prompt",
        nargs="?",
        default=None,
        help="the prompt, taken literally (for an encoder-decoder, the source text); '-' or omitted "
        "reads standard input; in a shell, $'...' writes a newline as \\n",
    )
    p.add_argument("--model", "-m", required=True, metavar="PATH", help="checkpoint or GPT-2 directory")
    s = p.add_argument_group("sampling")
    s.add_argument(
        "--max-new-tokens", "-n", type=positive_int, default=128, metavar="N", help="tokens to generate (128)"
    )
    # Small models read best a little cooler than 1, with the unlikely tail cut off.
    s.add_argument("--temperature", "-t", type=float, default=0.7, metavar="T", help="0 is greedy (0.7)")
    s.add_argument(
        "--top-k",
        type=int,
        default=0,
        metavar="K",
        help="sample from the k most likely tokens; 0 or -1: off (0)",
    )
    s.add_argument(
        "--top-p",
        type=float,
        default=0.95,
        metavar="P",
        help="nucleus sampling mass in (0, 1]; 1 = off (0.95)",
    )
    s.add_argument(
        "--min-p", type=float, default=0.0, metavar="P", help="drop tokens below P x the top probability (0)"
    )
    s.add_argument(
        "--repetition-penalty", type=float, default=1.0, metavar="X", help="> 1 discourages repeats (1.0)"
    )
    s.add_argument(
        "--presence-penalty",
        type=float,
        default=0.0,
        metavar="X",
        help="OpenAI presence penalty, [-2, 2] (0)",
    )
    s.add_argument(
        "--frequency-penalty",
        type=float,
        default=0.0,
        metavar="X",
        help="OpenAI frequency penalty, [-2, 2] (0)",
    )
    s.add_argument(
        "--seed", type=int, default=None, metavar="N", help="random seed, for reproducible sampling (none)"
    )
    s.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="stop when this text appears (repeatable); it is not printed; \\n, \\t, \\r and \\\\ "
        "are read as escapes",
    )
    s.add_argument(
        "--num-beams", type=positive_int, default=1, metavar="N", help="beam search with N beams (1: off)"
    )
    s.add_argument(
        "--length-penalty", type=float, default=1.0, metavar="X", help="beam score = logprob / length^X (1.0)"
    )
    s.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-text")
    g = p.add_argument_group("structured output (one of)")
    structured = g.add_mutually_exclusive_group()
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
    r = p.add_argument_group("device and speed")
    r.add_argument("--device", default="cpu", metavar="DEV", help="torch device, e.g. cpu or cuda (cpu)")
    r.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="weights' dtype (float32)",
    )
    r.add_argument(
        "--quantize",
        choices=["none", "int8"],
        default="none",
        help="int8: 8-bit weights and activations in every linear layer (none)",
    )
    r.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the decode step (tens of seconds the first time; beam search stays "
        "uncompiled); default: on a CPU with a C++ compiler, for runs long enough to win the time back",
    )
    r.add_argument(
        "--eager",
        action="store_true",
        help="on a GPU, run each decode step eagerly instead of replaying a CUDA graph of it",
    )
    r.add_argument(
        "--speculative",
        choices=["auto", "ngram", "draft", "off"],
        default="auto",
        help="speculative decoding, which never changes the output: auto drafts from --prediction "
        "and the --draft-model (else prompt lookup) where measured faster; ngram and draft always; "
        "off never (auto)",
    )
    r.add_argument(
        "--draft-model",
        metavar="PATH",
        help="a smaller GPT with the same tokenizer (a checkpoint or a Hugging Face GPT-2 "
        "directory) that drafts for speculative decoding",
    )
    r.add_argument(
        "--prediction",
        metavar="FILE",
        help="text the output is expected to repeat for the most part (a file rewritten with a few "
        "changes): speculative decoding drafts from it",
    )
    return p
