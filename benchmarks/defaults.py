"""gpt-serve's default settings against every combination of the flags they stand for.

`gpt-serve --model X` with no flags chooses the compiled decode step and the KV cache's dtype for
the machine (gpt.fast_defaults); `--quantize int8` stays explicit. This benchmark checks that the
choice is the fast one: for float32 and for int8 weights it starts one server with no flags and
one per combination of `--compile/--no-compile` and `--kv-cache-dtype float32/float16`, all on
the same GPT-2-small-shaped checkpoint (random weights, 124M), and measures each at 1 and at 32
concurrent streaming clients (greedy, `ignore_eos`, so every request decodes exactly
`--max-tokens`): all clients' tokens per second, and for one client one over the median gap
between its tokens. The servers of one weight type run side by side, and the rounds go over them in
turn, each round starting one server later, so a slow spell of the machine falls on all of them
alike; each figure is the median of the rounds (a single round on a shared VM varies by 10-15%).

It prints the CPU, what each default server logged it chose, a table of tok/s, and the default's
rate as a share of the best combination's, and writes the figures to --out (JSON).

    python benchmarks/defaults.py                          # 5 rounds, 128 tokens per client
    python benchmarks/defaults.py --rounds 1 --max-tokens 32 --weights float32   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time

import httpx
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serve  # noqa: E402 (the benchmark scripts sit beside each other, not in a package)
from llamacpp import cpu_info  # noqa: E402

import gpt  # noqa: E402

COMBINATIONS = {
    "no flags": (),
    "--no-compile, f32 KV": ("--no-compile", "--kv-cache-dtype", "float32"),
    "--no-compile, f16 KV": ("--no-compile", "--kv-cache-dtype", "float16"),
    "--compile, f32 KV": ("--compile", "--kv-cache-dtype", "float32"),
    "--compile, f16 KV": ("--compile", "--kv-cache-dtype", "float16"),
}


def start(model_dir: str, weights: str, extra: tuple[str, ...], clients: int):
    port = serve.free_port()
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    quant = ("--quantize", "int8") if weights == "int8" else ()
    proc = serve.start_server(model_dir, port, clients, log, (*quant, *extra, "--log-level", "info"))
    return proc, f"http://127.0.0.1:{port}", log


def chosen(log) -> str:
    """The start-up line that says what the server decodes with."""
    log.seek(0)
    lines = [line.strip() for line in log if "decoding with:" in line]
    return lines[-1].split("decoding with:", 1)[1].strip() if lines else "(not logged)"


async def measure(url: str, prompt: list[int], max_tokens: int, clients: int) -> float:
    """Tokens per second: of all clients together; for one client, one over the median gap
    between its tokens, which a moment's stall of the machine does not move."""
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        name = (await client.get(f"{url}/v1/models")).json()["data"][0]["id"]
        r = await serve.run_round(
            lambda: serve.http_client(client, url, name, prompt, max_tokens),
            clients,
        )
    return 1 / r["itl50"] if clients == 1 else r["rate"]


def bench(model_dir: str, weights: str, prompt: list[int], args) -> dict:
    servers = {}
    try:
        for label, extra in COMBINATIONS.items():
            t0 = time.perf_counter()
            proc, url, log = start(model_dir, weights, extra, max(args.clients))
            servers[label] = (proc, url, log)
            asyncio.run(serve.wait_ready(url, proc, log, limit=900))
            print(f"  {weights} {label:<22} ready in {time.perf_counter() - t0:5.1f} s", flush=True)
        for _, url, _ in servers.values():  # first-call costs stay out of the figures
            asyncio.run(measure(url, prompt, 8, 1))
        rates = {label: {c: [] for c in args.clients} for label in servers}
        order = list(servers)
        for n in range(args.rounds):
            for clients in args.clients:
                for label in order:
                    rate = asyncio.run(measure(servers[label][1], prompt, args.max_tokens, clients))
                    rates[label][clients].append(rate)
                    print(
                        f"  round {n + 1}/{args.rounds} {weights} {label:<22} {clients:>2} clients: "
                        f"{rate:7.1f} tok/s",
                        flush=True,
                    )
            order = order[1:] + order[:1]  # each server takes each place in the order in turn
        return {"chosen": chosen(servers["no flags"][2]), "rates": rates}
    finally:
        for proc, _, log in servers.values():
            serve.stop_server(proc)
            log.close()
            os.unlink(log.name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default="float32,int8", help="comma-separated: float32, int8")
    ap.add_argument("--clients", default="1,32", help="comma-separated concurrent client counts")
    ap.add_argument("--rounds", type=int, default=5, help="rounds over all servers (the median is kept)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128, help="tokens each client decodes")
    ap.add_argument("--out", default=None, help="write the figures here as JSON")
    args = ap.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]

    cpu = cpu_info()
    print(f"CPU: {cpu['model']}, {cpu['cores']} cores, flags {' '.join(cpu['flags'])}")
    print(f"torch {torch.__version__}; GPT-2 small random weights; prompt {args.prompt_len} tokens")
    results = {"cpu": cpu, "torch": torch.__version__, "max_tokens": args.max_tokens, "weights": {}}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model, tokenizer = gpt.GPT(gpt.preset("gpt2")).eval(), gpt.get_tokenizer("gpt2")
        model_dir = os.path.join(tmp, "gpt2-random")
        gpt.save(model, model_dir)
        del model
        prompt = serve.prompt_ids(tokenizer, args.prompt_len)
        for weights in args.weights.split(","):
            results["weights"][weights] = bench(model_dir, weights, prompt, args)

    print()
    head = " | ".join(f"{c} clients" for c in args.clients)
    print(f"| weights | flags | {head} |  (tok/s, median of {args.rounds} rounds)")
    print("|---|---|" + "---|" * len(args.clients))
    for weights, r in results["weights"].items():
        r["median"] = {k: {c: statistics.median(v[c]) for c in args.clients} for k, v in r["rates"].items()}
        for label, by_clients in r["median"].items():
            cells = " | ".join(f"{by_clients[c]:.1f}" for c in args.clients)
            print(f"| {weights} | {label} | {cells} |")
    print()
    for weights, r in results["weights"].items():
        print(f"{weights}, no flags chose: {r['chosen']}")
        med = r["median"]
        for c in args.clients:
            best_label = max((k for k in med if k != "no flags"), key=lambda k: med[k][c])
            share = med["no flags"][c] / med[best_label][c]
            r.setdefault("default_vs_best", {})[c] = share
            print(f"  {c:>2} clients: no flags {share:.3f}x of the best combination ({best_label})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
