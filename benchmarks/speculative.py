"""What speculative decoding buys: gpt-serve with `--speculative auto` against `--speculative
off`, and llama-server's n-gram speculation, on a model that has learned something.

The model: a GPT-2-architecture model (4 layers, 256 wide, context 256, a 4,096-id byte-level
BPE that `gpt-train --tokenizer bpe` learns from the same sources) trained by `gpt-train` on the
Python standard library inside this script (1,800 steps of 16 x 256 tokens, about half an hour
on 2 cores), cached under `--cache-dir` (`models/spec-stdlib-bpe`). The learned vocabulary makes
each indentation level one token and leaves the model's parameters to its layers rather than to
GPT-2's 50k embedding: with GPT-2's tokenizer, the same half hour bought a model whose greedy
replies were mostly runs of single spaces, which flattered prompt lookup. The script reports the
share of output tokens that are only whitespace and of outputs that are blank.
llama-server gets the same weights and vocabulary (`benchmarks/gguf_export.py`: a Hugging Face
GPT-2 directory converted to GGUF f32 by llama.cpp's converter; `benchmarks/llamacpp.py` builds
llama.cpp) and the same prompts, as token ids. Each is run on float32 weights and on 8-bit ones
(`--quantize int8` against a q8_0 GGUF made by llama.cpp's `llama-quantize`); "our best without
speculation" is whichever of the two serves a workload faster.

Three workloads, each of `--prompts` prompts cut from standard-library modules at a line start
(`--prompt-tokens` tokens each; the continuation uses the names the prompt defined), each
request streaming `--max-tokens` tokens (ignore_eos):
  1. edit: greedy, with OpenAI's `prediction` set to the model's own earlier greedy reply (made
     once, in process, without speculation) with about 5% of its lines changed;
  2. grounded: greedy, no prediction: what prompt lookup finds in the prompt and output;
  3. open: sampling at temperature 0.8, one seed per prompt.
At 1 client the first 8 prompts go one after another (tokens over the summed times); at 32,
32 requests at once (tokens over the wall time). Each (server, workload, clients) cell runs
`--rounds` times, rounds interleaved; figures are medians over rounds, and each ratio is the
median of the rounds' own ratios. The outputs of `off` and `auto` must be identical (greedy and
seeded alike); the script counts and prints any request where they differ, and, for scale, how
many of `off`'s own outputs differ between rounds (batches and prefix-cache hits form
differently each round).

    python benchmarks/llamacpp.py --only decode     # once: builds llama.cpp
    python benchmarks/speculative.py [--rounds 2] [--out benchmarks/results/speculative.json]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import glob
import json
import os
import random
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serve  # noqa: E402
from gguf_export import ensure_gguf, ensure_q8  # noqa: E402
from llamacpp import DEFAULT_CACHE, bin_path, built, cpu_info  # noqa: E402

import gpt  # noqa: E402
from gpt import fast_defaults  # noqa: E402

TRAIN = [
    "--preset", "gpt2", "--n-layer", "4", "--n-head", "4", "--n-embd", "256", "--block-size", "256",
    "--tokenizer", "bpe", "--bpe-vocab", "4096", "--batch-size", "16", "--max-iters", "1800",
    "--lr", "3e-3", "--min-lr", "3e-4", "--warmup", "100", "--eval-interval", "300", "--eval-iters", "20",
    "--sample-tokens", "0",
]  # fmt: skip
WORKLOADS = ("edit", "grounded", "open")
SUFFIX = {"none": "", "int8": "-int8"}  # server names: off, auto, off-int8, llama-none-int8 (q8_0), ...
LLAMA_SPEC = {  # llama-server's n-gram speculation, each tried; the best is the yardstick
    "ngram-simple": ["--spec-type", "ngram-simple"],
    "ngram-simple-3-8": ["--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", "3",
                         "--spec-ngram-simple-size-m", "8"],
    "ngram-map-k": ["--spec-type", "ngram-map-k"],
}  # fmt: skip


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def ensure_model(cache: str) -> str:
    """The trained checkpoint (`best`), training it first when it is not cached."""
    run = os.path.join(cache, "models", "spec-stdlib-bpe")
    best = os.path.join(run, "best")
    if not os.path.exists(os.path.join(run, "DONE")):
        log(f"training the benchmark's model into {run} (about half an hour on 2 cores)")
        train = [os.path.join(os.path.dirname(sys.executable), "gpt-train"), "--out", run]
        resume = ["--resume"] if os.path.exists(os.path.join(run, "latest")) else []
        subprocess.run([*train, *TRAIN, *resume], check=True)
        open(os.path.join(run, "DONE"), "w").close()
    return best


def source_prompts(tokenizer, n: int, length: int) -> list[list[int]]:
    """`n` prompts of `length` tokens, each from its own standard-library module (not a test),
    starting at a line start a third of the way in, where the module's names are in use."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    rng = random.Random(0)
    rng.shuffle(files)
    out = []
    for path in files:
        text = open(path, encoding="utf-8", errors="replace").read()
        start = text.find("\n", len(text) // 3) + 1
        ids = tokenizer.encode(text[start:])
        if len(ids) >= length * 2:
            out.append(ids[:length])
        if len(out) == n:
            return out
    raise SystemExit("not enough standard-library modules for the prompts")


def edited(text: str, rng: random.Random, share: float = 0.05) -> str:
    """`text` with about `share` of its lines changed (at least one)."""
    lines = text.split("\n")
    for i in rng.sample(range(len(lines)), max(1, round(share * len(lines)))):
        lines[i] = lines[i] + "  # changed" if lines[i].strip() else "# added line"
    return "\n".join(lines)


def requests(ckpt: str, prompts: list[list[int]], max_tokens: int, quantize: str) -> dict[str, list[dict]]:
    """Each workload's request bodies (the fields beyond prompt and max_tokens); the edit
    workload's predictions come from the model as the server runs it (float32 or int8)."""
    model, tok = gpt.load(ckpt)
    if quantize != "none":
        gpt.quantize(model, quantize)
    # the reply as served: the server decodes into the KV cache gpt.fast_defaults picks (float16
    # where our attention kernel reads it), and greedy replies from a float32 cache can differ
    # from the served ones, which made predictions wrong past their edits (docs/benchmarks.md)
    kv_dtype = fast_defaults.choose(model, compile=False).kv_cache_dtype
    if kv_dtype is not None:
        model.new_cache = functools.partial(model.new_cache, dtype=kv_dtype)
    params = gpt.SamplingParams(max_new_tokens=max_tokens, temperature=0, ignore_eos=True)
    replies = gpt.complete(model, tok, prompts, params, speculative="off")
    rng = random.Random(1)
    out = {w: [] for w in WORKLOADS}
    for i, (p, r) in enumerate(zip(prompts, replies)):
        base = {"prompt": p, "max_tokens": max_tokens, "ignore_eos": True}
        prediction = {"type": "content", "content": edited(r.text, rng)}
        out["edit"].append({**base, "temperature": 0, "prediction": prediction})
        out["grounded"].append({**base, "temperature": 0})
        out["open"].append({**base, "temperature": 0.8, "seed": 1000 + i})
    return out


async def stream_one(client, url: str, body: dict) -> dict:
    t0 = time.perf_counter()
    text, usage = "", {}
    async with client.stream("POST", f"{url}/v1/completions", json={**body, "stream": True,
                             "stream_options": {"include_usage": True}}) as resp:  # fmt: skip
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread()).decode()[:300]}")
        async for line in resp.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
                text += "".join(c.get("text") or "" for c in chunk.get("choices", []))
    return dict(text=text, usage=usage, seconds=time.perf_counter() - t0)


async def load(url: str, bodies: list[dict], clients: int, extra: dict) -> dict:
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        t0 = time.perf_counter()
        if clients == 1:
            outs = [await stream_one(client, url, {**b, **extra}) for b in bodies[:8]]
            seconds = sum(o["seconds"] for o in outs)
        else:
            outs = await asyncio.gather(*(stream_one(client, url, {**b, **extra}) for b in bodies[:clients]))
            seconds = time.perf_counter() - t0
    tokens = sum(o["usage"].get("completion_tokens", 0) for o in outs)
    kept = sum(
        (o["usage"].get("completion_tokens_details") or {}).get("accepted_prediction_tokens", 0) for o in outs
    )
    return dict(rate=tokens / seconds, tokens=tokens, kept=kept, texts=[o["text"] for o in outs])


def ours(mode: str, quantize: str) -> str:
    return mode + SUFFIX[quantize]


def start_ours(ckpt: str, mode: str, quantize: str, clients: int, logf):
    port = serve.free_port()
    proc = serve.start_server(ckpt, port, clients, logf, ("--speculative", mode, "--quantize", quantize))
    return proc, f"http://127.0.0.1:{port}", "/ready"


def start_llama(cache: str, gguf: str, spec: list[str], clients: int, logf):
    port = serve.free_port()
    cmd = [bin_path(cache, "llama-server"), "-m", gguf, "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["-t", "2", "-tb", "2", "--parallel", str(clients), "-c", str(clients * 256), "--no-webui", *spec]
    return subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT), f"http://127.0.0.1:{port}", "/health"


def run_cells(servers: dict, cells: list[tuple[str, str, int]], bodies: dict, rounds: int) -> dict:
    """Start every server once, then go over the cells `rounds` times. `cells` come grouped by
    (workload, clients), so that the servers a ratio compares run back to back (this VM's speed
    drifts over tens of seconds); each round the groups rotate and so do the servers within
    each. `bodies`: each server's requests, by workload."""
    results = {f"{s}|{w}|{c}": [] for s, w, c in cells}
    running, logs = {}, []
    try:
        for name, start in servers.items():
            logf = tempfile.TemporaryFile("w+")
            logs.append(logf)
            t0 = time.perf_counter()
            proc, url, health = start(logf)
            running[name] = (proc, url)
            asyncio.run(serve.wait_ready(url, proc, logf, path=health, limit=900))
            extra = {"cache_prompt": False} if name.startswith("llama") else {}
            for c in sorted({c for _, _, c in cells}):  # warm-up: compiled shapes, measured step costs
                asyncio.run(load(url, bodies[name]["open"], c, extra))
            log(f"{name} ready in {time.perf_counter() - t0:.0f} s")
        groups: dict[tuple[str, int], list[str]] = {}
        for s, w, c in cells:
            groups.setdefault((w, c), []).append(s)
        order = list(groups.items())
        for r in range(rounds):
            round_cells = [
                (s, w, c)
                for (w, c), names in order
                for s in names[r % len(names) :] + names[: r % len(names)]
            ]
            order = order[1:] + order[:1]
            for s, w, c in round_cells:
                extra = {"cache_prompt": False} if s.startswith("llama") else {}
                out = asyncio.run(load(running[s][1], bodies[s][w], c, extra))
                results[f"{s}|{w}|{c}"].append(out)
                log(f"round {r + 1}/{rounds} {s:<22} {w:<9} {c:>2} clients: {out['rate']:7.1f} tok/s")
    finally:
        for proc, _ in running.values():
            serve.stop_server(proc)
        for f in logs:
            f.close()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", default=DEFAULT_CACHE)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=96)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--clients", default="1,32")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--quantize", default="none,int8", help="our weights: none (float32), int8, or both")
    ap.add_argument("--no-llama", action="store_true", help="skip llama-server")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    cpu = cpu_info()
    log(f"CPU: {cpu}")
    ckpt = ensure_model(args.cache_dir)
    tok = gpt.load(ckpt)[1]
    prompts = source_prompts(tok, args.prompts, args.prompt_tokens)
    quants = args.quantize.split(",")
    per_quant = {q: requests(ckpt, prompts, args.max_tokens, q) for q in quants}
    servers = {
        ours(m, q): (lambda logf, m=m, q=q: start_ours(ckpt, m, q, max(clients), logf))
        for q in quants
        for m in ("off", "auto")
    }
    cells = [(s, w, c) for s in servers for w in WORKLOADS for c in clients]
    llama = not args.no_llama and built(args.cache_dir)
    if llama:
        f32 = ensure_gguf(args.cache_dir, ckpt, os.path.basename(os.path.dirname(ckpt)))
        for q in quants:
            gguf = f32 if q == "none" else ensure_q8(args.cache_dir, f32)
            for name, spec in {"none": [], **LLAMA_SPEC}.items():
                servers[f"llama-{name}{SUFFIX[q]}"] = lambda logf, spec=spec, gguf=gguf: start_llama(
                    args.cache_dir, gguf, spec, max(clients), logf
                )
                cells += [(f"llama-{name}{SUFFIX[q]}", "grounded", c) for c in clients]
    bodies = {name: per_quant["int8" if name.endswith("-int8") else "none"] for name in servers}
    results = run_cells(servers, cells, bodies, args.rounds)

    def median_rate(key: str) -> float:
        return statistics.median(o["rate"] for o in results[key])

    def ratio(a: str, b: str) -> float:
        return statistics.median(x["rate"] / y["rate"] for x, y in zip(results[a], results[b]))

    summary = {}
    print(f"\nCPU: {cpu}")
    print(f"{'weights':<9}{'workload':<10}{'clients':>8}{'off tok/s':>11}{'auto tok/s':>12}{'auto/off':>10}")
    blank_ids = {i for i in range(tok.vocab_size) if not tok.decode([i]).strip()}
    for q, w, c in ((q, w, c) for q in quants for w in WORKLOADS for c in clients):
        off, auto = f"{ours('off', q)}|{w}|{c}", f"{ours('auto', q)}|{w}|{c}"
        differ = sum(
            a != b for x, y in zip(results[off], results[auto]) for a, b in zip(x["texts"], y["texts"])
        )
        # the same requests without speculation, round against round: what batching alone changes
        first = results[off][0]["texts"]
        off_drift = sum(a != b for x in results[off][1:] for a, b in zip(first, x["texts"]))
        texts = [text for x in results[off] for text in x["texts"]]
        ids = [t for text in texts for t in tok.encode(text)]
        s = summary[f"{q}|{w}|{c}"] = dict(
            whitespace_token_share=sum(t in blank_ids for t in ids) / max(1, len(ids)),
            blank_outputs=sum(not text.strip() for text in texts) / max(1, len(texts)),
            off=median_rate(off), auto=median_rate(auto), ratio=ratio(auto, off), outputs_differ=differ,
            off_rounds_differ=off_drift,
            kept_prediction_tokens=results[auto][0]["kept"],
        )  # fmt: skip
        print(
            f"{q:<9}{w:<10}{c:>8}{s['off']:>11.1f}{s['auto']:>12.1f}{s['ratio']:>9.2f}x  outputs differing: "
            f"{differ} (off, round against round: {off_drift}), "
            f"whitespace tokens {s['whitespace_token_share']:.0%}, blank outputs {s['blank_outputs']:.0%}"
        )
    print("\nour best with speculation (auto) against our best without (off) (by median rate)")
    for w, c in ((w, c) for w in WORKLOADS for c in clients):
        best_off = max(quants, key=lambda q: summary[f"{q}|{w}|{c}"]["off"])
        best_auto = max(quants, key=lambda q: summary[f"{q}|{w}|{c}"]["auto"])
        # as every ratio here, the median of the rounds' own: rounds are interleaved, and the
        # VM's speed drifts between them far more than within one
        r = ratio(f"{ours('auto', best_auto)}|{w}|{c}", f"{ours('off', best_off)}|{w}|{c}")
        summary[f"best|{w}|{c}"] = dict(off=best_off, auto=best_auto, ratio=r)
        print(f"  {w:<9}{c:>3} clients: auto {best_auto} / off {best_off}: {r:.2f}x")
    if llama:
        for q in quants:
            kind = "f32" if q == "none" else "q8_0"
            print(f"\nllama-server, grounded workload ({kind} GGUF of the same weights; ours: {q})")
            for c in clients:
                names = ["none", *LLAMA_SPEC]
                rates = {n: median_rate(f"llama-{n}{SUFFIX[q]}|grounded|{c}") for n in names}
                best = max(LLAMA_SPEC, key=lambda n: rates[n])
                over = ratio(f"{ours('auto', q)}|grounded|{c}", f"llama-{best}{SUFFIX[q]}|grounded|{c}")
                summary[f"llama|{q}|grounded|{c}"] = dict(rates=rates, best=best, ours_auto_over_best=over)
                line = ", ".join(f"{n} {r:.1f}" for n, r in rates.items())
                print(f"  {c} clients: {line} tok/s; ours auto / llama {best}: {over:.2f}x")
    if args.out:
        for v in results.values():
            for o in v:
                o.pop("texts")
        with open(args.out, "w") as f:
            json.dump(dict(cpu=cpu, args=vars(args), summary=summary, rounds=results), f, indent=1)
        log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
