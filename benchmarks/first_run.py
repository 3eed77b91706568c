"""How good is the model `./start.sh` trains? Scores checkpoints on Python they never saw.

    .venv/bin/python benchmarks/first_run.py runs/default/best [more checkpoints...]
    .venv/bin/python benchmarks/first_run.py --train OUT -- [gpt-train options]   (train, then score)

The default corpus is the standard library without its tests, so the held-out text is the
standard library's own test files (Lib/test/test_*.py): every 4th file, whole files, until
--held-out-bytes. For each checkpoint it prints
  - nats per byte on that text (gpt.evaluate: every token scored, comparable across tokenizers);
  - greedy completions of ten test-method headers taken from other test files: the share of
    whitespace in the first 160 characters of each, and how many are nothing but whitespace;
  - the completions themselves, for reading.
With --train it times gpt-train first and reports the tokens it trained on and tokens/s, so a
budget can be stated in tokens (CPUs differ; tokens do not).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HEADER = re.compile(r"^    def test_\w+\(self\):\n", re.M)
SHOWN_CHARS = 160


def cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def test_files() -> list[Path]:
    return sorted((Path(sysconfig.get_paths()["stdlib"]) / "test").glob("test_*.py"))


def held_out_texts(limit: int) -> list[str]:
    texts, total = [], 0
    for f in test_files()[::4]:
        text = f.read_text(encoding="utf-8", errors="replace")
        if total + len(text.encode()) > limit:
            continue  # whole files only: a smaller one further on may still fit
        texts.append(text)
        total += len(text.encode())
    return texts


def method_headers(n: int = 10) -> list[str]:
    """The first test-method header (with its class's indentation) of n files not held out."""
    out = []
    for f in test_files()[2::4]:
        m = HEADER.search(f.read_text(encoding="utf-8", errors="replace"))
        if m:
            out.append(m.group(0))
        if len(out) == n:
            break
    return out


def whitespace_share(text: str) -> float:
    return sum(c.isspace() for c in text) / max(1, len(text))


def score(path: str, held_out: list[str], headers: list[str]) -> dict:
    import torch

    import gpt
    from gpt.evaluate import score_texts

    torch.manual_seed(0)
    model, tok = gpt.load(path)
    t0 = time.perf_counter()
    s = score_texts(model, tok, held_out, progress=sys.stderr.isatty())
    scored_s = time.perf_counter() - t0
    outs = gpt.complete(
        model, tok, headers, gpt.SamplingParams(max_new_tokens=SHOWN_CHARS, temperature=0.0, ignore_eos=True)
    )
    texts = [o.text[:SHOWN_CHARS] for o in outs]
    ws = [whitespace_share(t) for t in texts]
    return {
        "checkpoint": path,
        "tokenizer": tok.name,
        "vocab": tok.vocab_size,
        "params_M": round(model.num_params() / 1e6, 3),
        "nats_per_byte": round(s.nats_per_byte, 4),
        "bytes_per_token": round(s.bytes / max(1, s.tokens), 3),
        "scored_s": round(scored_s, 1),
        "greedy_whitespace": round(sum(ws) / len(ws), 3),
        "greedy_all_whitespace": sum(w == 1.0 for w in ws),
        "completions": texts,
    }


def train(out: Path, args: list[str]) -> dict:
    cmd = [str(ROOT / ".venv/bin/gpt-train"), "--out", str(out), *args]
    print("$", " ".join(cmd), file=sys.stderr)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0
    latest = out / (out / "latest").read_text().strip()
    seen = json.loads((latest / "config.json").read_text())["metadata"]["tokens_seen"]
    return {"train_wall_s": round(wall, 1), "tokens_seen": seen, "train_tokens_per_s": round(seen / wall)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="*", help="checkpoint directories to score")
    p.add_argument(
        "--train", metavar="OUT", help="train with the options after -- into OUT first, then score OUT/best"
    )
    p.add_argument("--held-out-bytes", type=int, default=200_000)
    p.add_argument("--json", metavar="FILE", help="append each result as a JSON line")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args, rest = p.parse_args(argv[:cut]), argv[cut + 1 :]
    print(f"CPU: {cpu_model()}, python {platform.python_version()}", file=sys.stderr)
    held_out, headers = held_out_texts(args.held_out_bytes), method_headers()
    print(
        f"held out: {len(held_out)} test files, {sum(len(t.encode()) for t in held_out):,} bytes; "
        f"{len(headers)} method headers",
        file=sys.stderr,
    )
    jobs = list(args.checkpoints)
    trained = {}
    if args.train:
        trained = train(Path(args.train), rest)
        jobs.append(str(Path(args.train) / "best"))
    elif rest:
        p.error("options after -- are for gpt-train, and need --train OUT")
    for path in jobs:
        r = {
            **score(path, held_out, headers),
            **(trained if path.startswith(str(args.train or "\0")) else {}),
        }
        if args.train:
            r["train_args"] = " ".join(rest)
        for t in r["completions"][:3]:
            print("---\n" + t, file=sys.stderr)
        summary = {k: v for k, v in r.items() if k != "completions"}
        print(json.dumps(summary))
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
