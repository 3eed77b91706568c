"""The encoder-decoder on the built-in date-normalisation task, through the real trainer.

    .venv/bin/python benchmarks/train_dates.py [--iters 2000] [--out DIR]

Target: >= 98% exact match on held-out pairs within 10 minutes on a 2-core machine. Greedy
accuracy on --eval-pairs held-out pairs is measured every --eval-interval steps; the script
prints each, the time the run first reached 98%, and the final greedy and beam-search accuracy.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from _training_run import run_recipe

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RECIPE = dict(
    model="seq2seq",
    preset="seq2seq-mini",
    batch_size=64,
    max_iters=1500,
    lr=2e-3,
    min_lr=2e-4,
    warmup=50,
    dropout=0.0,
    weight_decay=0.1,
    eval_interval=250,
    eval_iters=10,
    eval_pairs=500,
    num_beams=4,
    log_interval=50,
    seed=1337,
)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="run directory (default: a fresh temporary one)")
    p.add_argument("--iters", type=int, default=RECIPE["max_iters"])
    p.add_argument("--eval-interval", type=int, default=RECIPE["eval_interval"])
    p.add_argument("--eval-pairs", type=int, default=RECIPE["eval_pairs"])
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = all cores)")
    args = p.parse_args()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-dates-"))

    cfg = dict(
        RECIPE,
        out=str(out),
        max_iters=args.iters,
        eval_interval=args.eval_interval,
        eval_pairs=args.eval_pairs,
        threads=args.threads,
        quiet=True,
    )
    print("recipe: " + ", ".join(f"{k}={cfg[k]}" for k in RECIPE))
    result = run_recipe(cfg, "benchmarks/train_dates.py")
    if result is None:
        return 2
    s, wall = result
    reached = None
    for ev in s["evals"]:
        print(
            f"  step {ev['step']:5d}  {ev['elapsed_s']:6.0f} s  val loss {ev['val_loss']:.4f}  "
            f"exact match (greedy) {100 * ev['exact_match_greedy']:.1f}%"
        )
        if reached is None and ev["exact_match_greedy"] >= 0.98:
            reached = ev
    if reached:
        print(
            f">= 98% greedy exact match first at step {reached['step']}, {reached['elapsed_s']:.0f} s "
            f"into training (target: within 600 s)"
        )
    else:
        print("never reached 98% greedy exact match")
    print(
        f"final, {s['step']} steps: greedy {100 * s['exact_match_greedy']:.1f}%, beam search "
        f"({RECIPE['num_beams']} beams) {100 * s['exact_match_beam']:.1f}% on {args.eval_pairs} "
        "held-out pairs"
    )
    print(
        f"{s['ms_per_iter']:.0f} ms/iteration; wall time {wall:.0f} s; loss plot {s['plot']}; "
        f"best checkpoint {s['best']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
