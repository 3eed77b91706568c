"""gpt-train against transformers' Trainer (with peft for LoRA) on the same fine-tuning job, in
one run on one machine.

    .venv/bin/python benchmarks/finetune.py                  # GPT-2 small, batch 8 x 512, LoRA and full
    .venv/bin/python benchmarks/finetune.py --modes lora --steps 6

The job: GPT-2 small (124M; random weights written once as a Hugging Face GPT-2 directory under
--cache, nothing is downloaded), fine-tuned on --data (tiny Shakespeare) in GPT-2 tokens,
--batch rows of --seq tokens a step, AdamW at a constant learning rate, gradient clipping at 1.0,
GPT-2's dropout of 0.1, float32. Modes: `lora` (rank 8, alpha 16, on c_attn c_proj c_fc, the
other weights frozen) and `full` (every weight trains).

Each tool runs as its own process, so its peak memory is its own high-water mark (the peak
resident set size, read with wait4 when it exits): Python, the libraries, the data and whatever
each does besides the steps count, as a user would see them. Tokens/s is --batch x --seq over the
median step time, the first --warmup steps left out (they allocate the optimizer state).
  - ours: the gpt-train command (`--init-from DIR --block-size 512`), its per-step times from the
    run's metrics.jsonl (--log-interval 1); one evaluation batch and the checkpoint at the end;
  - theirs: transformers.Trainer (its default optimizer) on the same windows of the same tokens,
    peft's get_peft_model for LoRA; step times from a TrainerCallback; nothing saved.

Needs `pip install peft accelerate` besides transformers (the dev extra).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TARGETS = ["c_attn", "c_proj", "c_fc"]
RANK = 8
LR = 1e-4

from first_run import cpu_model  # noqa: E402 (benchmarks/ is the script's directory)


def gpt2_small(cache: Path) -> Path:
    """A GPT-2-small Hugging Face directory with random weights (written once, then reused)."""
    d = cache / "gpt2-small-random"
    if not (d / "config.json").is_file():
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config()).save_pretrained(d)
    return d


def run_measured(argv: list[str], cwd: Path | None = None) -> tuple[int, int]:
    """(exit status, peak resident bytes) of a child process."""
    proc = subprocess.Popen(argv, cwd=cwd)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss * 1024  # KiB on Linux


def ours(args, model_dir: Path, mode: str, work: Path, checkpointing: bool = False) -> dict:
    out = work / f"ours-{mode}{'-ckpt' if checkpointing else ''}"
    argv = [
        sys.executable, "-m", "training", "--init-from", str(model_dir), "--data", args.data,
        "--block-size", str(args.seq), "--batch-size", str(args.batch), "--max-iters", str(args.steps),
        "--lr", str(LR), "--min-lr", str(LR), "--warmup", "0", "--weight-decay", "0", "--grad-clip", "1.0",
        "--dropout", "0.1", "--log-interval", "1", "--eval-interval", str(args.steps), "--eval-iters", "1",
        "--sample-tokens", "0", "--keep-last", "1", "--out", str(out), "--quiet",
        "--dtype", "float32",  # the job is float32 on both sides, on a CPU with bfloat16 too
    ]  # fmt: skip
    if mode == "lora":
        argv += ["--lora-rank", str(RANK), "--lora-alpha", str(2 * RANK), "--lora-targets", *TARGETS]
    if checkpointing:
        argv.append("--activation-checkpointing")
    rc, peak = run_measured(argv)
    if rc != 0:
        raise RuntimeError(f"gpt-train ({mode}) exited {rc}")
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    times = [r["ms_per_iter"] / 1000 for r in recs if r.get("kind") == "train"]
    return {"step_s": times, "peak_bytes": peak}


def theirs_child(args) -> None:
    """In a child process: transformers.Trainer (+ peft) on random windows of the same tokens;
    writes the step times to args.report."""
    import torch
    from transformers import GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

    import gpt

    ids = torch.tensor(gpt.get_tokenizer("gpt2").encode(Path(args.data).read_text(encoding="utf-8")))
    n = int(len(ids) * 0.9)  # the training split, as gpt-train's
    g = torch.Generator().manual_seed(1337)

    class Windows(torch.utils.data.Dataset):
        def __len__(self):
            return args.batch * (args.steps + 1)

        def __getitem__(self, i):
            start = int(torch.randint(n - args.seq, (1,), generator=g))
            x = ids[start : start + args.seq]
            return {"input_ids": x, "labels": x}  # the model shifts the labels itself

    model = GPT2LMHeadModel.from_pretrained(args.model_dir)  # GPT-2's dropout, 0.1, as ours
    if args.mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules=TARGETS, fan_in_fan_out=True
            ),
        )
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if not stamps:
                stamps.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            stamps.append(time.perf_counter())

    targs = TrainingArguments(
        output_dir=args.report + ".trainer",
        per_device_train_batch_size=args.batch,
        max_steps=args.steps,
        learning_rate=LR,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        logging_steps=args.steps,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=Windows(), callbacks=[Clock()])
    trainer.train()
    optim = type(
        trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    )
    Path(args.report).write_text(
        json.dumps({"step_s": [b - a for a, b in zip(stamps, stamps[1:])], "optim": optim.__name__})
    )


def theirs(args, model_dir: Path, mode: str, work: Path) -> dict:
    report = work / f"theirs-{mode}.json"
    argv = [
        sys.executable, __file__, "--child", "--mode", mode, "--model-dir", str(model_dir),
        "--report", str(report), "--data", args.data, "--batch", str(args.batch), "--seq", str(args.seq),
        "--steps", str(args.steps),
    ]  # fmt: skip
    rc, peak = run_measured(argv)
    if rc != 0:
        raise RuntimeError(f"transformers Trainer ({mode}) exited {rc}")
    return {**json.loads(report.read_text()), "peak_bytes": peak}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"))
    p.add_argument("--modes", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the median")
    p.add_argument(
        "--checkpointing", action="store_true", help="also gpt-train --activation-checkpointing (a third row)"
    )
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "gpt-serve-bench"))
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--report", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        theirs_child(args)
        return 0
    if not Path(args.data).is_file():
        print(f"benchmarks/finetune.py: {args.data} not found; pass --data", file=sys.stderr)
        return 2
    if args.steps <= args.warmup:
        print("benchmarks/finetune.py: --steps must exceed --warmup", file=sys.stderr)
        return 2
    import torch
    import transformers

    model_dir = gpt2_small(Path(args.cache))
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}, transformers "
          f"{transformers.__version__}; GPT-2 small, batch {args.batch} x {args.seq}, float32")  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
        for mode in args.modes:
            tools = [("gpt-train", ours), ("transformers Trainer", theirs)]
            if args.checkpointing:
                ckpt = functools.partial(ours, checkpointing=True)
                tools.insert(1, ("gpt-train --activation-checkpointing", ckpt))
            for tool, fn in tools:
                r = fn(args, model_dir, mode, Path(tmp))
                step = statistics.median(r["step_s"][args.warmup :])
                row = {"mode": mode, "tool": tool, "step_s": step,
                       "tokens_per_s": args.batch * args.seq / step, "peak_gib": r["peak_bytes"] / 2**30,
                       "optimizer": r.get("optim", "AdamW (fused)")}  # fmt: skip
                rows.append(row)
                print(f"  {mode:4s} {tool:37s} {row['tokens_per_s']:7.0f} tokens/s  ({step:.2f} s/step)  "
                      f"peak {row['peak_gib']:.2f} GiB", flush=True)  # fmt: skip
    print("\n| mode | tool | tokens/s | peak memory | ours / theirs: speed | ours / theirs: memory |")
    print("| --- | --- | --- | --- | --- | --- |")
    for mode in args.modes:
        *ours_rows, b = (r for r in rows if r["mode"] == mode)
        for a in ours_rows:
            speed, memory = a["tokens_per_s"] / b["tokens_per_s"], a["peak_gib"] / b["peak_gib"]
            print(f"| {mode} | {a['tool']} | {a['tokens_per_s']:.0f} | {a['peak_gib']:.2f} GiB | "
                  f"**{speed:.2f}x** | **{memory:.2f}x** |")  # fmt: skip
        print(f"| {mode} | transformers Trainer{' + peft' if mode == 'lora' else ''} ({b['optimizer']}) | "
              f"{b['tokens_per_s']:.0f} | {b['peak_gib']:.2f} GiB | | |")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps({"cpu": cpu_model(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
