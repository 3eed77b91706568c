"""The character-level recipe on tiny Shakespeare, through the real trainer (gpt-train's loop).

    .venv/bin/python benchmarks/train.py [--data ../shared/data/tinyshakespeare.txt] [--out DIR]

nanoGPT's "baby GPT" settings: byte tokenizer, 4 layers, 4 heads, 128 dims, block 64, batch 12,
2000 iterations, lr 1e-3 cosine-decayed to 1e-4 after 100 warmup steps, no dropout, evaluation
every 250 iterations on 200 validation batches (the last 10% of the text). nanoGPT reports a
validation loss of 1.88 here (1.886 at 47.5 ms/iteration, 108 s on these 2-core machines).

It prints the validation loss at each evaluation, ms/iteration (evaluation excluded), wall time
and the loss plot's path. Then, for a ratio measured under the same load, it times a bare loop
(the same model, batches and AdamW, none of the trainer's bookkeeping) for --baseline-iters.

With --nanogpt DIR (a checkout of github.com/karpathy/nanoGPT; nothing is downloaded) it also
runs nanoGPT's own train.py on the same text, split and recipe in the same run (its README's CPU
command, with our eval_iters) and prints both per-iteration times and wall times, and the ratio;
then a step A/B: its model and optimizer set-up against ours, step by step in one process, the
ratio least moved by a machine whose speed drifts.
nanoGPT's vocabulary is the text's 65 characters where ours is 257 bytes: the output layer is
the only part that differs, and it is ours that is larger.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
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


def nanogpt_run(nanogpt: Path, data_path: Path, work: Path, iters: int, eval_iters: int) -> dict:
    """nanoGPT's train.py on the same recipe, in a scratch copy (it writes data/ and out/ beside
    itself): its mean ms/iteration (the first 10 and the evaluating iterations left out, as ours
    leaves evaluation out) and its wall time."""
    import pickle

    import numpy as np

    work.mkdir(parents=True, exist_ok=True)
    for name in ("train.py", "model.py", "configurator.py"):
        shutil.copy(nanogpt / name, work / name)
    text = data_path.read_text(encoding="utf-8")
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    n = int(len(ids) * 0.9)  # nanoGPT's split: the last 10% is validation, as ours
    d = work / "data" / "shakespeare_char"
    d.mkdir(parents=True, exist_ok=True)
    ids[:n].tofile(d / "train.bin")
    ids[n:].tofile(d / "val.bin")
    with open(d / "meta.pkl", "wb") as f:  # nanoGPT reads its vocabulary size from here
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)
    r = RECIPE
    argv = [
        sys.executable, "train.py", "--dataset=shakespeare_char", "--device=cpu", "--compile=False",
        "--dtype=float32", f"--eval_interval={r['eval_interval']}", f"--eval_iters={eval_iters}",
        "--log_interval=1", "--gradient_accumulation_steps=1", f"--block_size={r['block_size']}",
        f"--batch_size={r['batch_size']}",
        f"--n_layer={r['n_layer']}", f"--n_head={r['n_head']}", f"--n_embd={r['n_embd']}",
        f"--max_iters={iters}", f"--lr_decay_iters={iters}", f"--dropout={r['dropout']}",
        f"--learning_rate={r['lr']}", f"--min_lr={r['min_lr']}", f"--warmup_iters={r['warmup']}",
        f"--beta2={r['beta2']}", f"--weight_decay={r['weight_decay']}", f"--grad_clip={r['grad_clip']}",
        "--always_save_checkpoint=False", "--out_dir=out",
    ]  # fmt: skip
    t0 = time.perf_counter()
    done = subprocess.run(argv, cwd=work, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"nanoGPT failed: {done.stderr[-2000:]}")
    times = [
        (int(m[1]), float(m[2])) for m in re.finditer(r"iter (\d+): loss \S+, time ([\d.]+)ms", done.stdout)
    ]
    steady = [t for i, t in times if i >= 10 and i % r["eval_interval"] != 0]
    vals = re.findall(r"step (\d+): train loss \S+, val loss ([\d.]+)", done.stdout)
    return {
        "ms_per_iter": statistics.fmean(steady),
        "wall_s": wall,
        "val_loss": float(vals[-1][1]) if vals else float("nan"),
        "val_step": int(vals[-1][0]) if vals else 0,
    }


def step_ab(nanogpt: Path, rounds: int, threads: int) -> tuple[float, float]:
    """Median ms of one training step (forward, backward, clipping, AdamW) of nanoGPT's model and
    optimizer set-up against ours, alternating step by step in one process on the same random
    batches, so that a machine whose speed drifts (a shared VM) moves both alike."""
    import importlib.util

    import torch

    import gpt
    from gpt import allocator
    from gpt.chunked_loss import lm_cross_entropy
    from training.config import TrainConfig
    from training.setup import make_optimizer

    if threads:
        torch.set_num_threads(threads)
    allocator.keep_freed_memory()  # as gpt-train does; nanoGPT runs on whatever this leaves it
    spec = importlib.util.spec_from_file_location("nanogpt_model", nanogpt / "model.py")
    ng = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ng)
    r, B, T = RECIPE, RECIPE["batch_size"], RECIPE["block_size"]
    torch.manual_seed(0)
    theirs = ng.GPT(ng.GPTConfig(block_size=T, vocab_size=65, n_layer=r["n_layer"], n_head=r["n_head"],
                                 n_embd=r["n_embd"], dropout=0.0, bias=False))  # fmt: skip
    their_opt = theirs.configure_optimizers(r["weight_decay"], r["lr"], (0.9, r["beta2"]), "cpu")
    ours = gpt.build_model(gpt.preset("gpt-char", dropout=0.0)).train()
    our_opt = make_optimizer(ours, TrainConfig(lr=r["lr"], beta2=r["beta2"]), torch.device("cpu"))
    xs, xo = torch.randint(0, 65, (B, T + 1)), torch.randint(0, 257, (B, T + 1))
    (xs, ys), (xo, yo) = ((t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in (xs, xo))

    def their_step():
        _, loss = theirs(xs, ys)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), r["grad_clip"])
        their_opt.step()
        their_opt.zero_grad(set_to_none=True)

    def our_step():
        lm_cross_entropy(ours, ours(xo, hidden=True), yo).backward()
        torch.nn.utils.clip_grad_norm_(ours.parameters(), r["grad_clip"])
        our_opt.step()
        our_opt.zero_grad(set_to_none=True)

    times: dict = {their_step: [], our_step: []}
    for i in range(rounds + 10):
        for fn in (their_step, our_step) if i % 2 else (our_step, their_step):
            t = time.perf_counter()
            fn()
            if i >= 10:  # the first steps allocate the optimizer state and warm the caches
                times[fn].append(time.perf_counter() - t)
    return 1000 * statistics.median(times[our_step]), 1000 * statistics.median(times[their_step])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"))
    p.add_argument("--out", default=None, help="run directory (default: a fresh temporary one)")
    p.add_argument("--iters", type=int, default=RECIPE["max_iters"])
    p.add_argument("--eval-iters", type=int, default=RECIPE["eval_iters"])
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = all cores)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--baseline-iters", type=int, default=200, help="0 skips the bare-loop comparison")
    p.add_argument("--nanogpt", default=None, help="a nanoGPT checkout: run its train.py too, for a ratio")
    p.add_argument("--ab-steps", type=int, default=400, help="--nanogpt: steps of each in the step A/B")
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
    if args.nanogpt:
        ng = nanogpt_run(Path(args.nanogpt), data, out / "nanogpt", args.iters, args.eval_iters)
        print(
            f"nanoGPT: val loss {ng['val_loss']:.4f} at step {ng['val_step']}, "
            f"{ng['ms_per_iter']:.1f} ms/iteration (evaluation excluded), wall time {ng['wall_s']:.0f} s"
        )
        print(
            f"gpt-train / nanoGPT speed: {ng['ms_per_iter'] / s['ms_per_iter']:.2f}x per iteration, "
            f"{ng['wall_s'] / wall:.2f}x wall time (whole runs, one after the other)"
        )
        ours_ms, theirs_ms = step_ab(Path(args.nanogpt), args.ab_steps, args.threads)
        print(
            f"step A/B over {args.ab_steps} alternating steps: ours {ours_ms:.1f} ms, nanoGPT's "
            f"{theirs_ms:.1f} ms; ours / nanoGPT speed {theirs_ms / ours_ms:.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
