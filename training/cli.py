"""gpt-train: train a GPT or an encoder-decoder from text, to checkpoints gpt.load can read."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import gpt
from cli_args import Parser

from .config import DEFAULT_PRESET, DTYPES, EVAL_ITERS, MODEL_KINDS, ConfigError, TrainConfig

D = TrainConfig()  # the defaults, quoted in --help


EPILOG = """\
data:
  GPT: --data takes UTF-8 text files, directories (searched recursively; binary files skipped)
  and globs. Without --data the corpus is this Python's standard library sources (the first
  12 MB in sorted order, tests excluded). Tokens are cached in OUT/tokens/ and reused.
  seq2seq: --data takes JSONL ({"source": ..., "target": ...} per line) or two-column TSV.
  Without --data it trains on the built-in date-normalisation task ("3rd of March, 2021" ->
  "2021-03-03"), generated on the fly, and reports exact match on held-out pairs.

chat fine-tuning (GPT): --data chats.jsonl, OpenAI's format: {"messages": [{"role": "user",
  "content": ...}, {"role": "assistant", "content": ...}]} per line. Each conversation is
  rendered with gpt-serve's chat template (or --chat-template FILE, then serve with the same
  flag) and trained with the loss on the assistant's tokens only, the turn's end included.
  Conversations are not packed: each is one row, padded to the longest in the batch (padding
  has no loss; causal attention keeps it from the tokens before it), which keeps the model's
  API unchanged at the cost of some compute. Bad lines (not JSON, no messages, an unknown
  role, no assistant turn, longer than --block-size) are skipped and listed by line number;
  more than 10% bad stops the run (exit 2).

output (OUT = --out):
  OUT/best/            the model with the lowest validation loss: pass it to gpt-generate
                       --model, gpt-serve, or gpt.load (with LoRA: the adapters merged in)
  OUT/ckpt-<step>/     the last --keep-last checkpoints, with optimizer/RNG/data state
  OUT/latest           names the newest checkpoint; --resume continues from it
  OUT/metrics.jsonl    one JSON object per log line, evaluation and set of samples
  OUT/loss.png         training and validation loss against step
  The run ends with a summary: the best checkpoint and its validation loss, where these files
  and the TensorBoard logs are, and the command to serve the model (gpt-serve --model OUT/best).
  A run that fails its checks leaves nothing behind (an --out it created is removed).

evaluation: without --eval-iters, 100 validation batches, but no more than the training
  micro-batches between two evaluations, so a short run does not spend longer evaluating than
  training. A --warmup not shorter than --max-iters is warned about (the rate never peaks).

failures: a step whose loss or gradient norm is NaN or infinite is skipped (no update) and
  counted ("skipped_steps" in metrics.jsonl); --max-bad-steps in a row stop the run with exit
  code 1, keeping the checkpoints written so far. After a crash or kill, --resume continues
  from the last complete checkpoint and removes what the interrupted writes left behind.

distributed: torchrun --nproc_per_node N -m training ...   (each rank draws its own batches;
  the effective batch is batch-size x grad-accum x N).

stopping: the first Ctrl-C (SIGINT) or SIGTERM stops at the next safe point (the end of the
  step, or the next batch of an evaluation), saves a checkpoint and exits 128 + the signal
  (130, 143); a second one stops at once without saving.
"""


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="gpt-train",
        argument_default=argparse.SUPPRESS,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a GPT or an encoder-decoder Transformer and write checkpoints that "
        "gpt.load, gpt-generate and gpt-serve read.",
    )
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=MODEL_KINDS, help=f"model kind ({D.model})")
    g.add_argument(
        "--preset",
        metavar="NAME",
        help=f"model preset: {', '.join(gpt.PRESETS)} (gpt: {DEFAULT_PRESET['gpt']}, "
        f"seq2seq: {DEFAULT_PRESET['seq2seq']})",
    )
    g.add_argument("--n-layer", type=int, metavar="N", help="(decoder) layers (preset's)")
    g.add_argument("--n-encoder-layer", type=int, metavar="N", help="seq2seq encoder layers (preset's)")
    g.add_argument("--n-head", type=int, metavar="N", help="attention heads (preset's)")
    g.add_argument("--n-embd", type=int, metavar="N", help="model width, divisible by --n-head (preset's)")
    g.add_argument(
        "--block-size",
        type=int,
        metavar="N",
        help="context length in tokens (preset's); with --init-from, the training sequence length, "
        "at most the model's context, which stays",
    )
    g.add_argument("--dropout", type=float, metavar="X", help="dropout probability (preset's)")
    g.add_argument(
        "--tokenizer",
        metavar="NAME",
        help="gpt2, byte, bpe (a byte-level BPE learned from the training data in seconds, "
        "saved with the checkpoints) or a tiktoken encoding name (preset's)",
    )
    g.add_argument(
        "--bpe-vocab", type=int, metavar="N", help=f"--tokenizer bpe: vocabulary size ({D.bpe_vocab})"
    )
    g.add_argument(
        "--init-from",
        metavar="PATH",
        help="fine-tune from a checkpoint directory or a Hugging Face GPT-2 directory",
    )
    g = p.add_argument_group("LoRA fine-tuning (with --init-from)")
    g.add_argument(
        "--lora-rank",
        type=int,
        metavar="R",
        help="train rank-R adapters beside the frozen weights instead of every weight (0 = off)",
    )
    g.add_argument("--lora-alpha", type=float, metavar="X", help="adapter scale: alpha / rank (2 x rank)")
    g.add_argument("--lora-dropout", type=float, metavar="X", help="dropout on the adapters' input (0)")
    g.add_argument(
        "--lora-targets",
        nargs="+",
        metavar="NAME",
        help="layers to adapt, by name (c_attn q_proj kv_proj c_proj c_fc: attention and MLP)",
    )
    g.add_argument("--lora-bias", action="store_true", help="train the biases too")
    g = p.add_argument_group("data")
    g.add_argument("--data", nargs="+", metavar="PATH", help="files, directories or globs (see below)")
    g.add_argument(
        "--val-fraction",
        type=float,
        metavar="X",
        help=f"last fraction held out for validation ({D.val_fraction})",
    )
    g.add_argument(
        "--val-data",
        nargs="+",
        metavar="PATH",
        help="validate on these files (like --data) instead of holding out a fraction: then all "
        "of --data trains",
    )
    g.add_argument(
        "--format",
        choices=("auto", "text", "chat"),
        help='text, or chat: conversations, one {"messages": [...]} per line (auto: chat for .jsonl '
        'files whose first line has "messages"; see chat fine-tuning below)',
    )
    g.add_argument(
        "--chat-template",
        metavar="FILE",
        help="chat: render conversations with this JSON template, as gpt-serve's --chat-template",
    )
    g = p.add_argument_group("optimisation")
    g.add_argument(
        "--batch-size", type=int, metavar="N", help=f"sequences per micro-batch per rank ({D.batch_size})"
    )
    g.add_argument(
        "--grad-accum", type=int, metavar="N", help=f"micro-batches per optimizer step ({D.grad_accum})"
    )
    g.add_argument("--lr", type=float, metavar="X", help=f"peak learning rate ({D.lr})")
    g.add_argument(
        "--min-lr", type=float, metavar="X", help=f"learning rate at the end of the cosine decay ({D.min_lr})"
    )
    g.add_argument("--warmup", type=int, metavar="N", help=f"linear warmup steps ({D.warmup})")
    g.add_argument("--max-iters", type=int, metavar="N", help=f"optimizer steps ({D.max_iters})")
    g.add_argument(
        "--weight-decay",
        type=float,
        metavar="X",
        help=f"AdamW weight decay on >= 2-D weights ({D.weight_decay})",
    )
    g.add_argument("--beta1", type=float, metavar="X", help=f"AdamW beta1 ({D.beta1})")
    g.add_argument("--beta2", type=float, metavar="X", help=f"AdamW beta2 ({D.beta2})")
    g.add_argument(
        "--grad-clip",
        type=float,
        metavar="X",
        help=f"clip the gradient norm to this; 0 = off ({D.grad_clip})",
    )
    g.add_argument(
        "--max-bad-steps",
        type=int,
        metavar="N",
        help=f"stop after N steps in a row whose loss or gradient norm is not finite; such steps "
        f"are skipped, not applied ({D.max_bad_steps})",
    )
    g = p.add_argument_group("evaluation and output")
    g.add_argument(
        "--eval-interval",
        type=int,
        metavar="N",
        help=f"evaluate and checkpoint every N steps ({D.eval_interval})",
    )
    g.add_argument(
        "--eval-iters",
        type=int,
        metavar="N",
        help=f"validation batches per evaluation (at most {EVAL_ITERS}, and no more than the "
        "training micro-batches between two evaluations)",
    )
    g.add_argument(
        "--eval-pairs",
        type=int,
        metavar="N",
        help=f"seq2seq: held-out pairs for exact match ({D.eval_pairs})",
    )
    g.add_argument(
        "--num-beams",
        type=int,
        metavar="N",
        help=f"seq2seq: beams for the beam-search accuracy ({D.num_beams})",
    )
    g.add_argument(
        "--sample-prompt",
        dest="sample_prompts",
        action="append",
        metavar="TEXT",
        help="at each evaluation, continue this prompt and show it in the log, metrics.jsonl and "
        "TensorBoard (repeatable; default: a new line for a GPT, the first held-out source "
        "for seq2seq)",
    )
    g.add_argument(
        "--sample-tokens",
        type=int,
        metavar="N",
        help=f"new tokens per sample; 0 = no samples ({D.sample_tokens})",
    )
    g.add_argument(
        "--tensorboard",
        metavar="DIR",
        help="also write TensorBoard scalars and samples to DIR (needs the tensorboard package)",
    )
    g.add_argument(
        "--log-interval",
        type=int,
        metavar="N",
        help=f"log the training loss every N steps ({D.log_interval})",
    )
    g.add_argument("--keep-last", type=int, metavar="N", help=f"step checkpoints to keep ({D.keep_last})")
    g.add_argument("--out", metavar="DIR", help=f"run directory ({D.out})")
    g.add_argument(
        "--resume",
        action="store_true",
        default=False,
        help="continue the run in --out from its latest checkpoint, with its saved settings "
        "(options given now override them)",
    )
    g.add_argument("--quiet", action="store_true", help="no progress bar or log lines")
    g = p.add_argument_group("runtime")
    g.add_argument(
        "--dtype",
        choices=DTYPES,
        help="autocast dtype; auto: bfloat16 on CPUs with bfloat16 arithmetic where a probe measures it "
        f"faster, else float32; float16 uses a GradScaler ({D.dtype})",
    )
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="keep only each block's input and recompute its activations in the backward pass: "
        "less memory for about one more forward pass per step (kept by --resume)",
    )
    g.add_argument("--seed", type=int, metavar="N", help=f"random seed ({D.seed})")
    g.add_argument("--device", help="cpu, cuda, cuda:N, or auto = cuda when available (auto)")
    g.add_argument(
        "--threads", type=int, metavar="N", help="CPU threads per process (0 = cores / local ranks)"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    resume = args.pop("resume")

    from gpt.files import CheckpointError

    from .nonfinite import TrainingDiverged
    from .trainer import train

    try:
        summary = train(args, resume=resume)
    except (ConfigError, CheckpointError) as e:
        parser.error(str(e))
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C (the first saves and stops)
        print(f"{parser.prog}: interrupted; stopped without saving", file=sys.stderr)
        return 130
    except (OSError, TrainingDiverged) as e:  # e.g. the disk filled up: the last complete checkpoint survives
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    if summary["interrupted"]:
        return 128 + int(summary["interrupted"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
