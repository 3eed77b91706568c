"""gpt-serve on Ray Serve against one gpt-serve process, in one run on one machine.

Weights: GPT-2 small shaped (124M, random, nothing downloaded), int8 (`--quantize int8`), written
to a temporary directory. Parts (`--parts`, all but `hop` by default):

  clients  streaming /v1/completions at 1, 8, 32 and 64 concurrent clients (32-token prompt,
           greedy, `ignore_eos`, `--max-tokens` each): `gpt-serve --replicas 2` (each replica 1
           CPU, 1 torch thread) against one `gpt-serve` using both cores, and `--replicas 1
           --cpus-per-replica 2` (the single server's compute behind Ray's proxy and our ingress:
           the cost of the hop). tok/s, TTFT and ITL.
  hop      the hop alone: 1 replica with the single server's threads against the single server
           at 1 and 8 clients: 2 threads with the Serve settings gpt-serve sets, without direct
           ingress, with Ray's defaults; 1 thread each. `--hop-repeats` rounds per start (the
           median is kept), starts alternated `--hop-rounds` times.
  chats    8 concurrent ten-turn conversations (turn k's prompt is turn k-1's, its reply and a new
           user line; ~30 reply tokens a turn) on 2 replicas, with prefix-aware routing and with
           round-robin: the median time to first token per turn. Target: turn 10 <= 1.5x turn 1
           with prefix-aware routing.
  soak     `--soak-minutes` of mixed load on 2 replicas (streams, non-streamed requests, clients
           that hang up mid-stream, hostile requests) with one replica killed (SIGKILL) every
           `--kill-every` seconds: every request is accounted for (completed, cut with a clean
           error event, refused with a 4xx, or hung: none may hang), and the resident memory of
           the replicas, the ingress and Serve's proxy is sampled throughout.

    python benchmarks/cluster.py                                  # about 20 minutes
    python benchmarks/cluster.py --parts clients --clients 1,8    # a quick look

Results go to --out (JSON) and --plot (PNG: TTFT per turn, memory during the soak).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import chat_prefix  # noqa: E402  (the conversation's user lines)
import llamacpp  # noqa: E402  (CPU facts)
import serve  # noqa: E402  (the load generator and server launcher)

HOSTILE = [
    ("POST", "/v1/completions", b"{not json"),
    ("POST", "/v1/completions", b'{"model": "m", "prompt": 7}'),
    ("POST", "/v1/completions", b'{"model": "m", "prompt": "x", "max_tokens": 1000000000}'),
    ("POST", "/v1/completions", b'{"model": "m", "prompt": "x", "temperature": -3}'),
    ("POST", "/v1/chat/completions", b'{"model": "m", "messages": "hello"}'),
    ("POST", "/v1/chat/completions", b'{"model": "m", "messages": [{"role": "wizard", "content": "x"}]}'),
    ("POST", "/v1/completions", b'{"model": "m", "prompt": "' + b"a" * (3 * 1024 * 1024) + b'"}'),
    ("GET", "/v1/secret", b""),
    ("POST", "/v1/completions", b'{"model": "m", "prompt": "x", "n": 100000}'),
]


def start(model_dir: str, extra: tuple[str, ...], port: int):
    return lambda logf: serve.start_server(model_dir, port, 32, logf, ("--quantize", "int8", *extra))


async def rounds(url: str, prompt, max_tokens: int, clients: list[int]) -> list[dict]:
    import httpx

    limits = httpx.Limits(max_connections=max(clients) + 8, max_keepalive_connections=max(clients) + 8)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        name = (await client.get(f"{url}/v1/models")).json()["data"][0]["id"]
        make = lambda: serve.http_client(client, url, name, prompt, max_tokens)  # noqa: E731
        await serve.run_round(make, 2)  # warm-up: first-call costs stay out of the figures
        return [await serve.run_round(make, c) for c in clients]


def part_clients(args, model_dir: str, prompt) -> dict:
    out = {}
    configs = (
        ("single", ("--max-batch-size", "64")),
        ("ray", ("--replicas", "2")),
        # the same compute as the single process, so the difference is the hop through Ray
        ("ray-1x2", ("--replicas", "1", "--cpus-per-replica", "2", "--max-batch-size", "64")),
    )
    for label, extra in configs:
        port = serve.free_port()
        url = f"http://127.0.0.1:{port}"
        with serve.served(label, start(model_dir, extra, port), url):
            out[label] = asyncio.run(rounds(url, prompt, args.max_tokens, args.clients))
        for r in out[label]:
            print(
                f"{label:>6} {r['clients']:>3} clients: {r['rate']:7.1f} tok/s  "
                f"TTFT p50 {r['ttft50'] * 1e3:6.0f} ms  ITL p50 {r['itl50'] * 1e3:5.1f} ms",
                flush=True,
            )
    return out


def part_hop(args, model_dir: str, prompt) -> dict:
    """The hop through Ray at 1 and 8 clients: one replica with the single server's compute behind
    Serve, with the settings `gpt-serve --replicas` sets (server/cluster/launch.py: SERVE_ENV and
    Serve's direct ingress), without direct ingress (Serve's proxy relays every token), and with
    Ray's own defaults; then one thread on each side, which leaves a core to Ray's processes and
    so measures the hop's latency apart from its CPU. Each start runs `--hop-repeats` rounds at
    each load; the starts are alternated `--hop-rounds` times; the median round is kept."""
    from server.cluster.launch import SERVE_ENV

    via_proxy = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}
    ray_defaults = {**via_proxy, "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1"}
    ray_defaults.update(
        RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD="1", RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP="1"
    )
    assert set(SERVE_ENV) < set(ray_defaults)
    one_replica = ("--replicas", "1", "--cpus-per-replica")
    configs = (
        ("single", ("--max-batch-size", "64"), {}),
        ("ray-1x2", (*one_replica, "2"), {}),
        ("ray-1x2, Serve's proxy", (*one_replica, "2"), via_proxy),
        ("ray-1x2, Ray's defaults", (*one_replica, "2"), ray_defaults),
        ("single, 1 thread", ("--max-batch-size", "64"), {"OMP_NUM_THREADS": "1"}),
        ("ray-1x1", (*one_replica, "1"), {}),
    )
    out: dict = {label: [] for label, _, _ in configs}
    for _ in range(args.hop_rounds):
        for label, extra, env in configs:
            saved = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            try:
                port = serve.free_port()
                url = f"http://127.0.0.1:{port}"
                loads = [1] * args.hop_repeats + [8] * args.hop_repeats
                with serve.served(label, start(model_dir, extra, port), url):
                    out[label] += asyncio.run(rounds(url, prompt, args.max_tokens, loads))
            finally:
                for k, v in saved.items():
                    os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    best = {label: [_median_round(runs, c) for c in (1, 8)] for label, runs in out.items()}
    for label, rs in best.items():
        print(
            f"hop {label:>24}: 1 client {rs[0]['rate']:6.1f} tok/s (ITL {rs[0]['itl50'] * 1e3:.1f} ms), "
            f"8 clients {rs[1]['rate']:6.1f} tok/s",
            flush=True,
        )
    return best


def _median_round(runs: list[dict], clients: int) -> dict:
    at = sorted((r for r in runs if r["clients"] == clients), key=lambda r: r["rate"])
    return {**at[len(at) // 2], "rounds": len(at), "rates": [r["rate"] for r in at]}


async def conversations(url: str, n: int, turns: int, reply_tokens: int, tag: str) -> list[list[dict]]:
    async def one(c: int) -> list[dict]:
        import httpx

        async with httpx.AsyncClient(timeout=None) as client:
            model = (await client.get(f"{url}/v1/models")).json()["data"][0]["id"]
            prompt, out = f"Conversation {tag}-{c}.\n", []
            for k in range(turns):
                prompt += f"User: {chat_prefix.USER_LINES[k % len(chat_prefix.USER_LINES)]}\nAssistant:"
                s = await serve.http_client(client, url, model, prompt, reply_tokens)
                out.append(
                    dict(
                        ttft=s.chunk_times[0] - s.sent,
                        prompt_tokens=s.usage.get("prompt_tokens"),
                        cached=(s.usage.get("prompt_tokens_details") or {}).get("cached_tokens"),
                    )
                )
                prompt += s.text + "\n"
            return out

    return await asyncio.gather(*(one(c) for c in range(n)))


def part_chats(args, model_dir: str) -> dict:
    out = {}
    for routing in ("prefix", "round-robin"):
        port = serve.free_port()
        url = f"http://127.0.0.1:{port}"
        with serve.served(routing, start(model_dir, ("--replicas", "2", "--routing", routing), port), url):
            asyncio.run(conversations(url, 2, 2, 8, "warm"))
            runs = asyncio.run(conversations(url, 8, 10, args.reply_tokens, routing))
        per_turn = [statistics.median(conv[k]["ttft"] for conv in runs) for k in range(10)]
        cached = [statistics.median(conv[k]["cached"] or 0 for conv in runs) for k in range(10)]
        prompt = [statistics.median(conv[k]["prompt_tokens"] for conv in runs) for k in range(10)]
        out[routing] = dict(ttft=per_turn, cached=cached, prompt_tokens=prompt)
        print(
            f"{routing:>11}: TTFT turn 1 {per_turn[0] * 1e3:.0f} ms, turn 10 {per_turn[9] * 1e3:.0f} ms "
            f"({per_turn[9] / per_turn[0]:.2f}x); turn 10 cached {cached[9]:.0f} of {prompt[9]:.0f} tokens",
            flush=True,
        )
    return out


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def ray_pids(name: str) -> list[int]:
    pids = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/cmdline", "rb") as f:
                    if f.read().split(b"\0")[0].decode(errors="replace").startswith(name):
                        pids.append(int(p))
            except OSError:
                pass
    return pids


async def soak_request(client, url: str, model: str, rng: random.Random, tally: dict) -> None:
    kind = rng.choices(["stream", "plain", "hangup", "hostile"], [6, 2, 1, 1])[0]
    try:
        if kind == "hostile":
            method, path, body = rng.choice(HOSTILE)
            body = body.replace(b'"model": "m"', b'"model": ' + json.dumps(model).encode())
            r = await asyncio.wait_for(
                client.request(
                    method, url + path, content=body, headers={"content-type": "application/json"}
                ),
                120,
            )
            ok = 400 <= r.status_code < 500 and "error" in r.json()
            tally["refused_4xx" if ok else "unexpected"] += 1
            return
        body = {"model": model, "prompt": f"Soak {rng.random()}: the river", "max_tokens": rng.randint(8, 96)}
        if kind == "plain":
            r = await asyncio.wait_for(client.post(url + "/v1/completions", json=body), 120)
            if r.status_code == 200:
                tally["completed"] += 1
            elif r.status_code in (502, 503) and "error" in r.json():
                tally["clean_error"] += 1
            else:
                tally["unexpected"] += 1
            return

        async def stream() -> str:
            events = 0
            async with client.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as r:
                if r.status_code != 200:
                    await r.aread()
                    return "clean_error" if r.status_code in (502, 503) else "unexpected"
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    events += 1
                    if kind == "hangup" and events >= 3:
                        return "hung_up"
                    if '"replica_failed"' in line:
                        return "cut_clean"
                    if line == "data: [DONE]":
                        return "completed"
            return "unexpected"

        tally[await asyncio.wait_for(stream(), 120)] += 1
    except asyncio.TimeoutError:
        tally["hung"] += 1
    except Exception as e:  # a connection error is an unclean end: counted, and shown
        tally["unexpected"] += 1
        tally.setdefault("errors", []).append(f"{type(e).__name__}: {e}"[:200])


def part_soak(args, model_dir: str) -> dict:
    import httpx

    port = serve.free_port()
    url = f"http://127.0.0.1:{port}"
    tally = dict.fromkeys(
        ["completed", "cut_clean", "hung_up", "clean_error", "refused_4xx", "unexpected", "hung"], 0
    )
    memory, kills = [], []

    async def load() -> None:
        end = time.monotonic() + args.soak_minutes * 60
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=32)
        async with httpx.AsyncClient(timeout=None, limits=limits) as client:
            model = (await client.get(f"{url}/v1/models")).json()["data"][0]["id"]

            async def worker(w: int) -> None:
                wrng = random.Random(w)
                while time.monotonic() < end:
                    await soak_request(client, url, model, wrng, tally)

            async def killer() -> None:
                t0 = time.monotonic()
                while time.monotonic() + args.kill_every < end + 1:
                    await asyncio.sleep(args.kill_every)
                    replicas = (await client.get(url + "/health")).json()["replicas"]
                    victim = replicas[len(kills) % len(replicas)]["pid"]
                    os.kill(victim, signal.SIGKILL)
                    kills.append(dict(at=round(time.monotonic() - t0), pid=victim))
                    print(f"  killed replica pid {victim} at {kills[-1]['at']} s; {tally}", flush=True)

            async def sampler() -> None:
                t0 = time.monotonic()
                while time.monotonic() < end:
                    replicas = (await client.get(url + "/health")).json()["replicas"]
                    memory.append(
                        dict(
                            t=round(time.monotonic() - t0),
                            replicas=sum(rss_mb(r["pid"]) or 0 for r in replicas),
                            ingress=sum(
                                rss_mb(p) or 0 for p in ray_pids("ray::ServeReplica:gpt-serve:ingress")
                            ),
                            proxy=sum(rss_mb(p) or 0 for p in ray_pids("ray::ProxyActor")),
                        )
                    )
                    await asyncio.sleep(15)

            await asyncio.gather(*(worker(w) for w in range(args.soak_clients)), killer(), sampler())

    with serve.served("soak", start(model_dir, ("--replicas", "2"), port), url):
        asyncio.run(load())
        metrics = httpx.get(url + "/metrics").text
    failures = [
        ln for ln in metrics.splitlines() if ln.startswith("gptserve_ingress_replica_failures_total{")
    ]
    total = sum(v for k, v in tally.items() if k != "errors")
    print(f"soak: {total} requests: {tally}; replica failures seen by the ingress: {failures}", flush=True)
    return dict(tally=tally, total=total, kills=kills, memory=memory, ingress_failures=failures)


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    if "chats" in results:
        for routing, r in results["chats"].items():
            axes[0].plot(range(1, 11), [t * 1e3 for t in r["ttft"]], marker="o", label=routing)
        axes[0].set(xlabel="turn", ylabel="median TTFT (ms)", title="8 ten-turn chats on 2 replicas")
        axes[0].legend()
    if "soak" in results:
        m = results["soak"]["memory"]
        for key in ("replicas", "ingress", "proxy"):
            axes[1].plot([s["t"] for s in m], [s[key] for s in m], label=key)
        for k in results["soak"]["kills"]:
            axes[1].axvline(k["at"], color="grey", linestyle=":")
        axes[1].set(
            xlabel="seconds", ylabel="resident memory (MB)", title="soak: replica killed at dotted lines"
        )
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    import torch

    import gpt

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="clients,chats,soak")
    ap.add_argument("--clients", default="1,8,32,64")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--reply-tokens", type=int, default=32)
    ap.add_argument("--hop-rounds", type=int, default=2)
    ap.add_argument("--hop-repeats", type=int, default=5)
    ap.add_argument("--soak-minutes", type=float, default=10)
    ap.add_argument("--kill-every", type=float, default=120)
    ap.add_argument("--soak-clients", type=int, default=12)
    ap.add_argument("--out", default=os.path.join(serve.ROOT, "benchmarks", "results", "cluster.json"))
    ap.add_argument("--plot", default=os.path.join(serve.ROOT, "benchmarks", "results", "cluster.png"))
    args = ap.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    parts = args.parts.split(",")
    cpu = llamacpp.cpu_info()
    print(f"CPU: {cpu['model']}, {cpu['cores']} cores, flags {' '.join(cpu['flags'])}", flush=True)
    with open("/proc/cpuinfo") as f:  # lscpu's model name is bare on some VMs: family and model say more
        first = f.read().split("\n\n")[0].splitlines()
    info = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in first)}
    cpu["family_model"] = f"family {info.get('cpu family', '?')} model {info.get('model', '?')}"
    print(f"CPU {cpu['family_model']}", flush=True)
    results: dict = dict(cpu=cpu)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model_dir = os.path.join(tmp, "gpt2-random")
        gpt.save(gpt.GPT(gpt.preset("gpt2")).eval(), model_dir)
        prompt = serve.prompt_ids(gpt.get_tokenizer("gpt2"), 32)
        if "clients" in parts:
            results["clients"] = part_clients(args, model_dir, prompt)
        if "hop" in parts:
            results["hop"] = part_hop(args, model_dir, prompt)
        if "chats" in parts:
            results["chats"] = part_chats(args, model_dir)
        if "soak" in parts:
            results["soak"] = part_soak(args, model_dir)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    plot(results, args.plot)
    print(f"wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
