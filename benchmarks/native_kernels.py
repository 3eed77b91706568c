"""Our single-row kernels (gpt.kernels) against PyTorch's, on one machine, in one process.

Every fast path needs a fallback that is no slower elsewhere, and which one wins depends on the
CPU: run this on the machine you serve from. It times the GPT-2-small (random weights) decode
step of one stream, fp32 and int8, eagerly, with our kernels and with PyTorch's (the ones
gpt.kernels falls back to), in interleaved rounds so that a machine whose speed drifts treats
both alike; it prints the CPU, the memory bandwidth, each variant's best and median step time,
the ratio, and the kernels alone (every GPT-2 weight matrix once, as a decode step reads them).

    .venv/bin/python benchmarks/native_kernels.py            # --rounds 5 --steps 30
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gpt  # noqa: E402
import gpt.kernels as kernels  # noqa: E402
from gpt.kernels.reference import quantize_rows  # noqa: E402


def cpu_line() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        flags = [f for f in fields.get("Flags", "").split() if f.startswith(("avx", "fma")) or "vnni" in f]
        return (
            f"{fields.get('Model name', '?').strip()} (family {fields.get('CPU family', '?').strip()}), "
            f"{os.cpu_count()} cores; {' '.join(flags)}"
        )
    except (OSError, ValueError):
        return platform.processor() or "unknown CPU"


def bandwidth_gbs() -> float:
    big = torch.empty(1 << 28)  # 1 GiB of float32
    big.fill_(1.0)
    best = min(_timed(big.sum) for _ in range(5))
    return big.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def step_times(model, rounds: int, steps: int) -> dict[str, list[float]]:
    """Median step time (s) per round, for our kernels and PyTorch's, rounds interleaved."""
    real = kernels._isa
    variants = {"ours": real, "torch": lambda: 0}
    out: dict[str, list[float]] = {k: [] for k in variants}
    token = torch.zeros(1, 1, dtype=torch.long)
    with torch.inference_mode():
        for _ in range(rounds):
            for name, isa in variants.items():
                kernels._isa = isa
                cache = model.new_cache(1, 512)
                model.start([list(range(64))], cache)
                times = [_timed(lambda: model.step(token, cache)) for _ in range(steps)]
                out[name].append(statistics.median(times[3:]))
    kernels._isa = real
    return out


def kernel_times(model, rounds: int) -> dict[str, float]:
    """Best time (s) for one pass over every linear layer's weight with a single row."""
    layers = [m for m in model.modules() if isinstance(m, gpt.quantization.Int8Linear)]
    xs = {m: quantize_rows(torch.randn(1, m.in_features), torch.uint8)[0] for m in layers}
    xi = {m: quantize_rows(torch.randn(1, m.in_features))[0] for m in layers}

    def ours():
        for m in layers:
            torch.ops.gpt.gemv_u8s8(xs[m], m.weight_rows, m.weight_sum)

    def theirs():
        for m in layers:
            torch._int_mm(xi[m], m.weight_q.t())

    best = {"ours": float("inf"), "torch": float("inf")}
    with torch.inference_mode():
        for _ in range(rounds * 4):
            best["ours"] = min(best["ours"], _timed(ours))
            best["torch"] = min(best["torch"], _timed(theirs))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    print(f"CPU: {cpu_line()}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; kernels: {kernels.status()}")
    if not kernels.f32_available():
        print("our kernels are not in use here: nothing to compare")
        return
    print(f"memory read bandwidth (sum of a 1 GiB tensor): {bandwidth_gbs():.1f} GB/s")
    for kind in ("fp32", "int8"):
        torch.manual_seed(0)
        model = gpt.GPT(gpt.preset("gpt2")).eval()
        if kind == "int8":
            gpt.quantize(model, "int8")
        gpt.pack_linear_weights(model)  # as the server does (multi-row calls; one row is what we time)
        t = step_times(model, args.rounds, args.steps)
        ours, theirs = min(t["ours"]), min(t["torch"])
        print(
            f"{kind} decode step, batch 1: ours {ours * 1e3:.2f} ms (median "
            f"{statistics.median(t['ours']) * 1e3:.2f}), "
            f"torch {theirs * 1e3:.2f} ms (median {statistics.median(t['torch']) * 1e3:.2f}); "
            f"{theirs / ours:.2f}x"
        )
        if kind == "int8":
            k = kernel_times(model, args.rounds)
            nbytes = sum(
                m.weight_q.numel() for m in model.modules() if isinstance(m, gpt.quantization.Int8Linear)
            )
            print(
                f"int8 single-row products over all {nbytes / 1e6:.0f} MB of weights: ours "
                f"{k['ours'] * 1e3:.2f} ms "
                f"({nbytes / k['ours'] / 1e9:.1f} GB/s), torch._int_mm {k['torch'] * 1e3:.2f} ms "
                f"({nbytes / k['torch'] / 1e9:.1f} GB/s); {k['torch'] / k['ours']:.2f}x"
            )


if __name__ == "__main__":
    main()
