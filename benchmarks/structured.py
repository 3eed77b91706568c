"""What structured output costs: gpt-serve and llama-server, each decoding with and without the
same JSON schema, at 1 and 32 concurrent clients; the per-step cost of the token masks in
process; and the compile time of small, medium and large schemas.

Both servers hold the same GPT-2-small weights (random, seed 0; benchmarks/llamacpp.py builds
llama.cpp and converts the weights, cached under ~/.cache/gpt-serve-bench): gpt-serve with
`--quantize int8` and its default settings, llama-server with the q8_0 file, `-t 2`, 32 slots.
The schema is a list of at least 8 records (ids, bounded names, enums, numbers), so no output
completes within the token budget and every request decodes exactly `--max-tokens` tokens,
constrained or not (unconstrained ones with `ignore_eos`). Greedy, streamed, prompt of 32 tokens.
For 1 client the rate is one over the median gap between tokens; for 32, all tokens over the
round's wall time. Rounds go over the eight (server, constrained, clients) cells in turn, each
round starting one cell later; each figure is the median of the rounds, and each ratio the
median of the rounds' own ratios (the two sides of a ratio run in the same round, so a slow
spell of the machine falls on both).

    python benchmarks/llamacpp.py --only decode   # once: builds llama.cpp, converts the weights
    python benchmarks/structured.py [--rounds 3] [--out benchmarks/results/structured.json]
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
import serve  # noqa: E402
from llamacpp import DEFAULT_CACHE, bin_path, built, cpu_info, prepare_models  # noqa: E402
from structured_libraries import MEDIUM, SMALL, large_schema  # noqa: E402

import gpt  # noqa: E402
from gpt.constraints import CompiledConstraint, Constraint  # noqa: E402
from gpt.decoding import SequenceDecoder, constrain  # noqa: E402

RECORD = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 999},
        "name": {"type": "string", "maxLength": 12},
        "kind": {"enum": ["book", "film", "song"]},
        "score": {"type": "number", "minimum": 0, "maximum": 10},
    },
    "required": ["id", "name", "kind", "score"],
    "additionalProperties": False,
}
SCHEMA = {
    "type": "object",
    "properties": {"records": {"type": "array", "items": RECORD, "minItems": 8}},
    "required": ["records"],
    "additionalProperties": False,
}


def start_ours(model_dir: str, clients: int, logf):
    port = serve.free_port()
    proc = serve.start_server(model_dir, port, clients, logf, ("--quantize", "int8"))
    return proc, f"http://127.0.0.1:{port}"


def start_llama(cache: str, gguf: str, clients: int, max_tokens: int, logf):
    import subprocess

    port = serve.free_port()
    cmd = [bin_path(cache, "llama-server"), "-m", gguf, "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["-t", "2", "-tb", "2", "--parallel", str(clients), "-c", str(clients * max(256, max_tokens + 64))]
    cmd += ["--cache-ram", "0", "--no-webui"]
    return subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT), f"http://127.0.0.1:{port}"


def constraint_fields(server: str) -> dict:
    """The same schema, in each server's words (llama-server reads `json_schema` on /v1/completions)."""
    if server == "llama":
        return {"json_schema": SCHEMA, "ignore_eos": False, "cache_prompt": False}
    return {
        "response_format": {"type": "json_schema", "json_schema": {"name": "records", "schema": SCHEMA}},
        "ignore_eos": False,
    }


async def measure(url: str, prompt, max_tokens: int, clients: int, extra: dict) -> tuple[float, list[str]]:
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        name = (await client.get(f"{url}/v1/models")).json()["data"][0]["id"]
        streams = []

        async def one():
            s = await serve.http_client(client, url, name, prompt, max_tokens, extra)
            streams.append(s)
            return s

        r = await serve.run_round(one, clients)
    short = [s for s in streams if s.tokens != max_tokens]
    if short:
        raise RuntimeError(
            f"{len(short)} of {clients} streams decoded {short[0].tokens} != {max_tokens} tokens"
        )
    return (1 / r["itl50"] if clients == 1 else r["rate"]), [s.text for s in streams]


def compact(text: str) -> str:
    """JSON text without the whitespace between its tokens (llama.cpp's grammar lets the model
    write some; ours writes none)."""
    out, in_string, escaped = [], False, False
    for ch in text:
        if in_string:
            escaped, in_string = (not escaped and ch == "\\"), in_string and not (ch == '"' and not escaped)
        elif ch == '"':
            in_string = True
        elif ch.isspace():
            continue
        out.append(ch)
    return "".join(out)


def valid_prefix(text: str, tokenizer) -> bool:
    """Whether `text`, whitespace between tokens aside, is a prefix of a document that SCHEMA
    accepts: our matcher replays it."""
    state = Constraint.json_schema(SCHEMA).start(tokenizer)
    for t in tokenizer.encode(compact(text)):
        state.advance(t)
        if state.failed:
            return False
    return True


def bench_servers(models: dict, cache: str, prompt, tokenizer, args) -> dict:
    servers, cells = {}, []
    logs = []
    try:
        for name in ("ours", "llama"):
            logf = tempfile.TemporaryFile("w+")
            logs.append(logf)
            t0 = time.perf_counter()
            if name == "ours":
                proc, url = start_ours(models["ours"], max(args.clients), logf)
                health = "/ready"
            else:
                proc, url = start_llama(
                    cache, models["gguf"]["q8_0"], max(args.clients), args.max_tokens, logf
                )
                health = "/health"
            servers[name] = (proc, url)
            asyncio.run(serve.wait_ready(url, proc, logf, path=health, limit=900))
            print(f"  {name} ready in {time.perf_counter() - t0:.1f} s", flush=True)
        checks = {}
        for name, (_, url) in servers.items():  # warm-up, and is the constrained output valid?
            asyncio.run(
                measure(url, prompt, args.max_tokens, 1, {"cache_prompt": False} if name == "llama" else {})
            )
            _, texts = asyncio.run(measure(url, prompt, args.max_tokens, 1, constraint_fields(name)))
            checks[name] = {"text": texts[0][:200], "valid_prefix": valid_prefix(texts[0], tokenizer)}
            print(
                f"  {name} constrained output valid so far: {checks[name]['valid_prefix']}: {texts[0][:80]!r}"
            )
        cells = [(s, c, n) for s in servers for c in (False, True) for n in args.clients]
        rates = {f"{s}|{'constrained' if c else 'free'}|{n}": [] for s, c, n in cells}
        for rnd in range(args.rounds):
            for s, c, n in cells:
                extra = constraint_fields(s) if c else ({"cache_prompt": False} if s == "llama" else {})
                rate, _ = asyncio.run(measure(servers[s][1], prompt, args.max_tokens, n, extra))
                key = f"{s}|{'constrained' if c else 'free'}|{n}"
                rates[key].append(rate)
                print(f"  round {rnd + 1}/{args.rounds} {key:<24} {rate:7.1f} tok/s", flush=True)
            cells = cells[1:] + cells[:1]
        return {
            "rates": rates,
            "median": {k: statistics.median(v) for k, v in rates.items()},
            "checks": checks,
        }
    finally:
        for proc, _ in servers.values():
            serve.stop_server(proc)
        for f in logs:
            f.close()


def mask_cost(tokenizer, batches=(1, 32), steps: int = 64) -> dict:
    """Microseconds per decoding step spent on masks (computing them, applying them to the
    logits, advancing each matcher), for `batches` constrained rows of GPT-2's vocabulary."""
    out = {}
    c = Constraint.json_schema(SCHEMA)
    params = gpt.SamplingParams(max_new_tokens=steps + 1, temperature=0, constraint=c)
    torch.manual_seed(0)
    for b in batches:
        decoders = [SequenceDecoder(tokenizer, [1], params) for _ in range(b)]
        logits = torch.randn(b, tokenizer.vocab_size)
        t_mask = t_accept = 0.0
        for _ in range(steps):
            t0 = time.perf_counter()
            masked = constrain(logits, decoders)
            t1 = time.perf_counter()
            tokens = masked.argmax(dim=-1).tolist()
            t2 = time.perf_counter()
            for d, t in zip(decoders, tokens):
                d.constraint.advance(t)
            t_mask += t1 - t0
            t_accept += time.perf_counter() - t2
        out[b] = {"mask_us": t_mask / steps * 1e6, "advance_us": t_accept / steps * 1e6}
        print(
            f"  {b:>2} rows: masks {out[b]['mask_us']:8.0f} us/step, "
            f"advancing {out[b]['advance_us']:6.0f} us/step"
        )
    return out


def compile_times(tokenizer, repeats: int = 5) -> dict:
    """Milliseconds to compile each schema into a matcher over GPT-2's vocabulary (not cached)."""
    from gpt.constraints import ll_tokenizer

    ll_tokenizer(tokenizer)  # the vocabulary is read once per tokenizer, at start-up
    large, _ = large_schema()
    out = {}
    for name, schema in (("small", SMALL), ("medium", MEDIUM), ("records", SCHEMA), ("large", large)):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            CompiledConstraint.build(Constraint.json_schema(schema), tokenizer)
            times.append((time.perf_counter() - t0) * 1000)
        out[name] = {"median_ms": statistics.median(times), "max_ms": max(times)}
        print(f"  {name:<8} schema: {statistics.median(times):6.2f} ms median, {max(times):6.2f} ms max")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="1,32")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--cache-dir", default=DEFAULT_CACHE)
    ap.add_argument("--out", default=None, help="write the figures here as JSON")
    args = ap.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    cpu = cpu_info()
    print(
        f"CPU: {cpu['model']}, {cpu['cores']} cores, flags {' '.join(cpu['flags'])}; "
        f"torch {torch.__version__}"
    )
    tokenizer = gpt.get_tokenizer("gpt2")
    results = {"cpu": cpu, "torch": torch.__version__, "max_tokens": args.max_tokens, "schema": SCHEMA}
    print("compile times:")
    results["compile_ms"] = compile_times(tokenizer)
    print("mask cost per decoding step:")
    results["mask_cost"] = mask_cost(tokenizer)
    if not built(args.cache_dir):
        raise SystemExit("llama.cpp is not built: run benchmarks/llamacpp.py --only decode first")
    models = prepare_models(args.cache_dir, need_gguf=True)
    prompt = serve.prompt_ids(tokenizer, args.prompt_len)
    print("servers:")
    results["serve"] = bench_servers(models, args.cache_dir, prompt, tokenizer, args)
    med = results["serve"]["median"]
    print(
        "\n| server | clients | free tok/s | constrained tok/s | constrained / free |  "
        f"(median of {args.rounds})"
    )
    print("|---|---|---|---|---|")
    rates = results["serve"]["rates"]

    def paired(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(rates[a], rates[b]))

    ratios = {}
    for s in ("ours", "llama"):
        for n in args.clients:
            free, con = med[f"{s}|free|{n}"], med[f"{s}|constrained|{n}"]
            ratios[f"{s}|{n}"] = r = paired(f"{s}|constrained|{n}", f"{s}|free|{n}")
            print(f"| {s} | {n} | {free:.1f} | {con:.1f} | {r:.2f}x |")
    for n in args.clients:
        r = paired(f"ours|constrained|{n}", f"llama|constrained|{n}")
        ratios[f"ours/llama constrained|{n}"] = r
        print(f"ours constrained / llama-server constrained at {n} clients: {r:.2f}x")
    results["ratios"] = ratios
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
