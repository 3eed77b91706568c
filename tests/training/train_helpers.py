import json
import random
from pathlib import Path

# Tiny runs: build in milliseconds, a step in about a millisecond on one thread.
TINY = dict(
    preset="gpt-tiny",
    block_size=16,
    batch_size=4,
    eval_iters=2,
    eval_interval=5,
    max_iters=10,
    warmup=2,
    lr=3e-3,
    min_lr=3e-4,
    threads=1,
    quiet=True,
    log_interval=1,
)


def make_corpus(path, n_words=6000, seed=0):
    """Text with structure a tiny model learns in a few dozen steps."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "the", "cat", "sat", "on", "mat"]
    lines = [" ".join(rng.choice(words) for _ in range(8)) + ".\n" for _ in range(n_words // 8)]
    path.write_text("".join(lines), encoding="utf-8")
    return path


def read_metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def train_argv(out, data, **kw):
    """gpt-train's command line for TINY's settings overridden by `kw` (True: a bare flag; None
    or False: left out); `data`: a path, a list of them, or None for the default corpus."""
    argv = ["--out", str(out)]
    if data is not None:
        argv += ["--data", *([str(d) for d in data] if isinstance(data, list) else [str(data)])]
    for k, v in dict(TINY, **kw).items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            argv.append(flag)
        elif v is not None and v is not False:
            argv += [flag, str(v)]
    return argv
