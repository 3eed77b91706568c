"""Multi-turn chat: time to first token per turn, with and without the prefix cache, and
against llama-server (which keeps each slot's prompt cache), in one run.

A completion-style chat as a chat page or an OpenAI client sends it: turn k's prompt is turn
k-1's prompt, the reply it got and a new user line, so by turn 10 it is ~800 GPT-2 tokens. Each
turn is one streaming /v1/completions request (greedy, `--reply-tokens` new tokens); TTFT is the
time from sending it to the first chunk carrying text. Every server gets the same user lines;
each appends its own replies (greedy on the same weights, so nearly the same text).

Servers, one after the other on the same random GPT-2-small weights (124M, fp32; nothing is
downloaded): gpt-serve, gpt-serve --no-prefix-cache, and llama-server with the f32 GGUF
(`--llama-type`) when benchmarks/llamacpp.py has built llama.cpp in its cache (`--skip-llama`
to leave it out). Each conversation runs `--repeats` times, each time a different one (so turn 1
never finds a cached prompt), and the median per turn is reported. Targets (issue "Prefix
caching"): with the cache, turn 10's TTFT <= 1.5x turn 1's, and no slower than llama-server's.

    python benchmarks/chat_prefix.py                      # ~3 minutes with llama-server
    python benchmarks/chat_prefix.py --plot chat_ttft.png
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import llamacpp  # noqa: E402  (the llama.cpp build, the shared weights, CPU facts)
import serve  # noqa: E402  (our server's launcher)

USER_LINES = [
    "Tell me about the harbour town where you grew up and what the mornings were like there.",
    "What did the fishermen do when a storm came in from the west during the winter months?",
    "Did the merchants from the coast ever trade with the farmers who lived up in the hills?",
    "Describe the market square on a busy day, with all of its sounds and smells and colours.",
    "Which of the old buildings along the northern bank of the river are still standing today?",
    "How did the town change after the railway arrived and the river trade began to decline?",
    "Who were the most famous people to come from the town, and what are they remembered for?",
    "What festivals did the people celebrate, and how did they prepare for them every year?",
    "If a traveller visited for only one day, what should they be sure to see and to taste?",
    "Looking back on all of it, what do you miss the most about the place and its people?",
]


async def turn(client, url: str, model: str, prompt: str, reply_tokens: int) -> dict:
    """One streaming greedy turn (serve.py's load-generator request, with the prompt as text)."""
    s = await serve.http_client(client, url, model, prompt, reply_tokens)
    first = s.chunk_times[0] if s.chunk_times else time.perf_counter()
    return dict(
        ttft=first - s.sent,
        text=s.text,
        prompt_tokens=s.usage.get("prompt_tokens"),
        cached=(s.usage.get("prompt_tokens_details") or {}).get("cached_tokens"),
    )


async def conversation(url: str, rep: int, turns: int, reply_tokens: int) -> list[dict]:
    import httpx

    # a fresh connection per request: this llama-server drops a second request on a kept-alive one
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=None, limits=limits, headers={"Connection": "close"}) as client:
        model = (await client.get(f"{url}/v1/models")).json()["data"][0]["id"]
        prompt, out = f"Conversation {rep}.\n", []
        for k in range(turns):
            prompt += f"User: {USER_LINES[k % len(USER_LINES)]}\nAssistant:"
            r = await turn(client, url, model, prompt, reply_tokens)
            out.append(r)
            prompt += r["text"] + "\n"
        return out


def run_server(label: str, start, port: int, health: str, args) -> list[dict]:
    """Start a server, warm it up with a throw-away conversation, run the repeats, stop it."""
    url = f"http://127.0.0.1:{port}"
    with serve.served(label, start, url, health):
        asyncio.run(conversation(url, 999, 2, args.reply_tokens))  # warm-up (a different conversation)
        reps = []
        for rep in range(args.repeats):
            t0 = time.perf_counter()
            reps.append(asyncio.run(conversation(url, rep, args.turns, args.reply_tokens)))
            ttft = " ".join(f"{r['ttft'] * 1e3:.0f}" for r in reps[-1])
            llamacpp.log(
                f"  {label} run {rep + 1}: TTFT per turn (ms) {ttft} "
                f"[{llamacpp.fmt_s(time.perf_counter() - t0)}]"
            )
    per_turn = []
    for k in range(args.turns):
        per_turn.append(
            dict(
                ttft=statistics.median(r[k]["ttft"] for r in reps),
                prompt_tokens=reps[0][k]["prompt_tokens"],
                cached=reps[0][k]["cached"],
            )
        )
    return per_turn


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, turns in results.items():
        ax.plot(range(1, len(turns) + 1), [t["ttft"] * 1e3 for t in turns], marker="o", label=label)
    ax.set_xlabel("turn")
    ax.set_ylabel("time to first token (ms, median)")
    ax.set_title("10-turn chat, GPT-2-small weights, 2 CPU threads")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    llamacpp.log(f"plot written to {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--reply-tokens", type=int, default=32, help="new tokens per turn")
    ap.add_argument(
        "--repeats", type=int, default=3, help="conversations per server; the median turn is kept"
    )
    ap.add_argument(
        "--cache-dir", default=llamacpp.DEFAULT_CACHE, help="llama.cpp build and models (llamacpp.py)"
    )
    ap.add_argument("--llama-type", default="f32", choices=llamacpp.GGUF_TYPES)
    ap.add_argument("--skip-llama", action="store_true", help="only our server, with and without the cache")
    ap.add_argument("--plot", metavar="PNG", help="also draw TTFT per turn (needs matplotlib)")
    args = ap.parse_args()
    if args.turns < 2 or args.repeats < 1 or args.reply_tokens < 1:
        ap.error("--turns must be >= 2, --repeats and --reply-tokens >= 1")

    cpu = llamacpp.cpu_info()
    with_llama = not args.skip_llama and llamacpp.built(args.cache_dir)
    if not args.skip_llama and not with_llama:
        llamacpp.log(
            "llama.cpp is not built in the cache: run benchmarks/llamacpp.py once (or pass --skip-llama)"
        )
    models = llamacpp.prepare_models(args.cache_dir, need_gguf=with_llama)

    servers = {
        "gpt-serve": (lambda logf, port: serve.start_server(models["ours"], port, 32, logf), "/ready"),
        "gpt-serve --no-prefix-cache": (
            lambda logf, port: serve.start_server(models["ours"], port, 32, logf, ("--no-prefix-cache",)),
            "/ready",
        ),
    }
    if with_llama:
        gguf = models["gguf"][args.llama_type]
        # one slot, as a single user's llama-server runs; its prompt cache is on by default
        servers[f"llama-server {args.llama_type}"] = (
            lambda logf, port: llamacpp.start_llama_server(
                args.cache_dir, gguf, port, 1, args.reply_tokens, 1000, logf
            ),
            "/health",
        )
    results = {}
    for label, (start, health) in servers.items():
        llamacpp.background_busy(label)
        port = serve.free_port()
        results[label] = run_server(label, lambda logf: start(logf, port), port, health, args)

    print(f"\nCPU: {cpu['model']} ({cpu['cores']} cores; {' '.join(cpu['flags'])})")
    print(
        f"{args.turns}-turn chat, {args.reply_tokens} new tokens per turn, greedy, median of {args.repeats} "
        f"conversations; time to first token in ms"
    )
    labels = list(results)
    print(f"{'turn':>4} {'prompt':>7} {'cached':>7}  " + "  ".join(f"{label:>28}" for label in labels))
    ours = results["gpt-serve"]
    for k in range(args.turns):
        row = "  ".join(f"{results[label][k]['ttft'] * 1e3:>28.0f}" for label in labels)
        print(f"{k + 1:>4} {ours[k]['prompt_tokens'] or 0:>7} {ours[k]['cached'] or 0:>7}  {row}")
    last, first = ours[-1]["ttft"], ours[0]["ttft"]
    print(
        f"\ngpt-serve with the prefix cache: turn {args.turns} / turn 1 = {last / first:.2f}x (target "
        "<= 1.5x)"
    )
    nocache = results["gpt-serve --no-prefix-cache"][-1]["ttft"]
    print(f"turn {args.turns}: without the cache / with it = {nocache / last:.2f}x")
    for label in labels[2:]:
        theirs = results[label][-1]["ttft"]
        print(f"turn {args.turns}: gpt-serve / {label} = {last / theirs:.2f}x (target <= 1.0x)")
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
