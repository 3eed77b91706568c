"""The compiled decode step against the eager one, by batch size, in one process.

Two copies of the same random GPT-2-small weights (124M, nothing is downloaded), one eager and
one through `gpt.compile_decode`, each with the server's layout (linear weights packed for
batches, one cache of `max(batches)` rows, rows 0..B-1 decoding together). For each batch size
the two alternate for `--rounds` rounds of `--steps` greedy steps, so both see the same machine
state; each keeps its median, and the ratio compiled / eager is of those medians. On a busy or
throttling 2-core machine single runs swing by a third: only these paired ratios are figures.

Which steps compile depends on the CPU (gpt/compile.py): a single row always; batches only with
int8 layers on a CPU without oneDNN's int8 linear (no VNNI), where eager batches run on our
kernel too. Where a batch stays eager, the ratio shows the compiled model's dispatch costs
nothing: it should be about 1.

    python benchmarks/compiled_step.py --quant int8 --batches 1,8,32
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from llamacpp import cpu_info, int_list  # same directory: run as a script

import gpt
from gpt.compile import _batches_compile, warm_up


def build(quant: str, compiled: bool, rows: int):
    torch.manual_seed(0)
    model = gpt.GPT(gpt.preset("gpt2")).eval()
    if quant == "int8":
        gpt.quantize(model, "int8")
    gpt.pack_linear_weights(model, rows_hint=32)  # what the server's engine does
    cache = model.new_cache(rows, max_len=256)
    if compiled:
        gpt.compile_decode(model)
        print(f"  compiled in {warm_up(model, cache):.1f} s", flush=True)
    return model, cache


@torch.inference_mode()
def rate(model, cache, batch: int, steps: int, prompt_len: int = 32) -> float:
    rows = slice(0, batch)
    logits = model.start([list(range(100, 100 + prompt_len))] * batch, cache, rows=rows)
    nxt = gpt.kernels.argmax(logits)
    t0 = time.perf_counter()
    for _ in range(steps):
        logits = model.step(nxt[:, None], cache, rows=rows)
        nxt = gpt.kernels.argmax(logits)
    return batch * steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quant", choices=("fp32", "int8"), default="int8")
    ap.add_argument("--batches", type=int_list, default=[1, 8, 32])
    ap.add_argument("--steps", type=int, default=64, help="decode steps per round")
    ap.add_argument("--rounds", type=int, default=9, help="alternating rounds per batch size")
    args = ap.parse_args()
    cpu = cpu_info()
    print(
        f"CPU: {cpu['model']}, {cpu['cores']} cores, flags {' '.join(cpu['flags'])}; torch "
        f"{torch.__version__}"
    )
    print(f"GPT-2 small {args.quant}, {args.steps} steps per round, {args.rounds} rounds per batch size")
    rows = max(args.batches)
    eager, eager_cache = build(args.quant, False, rows)
    fast, fast_cache = build(args.quant, True, rows)
    print(f"batched steps compile on this CPU: {_batches_compile(fast.lm_head)}")
    print(f"{'batch':>5} {'eager tok/s':>12} {'compiled tok/s':>15} {'ratio':>6}")
    for b in args.batches:
        rate(eager, eager_cache, b, 4), rate(fast, fast_cache, b, 4)  # warm
        e, c = [], []
        for _ in range(args.rounds):
            e.append(rate(eager, eager_cache, b, args.steps))
            c.append(rate(fast, fast_cache, b, args.steps))
        me, mc = statistics.median(e), statistics.median(c)
        print(f"{b:>5} {me:>12.1f} {mc:>15.1f} {mc / me:>5.2f}x", flush=True)


if __name__ == "__main__":
    main()
