"""Serving throughput and latency: concurrent streaming clients against the real server.

Starts `python -m server` on a GPT-2-small-shaped checkpoint (random weights, 124M, fp32, written
to a temporary directory unless `--model` is given), then for each client count runs that many
concurrent streaming `/v1/completions` requests (a fixed ~32-token prompt, greedy, `ignore_eos`
so every request generates exactly `--max-tokens`) and reports:

  tok/s    generated tokens of all clients / wall time from the first request to the last token
  TTFT     time to first token (request sent -> first SSE chunk carrying text), p50 / p99
  ITL      gap between consecutive SSE chunks of a stream, p50 / p99 (a chunk normally holds one
           token; a client that falls behind gets the tokens that piled up merged into one chunk)

and, measured in the same run on the same machine before the server starts, the in-process
baseline: `gpt.generate`'s batched decoding (`generate_batch`) at batch 1 and batch 32, with
the ratios server / baseline. `--engine` drives the engine in-process instead of over HTTP (no
server, no SSE), to separate the engine's cost from the HTTP layer's.

    python benchmarks/serve.py                       # 1, 8, 32 clients, 128 tokens each
    python benchmarks/serve.py --clients 1,32 --max-tokens 32 --no-baseline   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch

import gpt
from gpt import SamplingParams

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT_TEXT = (
    "The history of the city begins in the early years of the river trade, when merchants "
    "from the coast first built their warehouses along the northern bank of the harbour"
)


@dataclass
class Stream:
    sent: float = 0.0
    chunk_times: list[float] = field(default_factory=list)
    tokens: int = 0
    text: str = ""
    usage: dict = field(default_factory=dict)


def prompt_ids(tokenizer, n: int) -> list[int]:
    ids = tokenizer.encode(PROMPT_TEXT)
    while len(ids) < n:
        ids += ids
    return ids[:n]


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


# --- baseline: in-process batched generation ---------------------------------------------


def baseline_rate(model, tokenizer, batch: int, prompt: list[int], new_tokens: int, repeats: int) -> float:
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    gpt.complete(
        model, tokenizer, [prompt] * batch, SamplingParams(max_new_tokens=2, temperature=0)
    )  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = sum(len(c.token_ids) for c in gpt.complete(model, tokenizer, [prompt] * batch, params))
        best = min(best, time.perf_counter() - t0)
    return n / best


# --- clients ----------------------------------------------------------------------------


async def http_client(
    client, url: str, model_name: str, prompt: list[int] | str, max_tokens: int, extra: dict | None = None
) -> Stream:
    """One streaming greedy completion; `extra` adds server-specific request fields."""
    s = Stream(sent=time.perf_counter())
    body = {
        "model": model_name,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
        **(extra or {}),
    }
    async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread()).decode()[:300]}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                s.usage = chunk["usage"]
                s.tokens = s.usage["completion_tokens"]
            piece = "".join(c.get("text") or "" for c in chunk.get("choices", []))
            if piece:
                s.chunk_times.append(time.perf_counter())
                s.text += piece
    return s


async def engine_client(engine, prompt: list[int], max_tokens: int) -> Stream:
    s = Stream(sent=time.perf_counter())
    handle = engine.submit(prompt, SamplingParams(max_new_tokens=max_tokens, temperature=0, ignore_eos=True))
    async for out in handle:
        if out.text:
            s.chunk_times.append(time.perf_counter())
        s.tokens = out.completion_tokens
    return s


async def run_round(make_client, clients: int) -> dict:
    t0 = time.perf_counter()
    streams = await asyncio.gather(*(make_client() for _ in range(clients)))
    wall = time.perf_counter() - t0
    ttft = [s.chunk_times[0] - s.sent for s in streams if s.chunk_times]
    itl = [b - a for s in streams for a, b in zip(s.chunk_times, s.chunk_times[1:])]
    tokens = sum(s.tokens for s in streams)
    return dict(
        clients=clients,
        tokens=tokens,
        wall=wall,
        rate=tokens / wall,
        ttft50=pct(ttft, 50),
        ttft99=pct(ttft, 99),
        itl50=pct(itl, 50),
        itl99=pct(itl, 99),
    )


# --- the server -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    model_dir: str, port: int, max_batch_size: int, log, extra_args: tuple[str, ...] = ()
) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "server",
        "--model",
        model_dir,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-batch-size",
        str(max_batch_size),
        "--log-level",
        "warning",
        *extra_args,
    ]
    # the log goes to a file: an unread pipe would block the server once its buffer filled up
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


async def wait_ready(
    url: str, proc: subprocess.Popen, log, limit: float = 300.0, path: str = "/ready"
) -> None:
    import httpx

    deadline = time.monotonic() + limit
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"the server exited with code {proc.returncode}: {log.read()[-2000:]}")
            try:
                if (await client.get(f"{url}{path}")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.25)
    raise RuntimeError(f"the server was not ready within {limit:.0f} s")


async def bench_http(args, model_dir: str, prompt: list[int]) -> list[dict]:
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tempfile.TemporaryFile("w+")
    proc = start_server(model_dir, port, max(args.clients), log)
    try:
        await wait_ready(url, proc, log)
        limits = httpx.Limits(
            max_connections=max(args.clients) + 4, max_keepalive_connections=max(args.clients) + 4
        )
        async with httpx.AsyncClient(timeout=None, limits=limits) as client:
            name = (await client.get(f"{url}/v1/models")).json()["data"][0]["id"]
            make = lambda: http_client(client, url, name, prompt, args.max_tokens)  # noqa: E731
            await run_round(make, 1)  # warm-up: first-call costs stay out of the figures
            return [await run_round(make, c) for c in args.clients]
    finally:
        stop_server(proc)
        log.close()


@contextlib.contextmanager
def served(label: str, start, url: str, health: str = "/ready"):
    """Start a server (`start(logfile)` -> Popen), wait until `url + health` answers 200, and
    stop it on leaving; on an error, print the tail of its log. Yields the process."""
    logf = tempfile.TemporaryFile("w+")
    proc = start(logf)
    try:
        asyncio.run(wait_ready(url, proc, logf, path=health))
        yield proc
    except Exception:
        logf.seek(0)
        sys.stderr.write(f"--- {label} log (tail) ---\n{logf.read()[-3000:]}\n")
        raise
    finally:
        stop_server(proc)
        logf.close()


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM (the server drains), then SIGKILL if it has not exited within a minute."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def bench_engine(args, model, tokenizer, prompt: list[int]) -> list[dict]:
    from server.engine import Engine

    engine = Engine(model, tokenizer, max_batch_size=max(args.clients))
    engine.start()
    try:
        make = lambda: engine_client(engine, prompt, args.max_tokens)  # noqa: E731
        await run_round(make, 1)
        return [await run_round(make, c) for c in args.clients]
    finally:
        await engine.shutdown(5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", help="checkpoint directory (default: random GPT-2-small weights in a temp dir)"
    )
    ap.add_argument("--clients", default="1,8,32", help="comma-separated concurrent client counts")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=1, help="baseline runs per batch size (best is kept)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the in-process generate_batch baseline")
    ap.add_argument(
        "--engine", action="store_true", help="drive the engine in-process instead of the HTTP server"
    )
    args = ap.parse_args()
    try:
        args.clients = [int(c) for c in args.clients.split(",")]
        assert args.clients and min(args.clients) >= 1
    except (ValueError, AssertionError):
        ap.error(f"--clients must be comma-separated positive integers, got {args.clients!r}")

    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            model, tokenizer = gpt.load(args.model)
            model_dir = args.model
        else:
            torch.manual_seed(0)
            model, tokenizer = gpt.GPT(gpt.preset("gpt2")).eval(), gpt.get_tokenizer("gpt2")
            model_dir = os.path.join(tmp, "gpt2-random")
            gpt.save(model, model_dir)
        prompt = prompt_ids(tokenizer, args.prompt_len)
        gpt.pack_linear_weights(model)  # the in-process baseline runs on the same kernels as the server
        base = {}
        if not args.no_baseline:
            for b in sorted({1, 32}):
                base[b] = baseline_rate(model, tokenizer, b, prompt, args.max_tokens, args.repeats)
                print(f"baseline generate_batch  batch {b:>2}: {base[b]:7.1f} tok/s", flush=True)
        if args.engine:
            rounds = asyncio.run(bench_engine(args, model, tokenizer, prompt))
        else:
            del model  # the server loads its own copy
            rounds = asyncio.run(bench_http(args, model_dir, prompt))

    mode = "engine (in-process)" if args.engine else "server (HTTP, SSE)"
    print(
        f"\n{mode}: prompt {len(prompt)} tokens, {args.max_tokens} new tokens per client, greedy, "
        f"torch threads {torch.get_num_threads()}"
    )
    print("| clients | tok/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | vs baseline |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rounds:
        ref = base.get(1 if r["clients"] == 1 else 32) if r["clients"] in (1, 32) else None
        ratio = f"{r['rate'] / ref:.2f}x of batch {1 if r['clients'] == 1 else 32}" if ref else ""
        print(
            f"| {r['clients']} | {r['rate']:.1f} | {r['ttft50'] * 1e3:.0f} ms | {r['ttft99'] * 1e3:.0f} ms "
            f"| {r['itl50'] * 1e3:.1f} ms | {r['itl99'] * 1e3:.1f} ms | {ratio} |"
        )


if __name__ == "__main__":
    main()
