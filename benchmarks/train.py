"""The character-level recipe on tiny Shakespeare, through the real trainer (gpt-train's loop).

    .venv/bin/python benchmarks/train.py [--data ../shared/data/tinyshakespeare.txt] [--out DIR]

nanoGPT's "baby GPT" settings: byte tokenizer, 4 layers, 4 heads, 128 dims, block 64, batch 12,
2000 iterations, lr 1e-3 cosine-decayed to 1e-4 after 100 warmup steps, no dropout, evaluation
every 250 iterations on 200 validation batches (the last 10% of the text). nanoGPT reports a
validation loss of 1.88 here (1.886 at 47.5 ms/iteration, 108 s on these 2-core machines).

It prints the validation loss at each evaluation, ms/iteration (evaluation excluded), wall time
and the loss plot's path. Then, for a ratio measured under the same load, it times a bare loop
(the same model, batches and AdamW, none of the trainer's bookkeeping) for --baseline-iters.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from _training_run import run_recipe

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RECIPE = dict(
    model="gpt",
    preset="gpt-char",
    tokenizer="byte",
    n_layer=4,
    n_head=4,
    n_embd=128,
    block_size=64,
    batch_size=12,
    max_iters=2000,
    lr=1e-3,
    min_lr=1e-4,
    warmup=100,
    dropout=0.0,
    weight_decay=0.1,
    beta2=0.99,
    grad_clip=1.0,
    eval_interval=250,
    eval_iters=200,
    log_interval=50,
    seed=1337,
)


def bare_loop_ms(iters: int, data_path: Path, out: Path, threads: int) -> float:
    """ms/iteration of the plainest loop over the same parts: no logging, evaluation, clipping
    or checkpoints; non-fused AdamW."""
    import torch
    import torch.nn.functional as F

    import gpt
    from training.config import TrainConfig
    from training.data import BlockSampler, find_files, prepare
    from training.setup import make_optimizer

    if threads:
        torch.set_num_threads(threads)
    tokens = prepare(
        find_files([str(data_path)]),
        gpt.get_tokenizer("byte"),
        out / "tokens",
        val_fraction=0.1,
        block_size=64,
        progress=False,
    )
    torch.manual_seed(0)
    model = gpt.build_model(gpt.preset("gpt-char", dropout=0.0)).train()
    opt = make_optimizer(model, TrainConfig(), torch.device("cpu"), fused=False)
    sampler = BlockSampler(tokens.train, 64, 12, seed=0)
    for i in range(iters + 10):
        if i == 10:  # the first steps allocate and warm caches
            t0 = time.perf_counter()
        x, y = sampler.next_batch()
        loss = F.cross_entropy(model(x).view(-1, 257), y.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return 1000 * (time.perf_counter() - t0) / iters


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"))
    p.add_argument("--out", default=None, help="run directory (default: a fresh temporary one)")
    p.add_argument("--iters", type=int, default=RECIPE["max_iters"])
    p.add_argument("--eval-iters", type=int, default=RECIPE["eval_iters"])
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = all cores)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--baseline-iters", type=int, default=200, help="0 skips the bare-loop comparison")
    args = p.parse_args()
    data = Path(args.data)
    if not data.is_file():
        print(f"benchmarks/train.py: {data} not found; pass --data", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-char-"))

    cfg = dict(
        RECIPE,
        data=[str(data)],
        out=str(out),
        max_iters=args.iters,
        eval_iters=args.eval_iters,
        threads=args.threads,
        dtype=args.dtype,
        quiet=True,
    )
    print("recipe: " + ", ".join(f"{k}={cfg[k]}" for k in RECIPE if k != "model") + f", dtype={args.dtype}")
    result = run_recipe(cfg, "benchmarks/train.py")
    if result is None:
        return 2
    s, wall = result
    for ev in s["evals"]:
        print(f"  step {ev['step']:5d}  val loss {ev['val_loss']:.4f}  ({ev['elapsed_s']:.0f} s)")
    final = s["evals"][-1]["val_loss"]
    print(f"val loss at {s['step']}: {final:.4f} (target <= 1.88; nanoGPT 1.886)")
    print(f"{s['ms_per_iter']:.1f} ms/iteration, evaluation excluded (target <= 40; nanoGPT 47.5)")
    print(f"wall time {wall:.0f} s, tokenizing, evaluation and checkpoints included (nanoGPT 108 s)")
    print(f"loss plot: {s['plot']}   best checkpoint: {s['best']}")
    if args.baseline_iters and args.dtype == "float32":
        bare = bare_loop_ms(args.baseline_iters, data, out, args.threads)
        print(
            f"bare loop: {bare:.1f} ms/iteration over {args.baseline_iters} iterations; "
            f"trainer / bare = {s['ms_per_iter'] / bare:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
