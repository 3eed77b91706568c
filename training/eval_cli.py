"""gpt-eval: loss, perplexity and bits per byte of a checkpoint on held-out text."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from cli_args import Parser, positive_int

EPILOG = """\
A GPT scores --data as documents (each file one, like gpt-train's corpus); files, directories
(searched recursively, binary files skipped) and globs are accepted. An encoder-decoder scores
source/target pairs from JSONL ({"source": ..., "target": ...}) or TSV files, as gpt-train reads.

Bits per byte compare models whatever their tokenizers; loss and perplexity are per token.

example:
  gpt-eval --model runs/default/best --data notes/*.py
"""


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="gpt-eval",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Score a checkpoint or Hugging Face GPT-2 directory on held-out text.",
    )
    p.add_argument("--model", "-m", required=True, metavar="PATH", help="checkpoint or GPT-2 directory")
    p.add_argument("--data", nargs="+", required=True, metavar="PATH", help="files, directories or globs")
    p.add_argument(
        "--stride",
        type=positive_int,
        default=None,
        help="GPT: new tokens scored per window in documents longer than the context (half the context)",
    )
    p.add_argument("--batch-size", type=positive_int, default=8, help="windows or pairs per forward pass (8)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (cpu)")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="weights' dtype (float32)",
    )
    p.add_argument(
        "--quantize", choices=["none", "int8"], default="none", help="int8: 8-bit linear layers (none)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    import torch

    import gpt
    from gpt.device import resolve_device
    from gpt.evaluate import score_pairs, score_texts
    from gpt.files import CheckpointError

    from .config import ConfigError
    from .data import find_files
    from .pairs import read_pairs

    try:
        device = resolve_device(args.device)
    except ValueError as e:
        parser.error(f"--device {e}")
    try:
        model, tok = gpt.load(args.model, device=device, dtype=getattr(torch, args.dtype))
        if args.quantize != "none":
            gpt.quantize(model, args.quantize)
    except (CheckpointError, OSError, ValueError) as e:  # the prefix the other CLIs give model errors
        parser.error(f"--model {args.model}: {e}")
    try:
        files = find_files(args.data)
        progress = sys.stderr.isatty()
        if model.config.is_seq2seq:
            pairs = [p for f in files for p in read_pairs(f)]
            if not pairs:
                raise ConfigError(f"--data {' '.join(args.data)}: no source/target pairs found")
            score = score_pairs(model, tok, pairs, batch_size=args.batch_size, progress=progress)
        else:
            texts = [f.read_text(encoding="utf-8") for f in files]
            score = score_texts(
                model, tok, texts, stride=args.stride, batch_size=args.batch_size, progress=progress
            )
    except (ConfigError, CheckpointError, ValueError) as e:
        parser.error(str(e))
    except OSError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    if score.tokens == 0:
        parser.error(f"--data {' '.join(args.data)}: nothing to score (no tokens)")
    result = {"model": str(args.model), "files": len(files), **score.to_dict()}
    if args.json:
        print(json.dumps(result))
    else:
        what = "pair" if model.config.is_seq2seq else "document"
        print(
            f"{args.model}: {_count(score.documents, what)}, {_count(score.tokens, 'token')}, "
            f"{_count(score.bytes, 'byte')}"
        )
        print(f"  loss        {score.loss:.4f} nats/token")
        print(f"  perplexity  {score.perplexity:.2f}")
        print(f"  per byte    {score.nats_per_byte:.4f} nats, {score.bits_per_byte:.4f} bits")
    return 0


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


if __name__ == "__main__":
    sys.exit(main())
