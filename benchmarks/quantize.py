"""int8 against fp32, and the int8 candidates against each other, in one run.

Speed: the decode step (model.step of one token per row, KV cache of a 64-token prompt) of
GPT-2-small-shaped random weights at batch 1, 8 and 32, median of `--steps` steps, for
  fp32          our float model, linear weights packed for oneDNN (what the server runs)
  int8          gpt.quantize: per-row int8 activations x per-channel int8 weights, torch._int_mm
  int8-tensor   the same weights through quantized::linear_dynamic (fbgemm/x86), whose
                activation scale is shared by the whole batch
  int8-wo       weight-only: the int8 weight dequantized to fp32 at each call, then F.linear
and, with `--torchao` (and torchao installed), torchao's Int8DynamicActivationInt8WeightConfig.

Quality, with `--checkpoint DIR --data FILE`: validation loss (last 10% of FILE, in blocks of the
model's context) of the float model and of its int8 copy, and greedy agreement on 16 prompts
drawn from the data, e.g. on the char-level Shakespeare recipe's checkpoint (benchmarks/train.py).

    python benchmarks/quantize.py
    python benchmarks/quantize.py --checkpoint runs/char/best --data ../shared/data/tinyshakespeare.txt
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import gpt
from gpt.quantization import Int8Linear


def cpu_line() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return "CPU: unknown"
    info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = set(info.get("Flags", "").split())
    wanted = [
        f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8") if f in flags
    ]
    return (
        f"CPU: {info.get('Model name', '?').strip()}; {', '.join(wanted)}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )


class _TensorScaleInt8(nn.Module):
    """quantized::linear_dynamic: int8 weights, activations quantized with one scale per call."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = (w.abs().amax(1) / 127).clamp(min=1e-12).double()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # quantized tensors are deprecated: this is a candidate only
            qw = torch.quantize_per_channel(
                w, scale, torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8
            )
        self.packed = torch.ops.quantized.linear_prepack(
            qw, None if linear.bias is None else linear.bias.detach()
        )
        self.n = w.shape[0]

    def forward(self, x):
        y = torch.ops.quantized.linear_dynamic(x.reshape(-1, x.shape[-1]), self.packed, True)
        return y.reshape(*x.shape[:-1], self.n)


class _WeightOnlyInt8(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.q = Int8Linear.from_float(linear.weight, linear.bias)

    def forward(self, x):
        w = self.q.weight_q.to(x.dtype) * self.q.weight_scale[:, None]
        return F.linear(x, w, self.q.bias)


def _swap(model: nn.Module, make) -> nn.Module:
    for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, make(m))
    return model.eval()


def variants(base: gpt.GPT, use_torchao: bool) -> dict[str, nn.Module]:
    def copy():
        m = gpt.GPT(base.config)
        m.load_state_dict(base.state_dict())
        return m.eval()

    fp32 = copy()
    gpt.pack_linear_weights(fp32)
    out = {
        "fp32": fp32,
        "int8": gpt.quantize(copy()),
        "int8-tensor": _swap(copy(), _TensorScaleInt8),
        "int8-wo": _swap(copy(), _WeightOnlyInt8),
    }
    if use_torchao:
        try:
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

            m = copy()
            m.lm_head.weight = nn.Parameter(m.lm_head.weight.detach().clone())  # untie for torchao
            quantize_(m, Int8DynamicActivationInt8WeightConfig())
            out["torchao-int8"] = m
        except Exception as e:  # not installed, or no CPU path in this version
            print(f"torchao: skipped ({type(e).__name__}: {e})")
    return out


@torch.inference_mode()
def step_ms(model, batch: int, steps: int, prompt_len: int = 64) -> float:
    cache = model.new_cache(batch, max_len=prompt_len + steps + 4)
    logits = model.start([list(range(1, prompt_len + 1))] * batch, cache)
    times = []
    for _ in range(steps):
        tokens = logits.argmax(-1)[:, None]
        t = time.perf_counter()
        logits = model.step(tokens, cache)
        times.append(time.perf_counter() - t)
    return statistics.median(times[2:]) * 1e3


def speed(args) -> None:
    torch.manual_seed(0)
    base = gpt.GPT(gpt.preset("gpt2")).eval()
    models = variants(base, args.torchao)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    print(f"decode step, GPT-2 small (124M) random weights, 64-token prompt, median of {args.steps} steps")
    print(f"{'variant':>14} " + " ".join(f"{'batch ' + str(b):>16}" for b in batches))
    ref = {}
    for name, model in models.items():
        cells = []
        for b in batches:
            ms = step_ms(model, b, args.steps)
            ref.setdefault(b, ms)  # fp32 comes first
            cells.append(f"{b / ms * 1e3:7.1f} t/s {ref[b] / ms:4.2f}x")
        print(f"{name:>14} " + " ".join(f"{c:>16}" for c in cells), flush=True)
    print("(t/s: tokens/s of the step alone; x: speed-up over fp32 at the same batch)")


@torch.no_grad()
def quality(args) -> None:
    model, tok = gpt.load(args.checkpoint)
    model = model.float().eval()
    quantized = gpt.build_model(model.config)
    quantized.load_state_dict(model.state_dict())
    gpt.quantize(quantized)
    text = open(args.data, encoding="utf-8", errors="replace").read()
    ids = torch.tensor(tok.encode(text[int(0.9 * len(text)) :]), dtype=torch.long)
    T = model.config.block_size
    blocks = torch.stack([ids[i : i + T + 1] for i in range(0, len(ids) - T - 1, T)][: args.max_blocks])
    losses = []
    for m in (model, quantized):
        total = sum(F.cross_entropy(m(b[None, :-1])[0], b[1:]).item() for b in blocks)
        losses.append(total / len(blocks))
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, len(ids) - 32, (16,), generator=g).tolist()
    prompts = [ids[s : s + 32].tolist() for s in starts]
    params = gpt.SamplingParams(max_new_tokens=32, temperature=0, ignore_eos=True)
    a = gpt.complete(model, tok, prompts, params)
    b = gpt.complete(quantized, tok, prompts, params)
    same = sum(x == y for ca, cb in zip(a, b) for x, y in zip(ca.token_ids, cb.token_ids))
    first = sum(
        next((i for i, (x, y) in enumerate(zip(ca.token_ids, cb.token_ids)) if x != y), 32)
        for ca, cb in zip(a, b)
    ) / len(a)
    print(f"quality on {args.data} (last 10%, {len(blocks)} blocks of {T} tokens), {args.checkpoint}:")
    print(
        f"  validation loss fp32 {losses[0]:.4f}  int8 {losses[1]:.4f}  "
        f"relative change {100 * (losses[1] - losses[0]) / losses[0]:+.2f}%"
    )
    print(
        f"  greedy agreement: {same}/{32 * len(a)} tokens; first difference after {first:.1f} tokens "
        "on average"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--torchao", action="store_true", help="also time torchao's int8 dynamic quantization")
    ap.add_argument("--checkpoint", help="a trained checkpoint for the quality comparison")
    ap.add_argument("--data", help="text whose last 10%% is the validation set")
    ap.add_argument("--max-blocks", type=int, default=64)
    ap.add_argument("--skip-speed", action="store_true")
    args = ap.parse_args()
    print(cpu_line())
    if not args.skip_speed:
        speed(args)
    if args.checkpoint:
        if not args.data:
            ap.error("--checkpoint needs --data")
        quality(args)


if __name__ == "__main__":
    main()
