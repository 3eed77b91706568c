"""Decoding and serving on a CUDA GPU: ours against transformers, in 16-bit, one process, one run.

The same random GPT-2-small weights (124M; nothing is downloaded) in our GPT and in transformers'
GPT2LMHeadModel, cast to each `--dtypes` entry:

  checks   our CUDA-graph decode gives the eager decode's greedy tokens; our prompt logits
           against transformers'
  decode   greedy tokens/s of the per-token loop at each batch size: (N - 1) x batch / (time of N
           new tokens - time of 1), the median of `--repeats`, for
             ours eager         model.step, one kernel launch at a time
             ours graphs        model.step replaying CUDA graphs (gpt.cuda_graph_decode)
             ours graphs+comp   the same graphs recorded from the torch.compile'd step (--compile)
             HF eager           GPT2LMHeadModel.generate (its dynamic cache)
             HF static+comp     generate with cache_implementation="static", which transformers
                                compiles (--hf-compile, the batch sizes it names only: each
                                batch size is a compilation of its own)
           and batch 1 against the bandwidth roofline: the weights' bytes read once per token at
           the device-to-device copy rate measured here
  prefill  one forward over a `--prefill-len`-token prompt, ours and transformers'
  serve    (--serve) gpt-serve on this GPU at 1, 8 and 32 streaming clients (benchmarks/serve.py's
           load generator), with CUDA graphs (the default) and --eager

    python benchmarks/gpu.py --serve --compile --hf-compile 1
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serve  # noqa: E402  (benchmarks/serve.py: the server launcher and the streaming load generator)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import gpt  # noqa: E402

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def log(msg: str) -> None:
    print(msg, flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def copy_bandwidth(device, gib: float = 1.0, repeats: int = 10) -> float:
    """Device-to-device copy rate, bytes read plus bytes written per second (the roofline's)."""
    n = int(gib * 2**30) // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n * 4 / best


def build_models(dtype, device, compile_: bool):
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    base = gpt.GPT(gpt.preset("gpt2")).eval()
    with tempfile.TemporaryDirectory() as tmp:
        gpt.export_hf_gpt2(base, f"{tmp}/gpt2")
        hf = GPT2LMHeadModel.from_pretrained(f"{tmp}/gpt2", dtype=dtype).to(device).eval()
    eager = base.to(device=device, dtype=dtype)
    graphed = gpt.GPT(base.config).eval().to(device=device, dtype=dtype)
    graphed.load_state_dict(eager.state_dict())
    gpt.cuda_graph_decode(graphed)
    models = {"ours eager": eager, "ours graphs": graphed}
    if compile_:
        comp = gpt.GPT(base.config).eval().to(device=device, dtype=dtype)
        comp.load_state_dict(eager.state_dict())
        gpt.cuda_graph_decode(gpt.compile_decode(comp))
        models["ours graphs+comp"] = comp
    return models, hf


@torch.inference_mode()
def ours_generate(model, prompts: torch.Tensor, n: int, cache) -> torch.Tensor:
    """Greedy, `n` new tokens: prefill, then single-token steps; no host sync inside the loop."""
    B = prompts.shape[0]
    rows = slice(0, B)
    out = []
    logits = model.start(prompts.tolist(), cache, rows=rows)
    for i in range(n):
        nxt = logits.argmax(-1)
        out.append(nxt)
        if i + 1 < n:
            logits = model.step(nxt[:, None], cache, rows=rows)
    return torch.stack(out, 1)


@torch.inference_mode()
def hf_generate(hf, prompts: torch.Tensor, n: int, static: bool = False) -> torch.Tensor:
    extra = {"cache_implementation": "static"} if static else {}
    out = hf.generate(
        prompts,
        attention_mask=torch.ones_like(prompts),
        do_sample=False,
        max_new_tokens=n,
        min_new_tokens=n,
        pad_token_id=hf.config.eos_token_id,
        num_beams=1,
        **extra,
    )
    return out[:, prompts.shape[1] :]


def timed(fn) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def decode_rate(run, B: int, n: int, repeats: int) -> float:
    run(n)
    run(1)  # warm-up: graph recording, compilation, allocator
    long = statistics.median(timed(lambda: run(n)) for _ in range(repeats))
    short = statistics.median(timed(lambda: run(1)) for _ in range(repeats))
    return B * (n - 1) / (long - short)


def checks(models: dict, hf, device, dtype_name: str) -> None:
    g = torch.Generator().manual_seed(3)
    prompts = torch.randint(0, 50257, (4, 24), generator=g).to(device)
    eager, graphed = models["ours eager"], models["ours graphs"]
    cache_a, cache_b = eager.new_cache(4, 64), graphed.new_cache(4, 64)
    a, b = ours_generate(eager, prompts, 32, cache_a), ours_generate(graphed, prompts, 32, cache_b)
    same = "identical" if torch.equal(a, b) else f"DIFFERENT from token {int((a != b).any(0).nonzero()[0])}"
    with torch.inference_mode():
        diff = (eager(prompts).float() - hf(prompts).logits.float()).abs().max().item()
    log(
        f"check {dtype_name}: graphs vs eager greedy tokens (4 rows x 32): {same}; "
        f"prompt logits vs transformers: max |diff| {diff:.2e}"
    )


def bench_decode(
    models: dict, hf, device, batches: list[int], n: int, prompt_len: int, repeats: int, hf_compile: list[int]
) -> dict:
    res = {}
    g = torch.Generator().manual_seed(1)
    caches = {name: m.new_cache(max(batches), max_len=prompt_len + n) for name, m in models.items()}
    for B in batches:
        prompts = torch.randint(0, 50257, (B, prompt_len), generator=g).to(device)
        runs = {
            name: (lambda k, m=m, c=caches[name]: ours_generate(m, prompts, k, c))
            for name, m in models.items()
        }
        runs["HF eager"] = lambda k: hf_generate(hf, prompts, k)
        if B in hf_compile:
            runs["HF static+comp"] = lambda k: hf_generate(hf, prompts, k, static=True)
        for name, run in runs.items():
            t0 = time.perf_counter()
            try:
                res[(name, B)] = decode_rate(run, B, n, repeats)
                log(
                    f"  {name:<17} batch {B:>2}: {res[(name, B)]:8.1f} tok/s  "
                    f"[{time.perf_counter() - t0:.1f} s]"
                )
            except Exception as e:  # noqa: BLE001 (a variant that fails is reported, the others go on)
                log(
                    f"  {name:<17} batch {B:>2}: failed: {type(e).__name__}: {' '.join(str(e).split())[:600]}"
                )
    return res


@torch.inference_mode()
def bench_prefill(models: dict, hf, device, length: int, repeats: int) -> dict:
    ids = torch.randint(0, 50257, (1, length), generator=torch.Generator().manual_seed(2)).to(device)
    model = models["ours eager"]
    cache = model.new_cache(1, max_len=length)
    runs = {
        "ours": lambda: model.start(ids.tolist(), cache).argmax(-1),
        "HF": lambda: hf(ids).logits[:, -1].argmax(-1),
    }
    out = {}
    for name, run in runs.items():
        run()
        out[name] = statistics.median(timed(run) for _ in range(repeats))
    return out


def bench_serve(
    device, dtype_name: str, model_dir: str, prompt: list[int], n: int, clients: list[int]
) -> dict:
    out = {}
    for label, extra in (("graphs", ()), ("eager", ("--eager",))):
        port = serve.free_port()
        url = f"http://127.0.0.1:{port}"
        args = ("--device", str(device), "--dtype", dtype_name, *extra)

        def start(logf, port=port, args=args):
            return serve.start_server(model_dir, port, max(clients), logf, args)

        with serve.served(f"gpt-serve {label}", start, url):
            out[label] = asyncio.run(_rounds(url, prompt, n, clients))
        for r in out[label]:
            log(
                f"  serve {dtype_name} {label:<6} {r['clients']:>2} clients: {r['rate']:8.1f} tok/s, "
                f"TTFT p50 {r['ttft50'] * 1e3:6.1f} ms, ITL p50 {r['itl50'] * 1e3:5.2f} ms, "
                f"ITL p99 {r['itl99'] * 1e3:5.2f} ms"
            )
    return out


async def _rounds(url: str, prompt: list[int], n: int, clients: list[int]) -> list[dict]:
    import httpx

    limits = httpx.Limits(max_connections=max(clients) + 4, max_keepalive_connections=max(clients) + 4)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        name = (await client.get(f"{url}/v1/models")).json()["data"][0]["id"]
        make = lambda: serve.http_client(client, url, name, prompt, n)  # noqa: E731
        await serve.run_round(make, 1)
        return [await serve.run_round(make, c) for c in clients]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtypes", default="float16,bfloat16")
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--prefill-len", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--compile", action="store_true", help="also ours with graphs of the torch.compile'd step"
    )
    ap.add_argument(
        "--hf-compile",
        default="",
        help="batch sizes at which to run transformers' static cache + compile (each compiles anew), e.g. 1",
    )
    ap.add_argument("--serve", action="store_true", help="also gpt-serve under 1, 8 and 32 streaming clients")
    ap.add_argument("--clients", default="1,8,32")
    args = ap.parse_args()
    import transformers

    device = torch.device(args.device)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    hf_compile = [int(b) for b in args.hf_compile.split(",") if b]
    clients = [int(c) for c in args.clients.split(",")]
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        log(
            f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs; torch "
            f"{torch.__version__} "
            f"(CUDA {torch.version.cuda}), transformers {transformers.__version__}"
        )
    bw = copy_bandwidth(device)
    log(f"device-to-device copy: {bw / 1e9:.0f} GB/s (read + write)")

    table = {}
    for dtype_name in args.dtypes.split(","):
        dtype = DTYPES[dtype_name]
        models, hf = build_models(dtype, device, args.compile)
        checks(models, hf, device, dtype_name)
        log(
            f"decode {dtype_name}: prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy, "
            f"median of {args.repeats}"
        )
        rates = bench_decode(
            models, hf, device, batches, args.new_tokens, args.prompt_len, args.repeats, hf_compile
        )
        weight_bytes = sum(p.numel() * p.element_size() for p in models["ours eager"].parameters())
        roof = bw / weight_bytes  # tokens/s at batch 1 if every step read the weights once at copy speed
        for name in [k for k, b in rates if b == 1]:
            log(
                f"  batch 1 {name:<17} {100 * rates[(name, 1)] / roof:5.1f}% of the roofline "
                f"({roof:.0f} tok/s)"
            )
        pre = bench_prefill(models, hf, device, args.prefill_len, args.repeats)
        log(
            f"prefill {dtype_name} {args.prefill_len} tokens: ours {pre['ours'] * 1e3:.2f} ms, "
            f"HF {pre['HF'] * 1e3:.2f} ms (HF / ours {pre['HF'] / pre['ours']:.2f}x)"
        )
        table[dtype_name] = (rates, pre)
        if args.serve:
            with tempfile.TemporaryDirectory() as tmp:
                gpt.save(models["ours eager"].float().cpu(), tmp)
                tok = gpt.get_tokenizer("gpt2")
                table[dtype_name] += (
                    bench_serve(
                        device,
                        dtype_name,
                        tmp,
                        serve.prompt_ids(tok, args.prompt_len),
                        args.new_tokens,
                        clients,
                    ),
                )
        del models, hf
        if device.type == "cuda":
            torch.cuda.empty_cache()

    log("\n| dtype | variant | " + " | ".join(f"batch {b}" for b in batches) + " |")
    log("| --- | --- | " + " | ".join("---" for _ in batches) + " |")
    for dtype_name, (rates, *_rest) in table.items():
        for name in dict.fromkeys(k for k, _ in rates):
            cells = [f"{rates[(name, b)]:.0f}" if (name, b) in rates else "" for b in batches]
            log(f"| {dtype_name} | {name} | " + " | ".join(cells) + " |")
    for dtype_name, (rates, *_rest) in table.items():
        for b in batches:
            if ("ours graphs", b) in rates and ("HF eager", b) in rates:
                extra = ""
                if ("HF static+comp", b) in rates:
                    extra = (
                        f", vs HF static+comp {rates[('ours graphs', b)] / rates[('HF static+comp', b)]:.2f}x"
                    )
                log(
                    f"ratio {dtype_name} batch {b}: ours graphs / HF eager "
                    f"{rates[('ours graphs', b)] / rates[('HF eager', b)]:.2f}x, graphs / ours eager "
                    f"{rates[('ours graphs', b)] / rates[('ours eager', b)]:.2f}x{extra}"
                )


if __name__ == "__main__":
    main()
