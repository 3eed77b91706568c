"""LoRA against full fine-tuning, and our LoRA layer against peft's, on one machine in one run.

Each mode runs in a fresh process (peak memory is a process's high-water mark) on the same
GPT-2-medium-shaped model (355M parameters, random weights: nothing is downloaded), fp32 on CPU:
a training step is a forward and backward over --batch x --seq tokens and a fused AdamW step
over the parameters that train, as gpt-train does. It prints the peak resident memory and the
median step time of each mode, and the ratios against full fine-tuning.

    .venv/bin/python benchmarks/lora.py                      # gpt2-medium, batch 2 x 256, rank 8
    .venv/bin/python benchmarks/lora.py --preset gpt2 --steps 5

Modes: full (every weight trains), lora (gpt.lora: rank-R adapters on the attention and MLP
projections), peft (the same adapters through peft's LoraConfig/get_peft_model, when peft is
installed: pip install peft).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TARGETS = ["c_attn", "c_proj", "c_fc"]

from first_run import cpu_model  # noqa: E402 (benchmarks/ is the script's directory)


def one_mode(args) -> dict:
    """Run in a child process: build, adapt, train `steps` steps; report times and memory."""
    import torch
    import torch.nn.functional as F

    import gpt
    from gpt import lora

    torch.manual_seed(0)
    model = gpt.build_model(gpt.preset(args.preset, dropout=0.0)).train()
    if args.mode == "lora":
        lora.apply(model, args.rank, 2.0 * args.rank, targets=TARGETS)
    elif args.mode == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=TARGETS)
        )
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    vocab = gpt.preset(args.preset).vocab_size
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, vocab, (args.batch, args.seq + 1), generator=g)
    times = []
    for i in range(args.steps + 1):  # the first step allocates the optimizer state: not timed
        t = time.perf_counter()
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "mode": args.mode,
        "trainable": sum(p.numel() for p in params),
        "params": sum(p.numel() for p in model.parameters()),
        "step_s": statistics.median(times),
        "peak_gib": peak_kb / 2**20,
        "loss": float(loss),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="gpt2-medium")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--modes", default="full,lora,peft")
    p.add_argument("--mode", help=argparse.SUPPRESS)  # the child process's
    args = p.parse_args()
    if args.mode:
        print(json.dumps(one_mode(args)))
        return

    print(
        f"CPU: {cpu_model()}, torch threads: default; {args.preset}, batch {args.batch} x {args.seq} tokens, "
        f"rank {args.rank}, median of {args.steps} steps"
    )
    rows = []
    for mode in args.modes.split(","):
        cmd = [
            sys.executable,
            __file__,
            "--mode",
            mode,
            "--preset",
            args.preset,
            "--batch",
            str(args.batch),
            "--seq",
            str(args.seq),
            "--rank",
            str(args.rank),
            "--steps",
            str(args.steps),
        ]
        print(f"  running {mode} ...", flush=True)
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["?"])[-1]
            print(f"  {mode}: failed ({last})")
            continue
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    full = next((r for r in rows if r["mode"] == "full"), None)
    print("\n| mode | trainable parameters | peak memory | step time | memory vs full | step time vs full |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        mem = f"{r['peak_gib'] / full['peak_gib']:.2f}x" if full else "-"
        spd = f"{r['step_s'] / full['step_s']:.2f}x" if full else "-"
        print(
            f"| {r['mode']} | {r['trainable'] / 1e6:.2f}M of {r['params'] / 1e6:.0f}M | "
            f"{r['peak_gib']:.2f} GiB "
            f"| {r['step_s']:.2f} s | {mem} | {spd} |"
        )


if __name__ == "__main__":
    main()
