"""CPU speed yardstick: our GPT-2 stack against llama.cpp, same weights, same machine, one run.

Not part of the test suite: it builds llama.cpp (about 9 minutes on 2 cores, cached) and then runs
for about 10 minutes on a quiet 2-core machine. Other load on the machine skews every figure: the
share of CPU that other processes take is sampled before each phase and printed. What it does:

1. Builds llama.cpp from the source vendored in the llama-cpp-python source distribution
   (`pip download --no-binary :all: llama-cpp-python`, then `vendor/llama.cpp`), only the tools
   `llama-bench`, `llama-batched-bench`, `llama-server` and `llama-quantize`, with `GGML_NATIVE`,
   into `--cache-dir` (default ~/.cache/gpt-serve-bench/llama.cpp); skipped when already built.
2. Makes the same random GPT-2-small weights (124M, `gpt.GPT(gpt.preset("gpt2"))`, torch seed 0)
   available to both: our checkpoint (`gpt.save`), and a Hugging Face GPT-2 directory
   (`gpt.export_hf_gpt2`, plus vocab.json / merges.txt derived from our bundled GPT-2 ranks file and
   checked against our tokenizer) that llama.cpp's `convert_hf_to_gguf.py` turns into GGUF f32 and
   f16; `llama-quantize` makes q8_0 from the f32 file.
3. Measures, one thing at a time:
   a. in-process: decode tokens/s at batch 1, 8, 32 (a 32-token prompt, then `--new-tokens`
      single-token steps for every row: B x steps / time of the steps) and the prefill time of a
      1024-token prompt. Ours: `model.start` / `model.step` with greedy argmax under
      `torch.inference_mode()`, the rows of a 32-row KV cache as the server batches them, fp32
      (weights packed with `gpt.pack_linear_weights`) and int8 (`gpt.quantize`), each also with the
      decode step compiled (`gpt.compile_decode`, compiled before timing), and int8 compiled with a
      float16 KV cache (llama.cpp's cache is float16 by default). llama.cpp f32,
      f16, q8_0: `llama-bench -p 1024 -n 128` (batch 1 decode, from an empty context, and prefill)
      and `llama-batched-bench -npp 32 -ntg 128` (batch 8 and 32). Best of `--repeats` for both.
      And transformers' GPT2LMHeadModel on the same weights (fp32, in-process only): `generate`,
      greedy, its per-token rate measured as benchmarks/decode.py does, and one forward for prefill.
      Batch 1 is also given as a share of the roofline: the weights a step reads times the rate,
      over the memory read bandwidth sampled just before and after (the VM's speed drifts).
   b. served: `gpt-serve` (fp32 and `--quantize int8`, each with and without `--compile`, and int8
      with `--compile --kv-cache-dtype float16`) and
      `llama-server` (f32, f16, q8_0), one after
      the other, under the same streaming load generator (benchmarks/serve.py's) at `--clients`
      concurrent clients, each a 32-token prompt and `--new-tokens` tokens (greedy, ignore_eos):
      aggregate tokens/s and time to first token, p50. Every request has a connection of its own
      (this llama-server drops a kept-alive connection's second request), for both servers.
      `--server-passes` passes (default 2) go over all eight servers in turn, and each figure keeps
      its best pass: a shared VM's speed drifts within minutes, and the passes spread a slow
      spell over every server instead of whichever ran during it.
   c. prints a table with the ratios ours / llama.cpp (int8 vs q8_0, fp32 vs f32, and our best vs
      their best) and ours / transformers (fp32), and writes everything as JSON to `--json`.

    python benchmarks/llamacpp.py --json results/llamacpp.json
    python benchmarks/llamacpp.py --skip-build --only serve --clients 1,32 --new-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import glob
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serve  # noqa: E402  (benchmarks/serve.py: the server launcher and the streaming load generator)

import gpt  # noqa: E402
from gpt.compile import warm_up  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "gpt-serve-bench")
SEED = 0
THREADS = 2
TARGETS = ["llama-bench", "llama-batched-bench", "llama-server", "llama-quantize"]
CMAKE_FLAGS = [
    "-DGGML_NATIVE=ON",
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_CURL=OFF",
    # nothing may reach the network (no TLS, no prebuilt web UI download); no tests, no examples
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DBUILD_SHARED_LIBS=OFF",
]
GGUF_TYPES = ("f32", "f16", "q8_0")
CPU_FLAGS = (
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{fmt_s(time.perf_counter() - T0):>7}] {msg}", flush=True)


def fmt_s(s: float) -> str:
    return f"{int(s // 60)}m{int(s % 60):02d}s" if s >= 60 else f"{s:.1f}s"


# --- the machine ------------------------------------------------------------------------------


def cpu_info() -> dict:
    model, flags = platform.processor() or "?", set()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name":
                model = value.strip()
            elif key.strip() == "Flags":
                flags = set(value.split())
    except (OSError, subprocess.CalledProcessError):
        pass
    return dict(model=model, cores=os.cpu_count(), flags=[f for f in CPU_FLAGS if f in flags])


def memory_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Read bandwidth in GB/s: the best time of summing a `gib` GiB float32 tensor (torch's threads)."""
    x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    x.sum()  # touch every page once
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    n = x.numel() * 4
    del x
    return n / best / 1e9


def step_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: every linear layer's tensors (the head included;
    tied to the embedding, it is the same tensor), each once. The embedding lookups read a row.
    An int8 layer holds its weight twice where our kernel runs (`weight_q`, saved, and
    `weight_rows`, the kernel's layout); a step reads one of them."""
    seen, n = set(), 0
    for m in model.modules():
        if isinstance(m, (gpt.linear.Linear, gpt.quantization.Int8Linear)):
            tensors = [*m.parameters(recurse=False), *m.buffers(recurse=False)]
            if isinstance(m, gpt.quantization.Int8Linear) and m.weight_rows.numel():
                tensors = [t for t in tensors if t is not m.weight_q]
            for t in tensors:
                if t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    n += t.numel() * t.element_size()
    return n


def roofline(tok_s: float, nbytes: int, bw_before: float, bw_after: float) -> dict:
    """A batch-1 decode rate as a read rate of the weights, and its fraction of the memory
    bandwidth (the better of the samples taken just before and after: the VM's speed drifts)."""
    read = tok_s * nbytes / 1e9
    bw = max(bw_before, bw_after)
    return dict(
        step_bytes=nbytes,
        read_gb_s=read,
        bandwidth_gb_s=bw,
        bandwidth_samples=[bw_before, bw_after],
        fraction=read / bw,
    )


def _cpu_jiffies() -> tuple[int, int]:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v), v[3] + (v[4] if len(v) > 4 else 0)  # total, idle + iowait


BUSY: list[tuple[str, float]] = []


def background_busy(phase: str, seconds: float = 1.0) -> float:
    """Share of the machine's CPU time busy over `seconds` while this benchmark itself is idle,
    i.e. what other processes take from it; logged and kept for the JSON (-1 without /proc)."""
    try:
        t0, i0 = _cpu_jiffies()
        time.sleep(seconds)
        t1, i1 = _cpu_jiffies()
        busy = 1 - (i1 - i0) / max(t1 - t0, 1)
    except OSError:
        busy = -1.0
    BUSY.append((phase, busy))
    if busy > 0.15:
        log(f"  note: other processes keep {busy:.0%} of the CPUs busy before {phase}; figures will suffer")
    return busy


# --- 1. llama.cpp from the llama-cpp-python sdist ---------------------------------------------


def llama_dir(cache: str) -> str:
    return os.path.join(cache, "llama.cpp")


def bin_path(cache: str, name: str) -> str:
    return os.path.join(llama_dir(cache), "build", "bin", name)


def built(cache: str) -> bool:
    return all(os.access(bin_path(cache, t), os.X_OK) for t in TARGETS)


def llama_src(cache: str) -> str:
    """The vendored llama.cpp source tree, downloading and unpacking the sdist on first use."""
    src = llama_dir(cache)
    if os.path.exists(os.path.join(src, "CMakeLists.txt")):
        return src
    sdist_dir = os.path.join(cache, "sdist")
    tarballs = sorted(glob.glob(os.path.join(sdist_dir, "llama_cpp_python-*.tar.gz")))
    if not tarballs:
        log("downloading the llama-cpp-python source distribution (pip download) ...")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                "llama-cpp-python",
                "-d",
                sdist_dir,
            ],
            check=True,
        )
        tarballs = sorted(glob.glob(os.path.join(sdist_dir, "llama_cpp_python-*.tar.gz")))
    tarball = tarballs[-1]
    log(f"unpacking vendor/llama.cpp from {os.path.basename(tarball)}")
    tmp = os.path.join(cache, "unpack.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(tarball) as tf:
        top = tf.getnames()[0].split("/")[0]
        prefix = f"{top}/vendor/llama.cpp/"
        tf.extractall(tmp, members=[m for m in tf.getmembers() if m.name.startswith(prefix)], filter="data")
    os.replace(os.path.join(tmp, top, "vendor", "llama.cpp"), src)
    gitlink = os.path.join(src, ".git")  # a submodule's pointer into a .git that the sdist lacks
    if os.path.isfile(gitlink):
        os.remove(gitlink)
    with open(os.path.join(src, ".from-sdist"), "w") as f:
        f.write(os.path.basename(tarball) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)
    return src


def llama_version(cache: str) -> str:
    try:
        with open(os.path.join(llama_dir(cache), ".from-sdist")) as f:
            return f.read().strip()
    except OSError:
        return "?"


def ensure_cmake() -> str:
    cmake = shutil.which("cmake")
    if cmake:
        return cmake
    log("cmake not found: pip install cmake")
    subprocess.run([sys.executable, "-m", "pip", "install", "cmake"], check=True)
    cmake = shutil.which("cmake") or os.path.join(os.path.dirname(sys.executable), "cmake")
    if not os.path.exists(cmake):
        raise SystemExit("could not install cmake")
    return cmake


def build_llamacpp(cache: str, jobs: int = 2) -> float:
    """Build the four tools (skipped when present); returns the seconds it took (0 when cached)."""
    if built(cache):
        log(f"llama.cpp ({llama_version(cache)}) already built in {os.path.dirname(bin_path(cache, 'x'))}")
        return 0.0
    src = llama_src(cache)
    cmake = ensure_cmake()
    build = os.path.join(src, "build")
    t0 = time.perf_counter()
    gen = (
        ["-G", "Ninja"]
        if shutil.which("ninja") and not os.path.exists(os.path.join(build, "Makefile"))
        else []
    )
    log(f"configuring llama.cpp: {' '.join(CMAKE_FLAGS)}")
    cfg = subprocess.run([cmake, "-S", src, "-B", build, *gen, *CMAKE_FLAGS], capture_output=True, text=True)
    if cfg.returncode != 0:
        print(cfg.stdout[-3000:], cfg.stderr[-3000:], sep="\n", file=sys.stderr)
        raise SystemExit("configuring llama.cpp failed")
    log(f"building {', '.join(TARGETS)} with -j{jobs} (about 10 minutes on 2 cores)")
    proc = subprocess.Popen(
        [cmake, "--build", build, f"-j{jobs}", "--target", *TARGETS],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    tail: list[str] = []
    last = 0.0
    for line in proc.stdout:
        line = line.rstrip()
        tail = (tail + [line])[-40:]
        # ninja: "[12/218] Building CXX ...", make: "[ 12%] Building CXX ..."
        m = re.match(r"\[\s*(\d+)/(\d+)\]", line) or re.match(r"\[\s*(\d+)%\]", line)
        if not m:
            continue
        done, total = (int(m.group(1)), int(m.group(2))) if m.re.groups == 2 else (int(m.group(1)), 100)
        now = time.perf_counter() - t0
        if now - last < 5 and done != total:
            continue
        last = now
        frac = done / max(total, 1)
        eta = f", ETA {fmt_s(now / frac - now)}" if frac > 0.02 else ""
        log(f"  build {done}/{total} ({frac:.0%}) {fmt_s(now)} elapsed{eta}: {line[m.end() :].strip()[:80]}")
    if proc.wait() != 0:
        print("\n".join(tail), file=sys.stderr)
        raise SystemExit(f"the llama.cpp build failed (exit {proc.returncode})")
    took = time.perf_counter() - t0
    log(f"llama.cpp built in {fmt_s(took)}")
    return took


# --- 2. the same weights for both -------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table for byte-level BPE vocab files: printable
    Latin-1 bytes stand for themselves, the others take the characters from U+0100 on, in order."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    table, shifted = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def merge_parts(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The pair of tokens whose merge made `token`: run byte-level BPE on its bytes with only
    the merges ranked below it; what is left is the two halves of its own merge."""
    limit = ranks[token]
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < limit and (best is None or r < best[0]):
                best = (r, i)
        if best is None:
            break
        i = best[1]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2 or any(ranks.get(p, limit) >= limit for p in parts):
        raise ValueError(
            f"token {token!r} (rank {limit}) is not the merge of two lower-ranked tokens: {parts}"
        )
    return parts[0], parts[1]


def write_gpt2_tokenizer(path: str) -> None:
    """vocab.json, merges.txt and tokenizer_config.json of a Hugging Face GPT-2 tokenizer, derived
    from our bundled GPT-2 ranks file (rank = token id; merges in rank order)."""
    from gpt.tokenizer import EOT_TEXT, GPT2_ASSET, GPT2_EOT_ID, load_tiktoken_ranks

    ranks = load_tiktoken_ranks(GPT2_ASSET)
    table = bytes_to_unicode()
    show = lambda t: "".join(table[b] for b in t)  # noqa: E731
    vocab = {show(t): r for t, r in ranks.items()}
    vocab[EOT_TEXT] = GPT2_EOT_ID
    merges = [merge_parts(t, ranks) for t, r in sorted(ranks.items(), key=lambda kv: kv[1]) if r >= 256]
    with open(os.path.join(path, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(path, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(f"{show(a)} {show(b)}\n" for a, b in merges)
    write_tokenizer_config(path, "GPT2Tokenizer", 1024, add_prefix_space=False)


def write_tokenizer_config(path: str, tokenizer_class: str, max_length: int, **extra) -> None:
    """tokenizer_config.json for transformers: end-of-text as every special token, no BOS added."""
    from gpt.tokenizer import EOT_TEXT

    config = {
        "tokenizer_class": tokenizer_class,
        "model_max_length": max_length,
        **extra,
        "add_bos_token": False,
        "bos_token": EOT_TEXT,
        "eos_token": EOT_TEXT,
        "unk_token": EOT_TEXT,
    }
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)


TOKENIZER_CHECKS = [
    "Hello, world! This is a test.",
    "The history of the city begins in the early years of the river trade.",
    "  leading spaces, trailing spaces   \n\n\ttabs and\r\nnewlines  ",
    "I've been 'told he's there, 'RE you sure? We'Ve a'lL",
    "3 33 333 3333 33333 3.14159 1,000,000 $100.00 -42",
    "unicode: café naïve Ünïcödé 日本語のテキスト 我想在apple工作 нещо на Български",
    "emoji 🚀 (normal) 😶\u200d🌫️ ✅ 🦙🦙 and symbols ------======= ''''''``````\"\"\"\"......!!!!!!??????",
    "def f(x):\n    return x ** 2  # comment\n",
]


def check_tokenizer(path: str) -> list[str]:
    """Our tokenizer's ids against transformers' GPT2TokenizerFast / GPT2Tokenizer loaded from
    `path`; raises on any difference; returns which classes were checked."""
    import transformers

    ours = gpt.get_tokenizer("gpt2")
    checked = []
    for name in ("GPT2TokenizerFast", "GPT2Tokenizer"):
        cls = getattr(transformers, name, None)
        if cls is None:
            continue
        tok = cls.from_pretrained(path)
        for text in TOKENIZER_CHECKS:
            want, got = ours.encode(text), tok.encode(text)
            if want != got:
                raise SystemExit(
                    f"the derived tokenizer ({name}) disagrees with ours on {text!r}:\n"
                    f"  ours  {want}\n  {name} {got}"
                )
            if tok.decode(got) != text:
                raise SystemExit(f"{name} does not decode {text!r} back")
        if tok.encode("a<|endoftext|>b") != [ours.encode("a")[0], 50256, ours.encode("b")[0]]:
            raise SystemExit(f"{name} does not map <|endoftext|> to 50256")
        checked.append(name)
    if not checked:
        raise SystemExit("transformers has neither GPT2TokenizerFast nor GPT2Tokenizer")
    return checked


def random_gpt2() -> gpt.GPT:
    torch.manual_seed(SEED)
    return gpt.GPT(gpt.preset("gpt2")).eval()


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def ensure_gguf_package(src: str) -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        log("pip install gguf from the vendored gguf-py")
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", os.path.join(src, "gguf-py")], check=True
        )


def gguf_field(path: str, key: str):
    try:
        import gguf

        field = gguf.GGUFReader(path).fields.get(key)
        return None if field is None else field.contents()
    except Exception as e:  # only for the progress line
        return f"? ({e})"


def prepare_models(cache: str, need_gguf: bool) -> dict:
    """Our checkpoint, the HF directory and (when `need_gguf`) the GGUF files, all from the same
    seeded weights. The GGUF files are reused while the exported weights hash the same."""
    models = os.path.join(cache, "models")
    os.makedirs(models, exist_ok=True)
    ours_dir, hf_dir = os.path.join(models, "ours-gpt2-seed0"), os.path.join(models, "hf-gpt2-seed0")
    t0 = time.perf_counter()
    model = random_gpt2()
    gpt.save(model, ours_dir)
    gpt.export_hf_gpt2(model, hf_dir)
    del model
    cfg_path = os.path.join(hf_dir, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["n_ctx"] = cfg["n_positions"]  # the converter's GPT-2 class reads n_ctx
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)
    write_gpt2_tokenizer(hf_dir)
    checked = check_tokenizer(hf_dir)
    log(
        f"weights (seed {SEED}) saved as our checkpoint and a Hugging Face GPT-2 directory; derived "
        f"vocab.json/merges.txt encode {len(TOKENIZER_CHECKS)} test strings like ours ({', '.join(checked)}) "
        f"[{fmt_s(time.perf_counter() - t0)}]"
    )
    out = dict(ours=ours_dir, hf=hf_dir, gguf={})
    if not need_gguf:
        return out
    src = llama_dir(cache)
    weights_sha = sha256_file(os.path.join(hf_dir, "model.safetensors"))
    stamp = os.path.join(models, "gguf.sha256")
    paths = {t: os.path.join(models, f"gpt2-seed0-{t}.gguf") for t in GGUF_TYPES}
    fresh = (
        os.path.exists(stamp)
        and open(stamp).read().strip() == weights_sha
        and all(os.path.exists(p) for p in paths.values())
    )
    if fresh:
        log("GGUF files are up to date with these weights")
    else:
        ensure_gguf_package(src)
        if os.path.exists(stamp):
            os.remove(stamp)
        for t in ("f32", "f16"):
            t1 = time.perf_counter()
            log(f"convert_hf_to_gguf.py --outtype {t} ...")
            r = subprocess.run(
                [
                    sys.executable,
                    os.path.join(src, "convert_hf_to_gguf.py"),
                    hf_dir,
                    "--outtype",
                    t,
                    "--outfile",
                    paths[t],
                ],
                capture_output=True,
                text=True,
            )
            if r.returncode != 0:
                print(r.stdout[-3000:], r.stderr[-5000:], sep="\n", file=sys.stderr)
                raise SystemExit(f"convert_hf_to_gguf.py --outtype {t} failed")
            log(
                f"  {os.path.basename(paths[t])}: {os.path.getsize(paths[t]) / 1e6:.0f} MB, pre-tokenizer "
                f"{gguf_field(paths[t], 'tokenizer.ggml.pre')!r} [{fmt_s(time.perf_counter() - t1)}]"
            )
        log("llama-quantize f32 -> q8_0 ...")
        r = subprocess.run(
            [bin_path(cache, "llama-quantize"), paths["f32"], paths["q8_0"], "q8_0", str(THREADS)],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            print(r.stdout[-3000:], r.stderr[-3000:], sep="\n", file=sys.stderr)
            raise SystemExit("llama-quantize failed")
        log(f"  {os.path.basename(paths['q8_0'])}: {os.path.getsize(paths['q8_0']) / 1e6:.0f} MB")
        with open(stamp, "w") as f:
            f.write(weights_sha + "\n")
    out["gguf"] = paths
    return out


# --- 3a. in-process decode and prefill --------------------------------------------------------


def int8_available() -> tuple[bool, str]:
    if not callable(getattr(gpt, "quantize", None)):
        return False, "gpt.quantize is not importable yet"
    return True, ""


COMPILED = ("fp32c", "int8c", "int8ch")  # the decode step compiled (gpt.compile_decode)
HALF_KV = ("int8ch",)  # a float16 KV cache (--kv-cache-dtype float16)


def load_ours(ckpt: str, quant: str):
    """quant: fp32, int8, or either with the decode step compiled (fp32c, int8c), and int8c with
    a float16 KV cache (int8ch: the cache is the caller's, see HALF_KV)."""
    model, tokenizer = gpt.load(ckpt)
    model.eval()
    if quant.startswith("int8"):
        gpt.quantize(model, "int8")
    gpt.pack_linear_weights(model, rows_hint=32)  # what the server's engine does (fp32 and int8 layers)
    if quant in COMPILED:
        gpt.compile_decode(model)
    return model, tokenizer


@torch.inference_mode()
def ours_decode_rate(model, cache, prompt: list[int], batch: int, steps: int) -> float:
    """Prefill `batch` rows with the prompt, then `steps` single-token greedy steps for all of them
    (cache rows 0..batch-1, the server's decode layout); tokens/s of the steps."""
    rows = slice(0, batch)
    logits = model.start([prompt] * batch, cache, rows=rows)
    nxt = gpt.kernels.argmax(logits)  # what greedy sampling uses
    t0 = time.perf_counter()
    for _ in range(steps):
        logits = model.step(nxt[:, None], cache, rows=rows)
        nxt = gpt.kernels.argmax(logits)
    return batch * steps / (time.perf_counter() - t0)


@torch.inference_mode()
def ours_prefill_s(model, cache, prompt: list[int]) -> float:
    t0 = time.perf_counter()
    model.start([prompt], cache, rows=slice(0, 1)).argmax(-1)
    return time.perf_counter() - t0


def bench_ours_inprocess(
    ckpt: str,
    quant: str,
    batches: list[int],
    prompt: list[int],
    long_prompt: list[int],
    steps: int,
    repeats: int,
) -> dict:
    background_busy(f"ours {quant} in-process")
    model, _ = load_ours(ckpt, quant)
    cache = model.new_cache(
        max(32, max(batches)),
        max_len=model.config.block_size,
        dtype=torch.float16 if quant in HALF_KV else None,
    )
    res: dict = {"decode": {}}
    if quant in COMPILED:
        res["compile_s"] = warm_up(model, cache)
        log(f"  ours {quant} compiled its decode step in {res['compile_s']:.1f} s")
    ours_decode_rate(model, cache, prompt, max(batches), 4)  # warm-up: first-call costs stay out
    for b in batches:
        t0 = time.perf_counter()
        bw = memory_bandwidth() if b == 1 else None
        rates = [ours_decode_rate(model, cache, prompt, b, steps) for _ in range(repeats)]
        res["decode"][b] = max(rates)
        if b == 1:
            res["roofline"] = roofline(max(rates), step_bytes(model), bw, memory_bandwidth())
            log(
                f"  ours {quant:<5} batch 1 reads {res['roofline']['read_gb_s']:.1f} GB/s, "
                f"{res['roofline']['fraction']:.0%} of the bandwidth measured just before and after"
            )
        log(
            f"  ours {quant:<5} decode batch {b:>2}: {max(rates):7.1f} tok/s "
            f"(runs {', '.join(f'{r:.1f}' for r in rates)}) [{fmt_s(time.perf_counter() - t0)}]"
        )
    ours_prefill_s(model, cache, long_prompt[:64])
    times = [ours_prefill_s(model, cache, long_prompt) for _ in range(repeats)]
    res["prefill_s"] = min(times)
    log(
        f"  ours {quant:<4} prefill {len(long_prompt)} tokens: {min(times):.3f} s "
        f"({len(long_prompt) / min(times):.0f} tok/s; runs {', '.join(f'{t:.3f}' for t in times)})"
    )
    del model, cache
    gc.collect()
    return res


def bench_hf_inprocess(
    hf_dir: str, batches: list[int], prompt: list[int], long_prompt: list[int], steps: int, repeats: int
) -> dict:
    """transformers' GPT2LMHeadModel on the same weights (fp32): `generate` greedy, its decode rate
    batch x steps / (time of steps + 1 new tokens - time of 1), as benchmarks/decode.py measures
    it; prefill: one forward over the long prompt."""
    from transformers import GPT2LMHeadModel

    background_busy("transformers in-process")
    hf = GPT2LMHeadModel.from_pretrained(hf_dir).eval()

    def gen(ids: torch.Tensor, n: int) -> float:
        t0 = time.perf_counter()
        hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,
            pad_token_id=hf.config.eos_token_id,
            num_beams=1,
        )
        return time.perf_counter() - t0

    res: dict = {"decode": {}}
    with torch.inference_mode():
        gen(torch.tensor([prompt] * max(batches)), 4)  # warm-up
        for b in batches:
            ids = torch.tensor([prompt] * b)
            rates = [b * steps / max(gen(ids, steps + 1) - gen(ids, 1), 1e-9) for _ in range(repeats)]
            res["decode"][b] = max(rates)
            log(
                f"  transformers decode batch {b:>2}: {max(rates):7.1f} tok/s "
                f"(runs {', '.join(f'{r:.1f}' for r in rates)})"
            )
        ids = torch.tensor([long_prompt])
        hf(ids[:, :64])
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            hf(ids).logits[:, -1].argmax(-1)
            times.append(time.perf_counter() - t0)
    res["prefill_s"] = min(times)
    log(f"  transformers prefill {len(long_prompt)} tokens: {min(times):.3f} s")
    return res


def run_tool(cmd: list[str], what: str, timeout: float = 1800) -> tuple[str, str]:
    """Run a llama.cpp tool, forwarding its progress lines as they come; returns (stdout, stderr)."""
    import queue
    import threading

    log(f"  $ {' '.join(os.path.basename(c) if i == 0 else c for i, c in enumerate(cmd))}")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
    lines: queue.Queue = queue.Queue()
    out: dict[str, list[str]] = {"stdout": [], "stderr": []}

    def pump(name: str, pipe) -> None:
        for line in pipe:
            lines.put((name, line))
        lines.put((name, None))

    for name in out:
        threading.Thread(target=pump, args=(name, getattr(proc, name)), daemon=True).start()
    try:
        deadline, open_pipes = time.monotonic() + timeout, 2
        while open_pipes:
            try:
                name, line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"{what} ran past {timeout:.0f} s") from None
            if line is None:
                open_pipes -= 1
                continue
            out[name].append(line)
            if "llama-bench: benchmark" in line:
                log("    " + line.strip())
            elif line.startswith('{"n_kv_max"'):
                log("    " + _batched_summary(line))
        if proc.wait() != 0:
            raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{''.join(out['stderr'][-30:])}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return "".join(out["stdout"]), "".join(out["stderr"])


def _batched_summary(line: str) -> str:
    try:
        r = json.loads(line)
        return f"batch {r['pl']:>2}: decode {r['speed_tg']:.1f} tok/s, prompt {r['speed_pp']:.1f} tok/s"
    except (ValueError, KeyError):
        return line.strip()


# bytes per weight of each GGUF type, relative to float32 (q8_0: blocks of 32 int8 and an f16 scale)
GGUF_BYTES = {"f32": 1.0, "f16": 0.5, "q8_0": 34 / 32 / 4}


def bench_llama_inprocess(
    cache: str,
    gguf: str,
    batches: list[int],
    prompt_len: int,
    prefill_len: int,
    steps: int,
    repeats: int,
    nbytes: int,
) -> dict:
    """`nbytes`: the weights one decode step reads, in this file's type."""
    res: dict = {"decode": {}, "decode_llama_bench_b1": None, "batched_bench": {}}
    background_busy(f"llama.cpp {os.path.basename(gguf)} in-process")
    bw_before = memory_bandwidth()
    # llama-bench: batch-1 decode (tg, from an empty context) and prefill (pp), samples per repetition
    out, _ = run_tool(
        [
            bin_path(cache, "llama-bench"),
            "-m",
            gguf,
            "-p",
            str(prefill_len),
            "-n",
            str(steps),
            "-t",
            str(THREADS),
            "-r",
            str(repeats),
            "-o",
            "json",
            "--progress",
        ],
        "llama-bench",
    )
    start, end = out.find("["), out.rfind("]")
    for t in json.loads(out[start : end + 1]):
        best = max(t.get("samples_ts") or [t["avg_ts"]])
        if t["n_prompt"] > 0 and t["n_gen"] == 0:
            res["prefill_s"] = t["n_prompt"] / best
            res["prefill_tok_s"] = best
        elif t["n_gen"] > 0 and t["n_prompt"] == 0:
            res["decode_llama_bench_b1"] = best
        res.setdefault(
            "llama_bench_info",
            {
                k: t.get(k)
                for k in (
                    "build_commit",
                    "cpu_info",
                    "backends",
                    "n_threads",
                    "n_batch",
                    "n_ubatch",
                    "flash_attn",
                    "type_k",
                )
            },
        )
    if res["decode_llama_bench_b1"] is not None:
        res["roofline"] = roofline(res["decode_llama_bench_b1"], nbytes, bw_before, memory_bandwidth())
    # llama-batched-bench: B sequences, each its own prompt_len-token prompt, then `steps` steps of B tokens
    pls = [b for b in batches for _ in range(repeats)]
    ctx = max(batches) * (prompt_len + steps) + 256
    out, err = run_tool(
        [
            bin_path(cache, "llama-batched-bench"),
            "-m",
            gguf,
            "-c",
            str(ctx),
            "-b",
            "2048",
            "-ub",
            "512",
            "-npp",
            str(prompt_len),
            "-ntg",
            str(steps),
            "-npl",
            ",".join(map(str, pls)),
            "-t",
            str(THREADS),
            "-tb",
            str(THREADS),
            "--output-format",
            "jsonl",
        ],
        "llama-batched-bench",
    )
    for line in (out + err).splitlines():
        if line.startswith('{"n_kv_max"'):
            r = json.loads(line)
            prev = res["batched_bench"].get(r["pl"])
            if prev is None or r["speed_tg"] > prev["speed_tg"]:
                res["batched_bench"][r["pl"]] = r
    for b in batches:
        if b == 1 and res["decode_llama_bench_b1"] is not None:
            res["decode"][b] = res["decode_llama_bench_b1"]  # the brief's yardstick: llama-bench tg
        elif b in res["batched_bench"]:
            res["decode"][b] = res["batched_bench"][b]["speed_tg"]
    return res


# --- 3b. the servers under load ---------------------------------------------------------------


def server_help(cmd: list[str]) -> str:
    try:
        return subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def start_llama_server(
    cache: str, gguf: str, port: int, parallel: int, new_tokens: int, prompt_len: int, logf
) -> subprocess.Popen:
    per_slot = max(256, prompt_len + new_tokens + 16)
    cmd = [
        bin_path(cache, "llama-server"),
        "-m",
        gguf,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "-t",
        str(THREADS),
        "-tb",
        str(THREADS),
        "--parallel",
        str(parallel),
        "-c",
        str(parallel * per_slot),
        "--cache-ram",
        "0",  # no host-side prompt cache: both servers prefill every prompt
        "--no-webui",
    ]
    return subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT)


async def load_rounds(
    url: str,
    prompt: list[int],
    new_tokens: int,
    clients: list[int],
    extra: dict | None,
    label: str,
    reference: list[int] | None,
) -> dict:
    """serve.py's load generator with a fresh connection per request (no keep-alive)."""
    import httpx

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=None, limits=limits, headers={"Connection": "close"}) as client:
        name = (await client.get(f"{url}/v1/models")).json()["data"][0]["id"]
        # the same weights? the first greedy tokens of both should agree
        body = {
            "model": name,
            "prompt": prompt,
            "max_tokens": 16,
            "temperature": 0,
            "ignore_eos": True,
            **(extra or {}),
        }
        text = (await client.post(f"{url}/v1/completions", json=body)).json()["choices"][0]["text"]
        make = lambda: serve.http_client(client, url, name, prompt, new_tokens, extra)  # noqa: E731
        await serve.run_round(make, 1)  # warm-up: first-call costs stay out of the figures
        rounds = {}
        for c in clients:
            t0 = time.perf_counter()
            r = await serve.run_round(make, c)
            rounds[c] = r
            short = (
                "" if r["tokens"] == c * new_tokens else f" (only {r['tokens']} of {c * new_tokens} tokens!)"
            )
            log(
                f"  {label:<14} {c:>2} clients: {r['rate']:7.1f} tok/s, TTFT p50 "
                f"{r['ttft50'] * 1e3:6.0f} ms, "
                f"ITL p50 {r['itl50'] * 1e3:5.1f} ms{short} [{fmt_s(time.perf_counter() - t0)}]"
            )
    return dict(rounds=rounds, greedy16=text)


def bench_server(
    kind: str,
    label: str,
    start,
    url_port: int,
    health: str,
    prompt: list[int],
    new_tokens: int,
    clients: list[int],
    extra: dict | None,
) -> dict:
    url = f"http://127.0.0.1:{url_port}"
    background_busy(label)
    t0 = time.perf_counter()
    with serve.served(label, start, url, health) as proc:
        log(f"  {label}: {kind} ready (pid {proc.pid}) in {fmt_s(time.perf_counter() - t0)}")
        return asyncio.run(load_rounds(url, prompt, new_tokens, clients, extra, label, None))


def keep_best(section: dict, key: str, new: dict) -> None:
    """Merge one pass's server results into `section[key]`: per client count, the round with the
    higher rate (its latencies with it); the greedy check text of the first pass."""
    old = section.get(key)
    if old is None:
        section[key] = new
        return
    for c, r in new["rounds"].items():
        if r["rate"] > old["rounds"].get(c, {}).get("rate", -1.0):
            old["rounds"][c] = r


# --- 3c. the table ----------------------------------------------------------------------------

COLS = [
    ("ours fp32", "ours", "fp32"),
    ("ours fp32+compile", "ours", "fp32c"),
    ("ours int8", "ours", "int8"),
    ("ours int8+compile", "ours", "int8c"),
    ("ours int8+compile+f16 KV", "ours", "int8ch"),
    ("llama f32", "llama", "f32"),
    ("llama f16", "llama", "f16"),
    ("llama q8_0", "llama", "q8_0"),
    ("transformers fp32", "hf", "fp32"),
]


def build_rows(results: dict, batches: list[int], clients: list[int], prefill_len: int) -> list[dict]:
    """One row per figure: {metric, unit, higher_is_better, values{col: v}, ratios}."""
    rows = []
    dec, srv = results.get("decode", {}), results.get("serve", {})

    def get(section: dict, col, path):
        v = section.get(f"{col[1]}:{col[2]}")
        for k in path:
            if not isinstance(v, dict):
                return None
            v = v.get(k)
        return v

    if dec:
        for b in batches:
            rows.append(
                dict(
                    metric=f"decode batch {b}",
                    unit="tok/s",
                    higher=True,
                    values={c[0]: get(dec, c, ["decode", b]) for c in COLS},
                )
            )
        if 1 in batches:
            rows.append(
                dict(
                    metric="decode batch 1, weights read / memory bandwidth",
                    unit="share",
                    higher=True,
                    values={c[0]: get(dec, c, ["roofline", "fraction"]) for c in COLS},
                )
            )
        rows.append(
            dict(
                metric=f"prefill {prefill_len} tok",
                unit="s",
                higher=False,
                values={c[0]: get(dec, c, ["prefill_s"]) for c in COLS},
            )
        )
    if srv:
        for n in clients:
            rows.append(
                dict(
                    metric=f"serve, {n} client{'s' * (n > 1)}",
                    unit="tok/s",
                    higher=True,
                    values={c[0]: get(srv, c, ["rounds", n, "rate"]) for c in COLS},
                )
            )
        for n in clients:
            rows.append(
                dict(
                    metric=f"TTFT p50, {n} client{'s' * (n > 1)}",
                    unit="ms",
                    higher=False,
                    values={
                        c[0]: (lambda v: None if v is None else v * 1e3)(get(srv, c, ["rounds", n, "ttft50"]))
                        for c in COLS
                    },
                )
            )
    for r in rows:
        v = r["values"]
        pick = max if r["higher"] else min
        ours = [
            v[c]
            for c in (
                "ours fp32",
                "ours fp32+compile",
                "ours int8",
                "ours int8+compile",
                "ours int8+compile+f16 KV",
            )
            if v[c] is not None
        ]
        theirs = [v[c] for c in ("llama f32", "llama f16", "llama q8_0") if v[c] is not None]
        ratio = lambda a, b: a / b if a is not None and b else None  # noqa: E731
        r["ratios"] = {
            "fp32/f32": ratio(v["ours fp32"], v["llama f32"]),
            "fp32+compile/f32": ratio(v["ours fp32+compile"], v["llama f32"]),
            "int8/q8_0": ratio(v["ours int8"], v["llama q8_0"]),
            "int8+compile/q8_0": ratio(v["ours int8+compile"], v["llama q8_0"]),
            "int8+compile+f16 KV/q8_0": ratio(v["ours int8+compile+f16 KV"], v["llama q8_0"]),
            "best/best": ratio(pick(ours), pick(theirs)) if ours and theirs else None,
            "fp32/transformers": ratio(v["ours fp32"], v["transformers fp32"]),
        }
    return rows


def fmt_v(v, unit: str) -> str:
    if v is None:
        return "-"
    return (
        f"{v:.3f}"
        if unit == "s"
        else f"{v:.0f}"
        if unit == "ms"
        else f"{v:.0%}"
        if unit == "share"
        else f"{v:.1f}"
    )


def print_table(rows: list[dict]) -> None:
    if not rows:
        return
    print("\n| figure | " + " | ".join(c[0] for c in COLS) + " | " + " | ".join(rows[0]["ratios"]) + " |")
    print("|---" * (len(COLS) + len(rows[0]["ratios"]) + 1) + "|")
    for r in rows:
        vals = " | ".join(fmt_v(r["values"][c[0]], r["unit"]) for c in COLS)
        rats = " | ".join("-" if x is None else f"{x:.2f}x" for x in r["ratios"].values())
        arrow = "higher is better" if r["higher"] else "lower is better"
        print(f"| {r['metric']} ({r['unit']}, {arrow}) | {vals} | {rats} |")
    print(
        "\nratios are ours / llama.cpp of the figure itself: above 1 means ours is faster for tok/s rows, "
        "slower for s and ms rows. best/best: our best option against their best of f32/f16/q8_0. "
        "weights read / memory bandwidth: the batch-1 rate times the bytes of weights a step reads, over the "
        "read bandwidth measured just before and after (the better sample); llama.cpp's bytes are "
        "ours in its "
        "type. "
        "transformers: GPT2LMHeadModel.generate in-process on the same weights (no server)."
    )


# --- main -------------------------------------------------------------------------------------


def int_list(s: str) -> list[int]:
    out = [int(x) for x in s.split(",") if x.strip()]
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {s!r}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--skip-build", action="store_true", help="never build llama.cpp (it must be in the cache)"
    )
    ap.add_argument("--only", choices=("decode", "serve", "all"), default="all")
    ap.add_argument("--clients", type=int_list, default=[1, 8, 32], help="concurrent clients for the servers")
    ap.add_argument("--batches", type=int_list, default=[1, 8, 32], help="batch sizes for in-process decode")
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens generated per request / decode steps")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--prefill-len", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3, help="in-process runs per figure, the best kept")
    ap.add_argument(
        "--server-passes",
        type=int,
        default=2,
        help="passes over all the servers in turn, each figure's best kept",
    )
    ap.add_argument(
        "--cache-dir",
        default=DEFAULT_CACHE,
        help=f"where llama.cpp, its build and the model files live (default {DEFAULT_CACHE})",
    )
    ap.add_argument("--json", help="write every figure and ratio to this JSON file")
    args = ap.parse_args()
    if args.repeats < 1 or args.server_passes < 1:
        ap.error("--repeats and --server-passes must be at least 1")
    cache = os.path.abspath(os.path.expanduser(args.cache_dir))
    os.makedirs(cache, exist_ok=True)
    torch.set_num_threads(THREADS)
    notes: list[str] = []

    cpu = cpu_info()
    log(f"CPU: {cpu['model']}, {cpu['cores']} cores; flags: {' '.join(cpu['flags'])}")
    background_busy("the start")
    bw = memory_bandwidth()
    log(
        f"memory read bandwidth (sum of a 1 GiB float32 tensor, {torch.get_num_threads()} threads, "
        "best of 5): "
        f"{bw:.1f} GB/s"
    )
    log(f"torch {torch.__version__}, threads {torch.get_num_threads()}; llama.cpp -t {THREADS}")

    if args.skip_build:
        if not built(cache):
            raise SystemExit(f"--skip-build, but llama.cpp is not built in {llama_dir(cache)}")
        build_s = 0.0
    else:
        build_s = build_llamacpp(cache)
    src = llama_src(cache)
    log(f"llama.cpp source: {src} ({llama_version(cache)})")

    models = prepare_models(cache, need_gguf=True)
    tokenizer = gpt.get_tokenizer("gpt2")
    prompt = serve.prompt_ids(tokenizer, args.prompt_len)
    long_prompt = serve.prompt_ids(tokenizer, args.prefill_len)
    have_int8, why = int8_available()
    if not have_int8:
        notes.append(f"ours int8 in-process skipped: {why}")
    serve_cmd = [sys.executable, "-m", "server"]
    serve_int8 = "--quantize" in server_help(serve_cmd)
    if not serve_int8:
        notes.append("ours int8 server skipped: gpt-serve has no --quantize option")

    results: dict = {"decode": {}, "serve": {}}
    t_run = time.perf_counter()
    if args.only in ("decode", "all"):
        log(
            f"== in-process: decode {args.new_tokens} steps after a {args.prompt_len}-token prompt at batch "
            f"{args.batches}; prefill {args.prefill_len} tokens; best of {args.repeats}"
        )
        for quant in ("fp32", "fp32c", "int8", "int8c", "int8ch"):
            if quant.startswith("int8") and not have_int8:
                continue
            results["decode"][f"ours:{quant}"] = bench_ours_inprocess(
                models["ours"], quant, args.batches, prompt, long_prompt, args.new_tokens, args.repeats
            )
        f32_bytes = step_bytes(random_gpt2())
        for t in GGUF_TYPES:
            log(f"  llama.cpp {t}:")
            r = bench_llama_inprocess(
                cache,
                models["gguf"][t],
                args.batches,
                args.prompt_len,
                args.prefill_len,
                args.new_tokens,
                args.repeats,
                int(f32_bytes * GGUF_BYTES[t]),
            )
            results["decode"][f"llama:{t}"] = r
            log(
                f"  llama {t:<4} decode "
                + ", ".join(f"batch {b}: {v:.1f}" for b, v in r["decode"].items())
                + f" tok/s; prefill {r.get('prefill_s', float('nan')):.3f} s"
                + (
                    f"; batch 1 reads {r['roofline']['read_gb_s']:.1f} GB/s, {r['roofline']['fraction']:.0%} "
                    "of the bandwidth measured just before and after"
                    if "roofline" in r
                    else ""
                )
            )
        try:
            results["decode"]["hf:fp32"] = bench_hf_inprocess(
                models["hf"], args.batches, prompt, long_prompt, args.new_tokens, args.repeats
            )
        except ImportError as e:
            notes.append(f"transformers in-process skipped: {e}")
        log(f"in-process part done in {fmt_s(time.perf_counter() - t_run)}")

    if args.only in ("serve", "all"):
        t_srv = time.perf_counter()
        parallel = max(args.clients)
        log(
            f"== servers: {args.clients} concurrent streaming clients, {args.prompt_len}-token prompt, "
            f"{args.new_tokens} new tokens each, greedy, ignore_eos, one connection per request"
        )
        # what ours generates greedily, in-process, for the same-weights check
        model, _ = load_ours(models["ours"], "fp32")
        with torch.inference_mode():
            ref = gpt.complete(
                model,
                tokenizer,
                [prompt],
                gpt.SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True),
            )[0].text
        del model
        gc.collect()
        servers = [
            ("ours", "fp32", ()),
            ("ours", "fp32c", ("--compile",)),
            ("ours", "int8", ("--quantize", "int8")),
            ("ours", "int8c", ("--quantize", "int8", "--compile")),
            ("ours", "int8ch", ("--quantize", "int8", "--compile", "--kv-cache-dtype", "float16")),
        ]
        # A shared VM's speed drifts by tens of percent within minutes (its neighbours' memory
        # traffic); passes over all the servers in turn, keeping each figure's best, let a slow
        # spell hit every server alike instead of whichever ran during it.
        for n_pass in range(1, args.server_passes + 1):
            log(
                f"  pass {n_pass} of {args.server_passes}: memory read bandwidth now "
                f"{memory_bandwidth():.1f} GB/s"
            )
            for _kind, quant, extra_args in servers:
                if quant.startswith("int8") and not serve_int8:
                    continue
                port = serve.free_port()
                label = f"gpt-serve {quant}"
                keep_best(
                    results["serve"],
                    f"ours:{quant}",
                    bench_server(
                        "gpt-serve",
                        label,
                        lambda logf, port=port, extra_args=extra_args: serve.start_server(
                            models["ours"], port, parallel, logf, extra_args
                        ),
                        port,
                        "/ready",
                        prompt,
                        args.new_tokens,
                        args.clients,
                        None,
                    ),
                )
            for t in GGUF_TYPES:
                port = serve.free_port()
                label = f"llama-server {t}"
                keep_best(
                    results["serve"],
                    f"llama:{t}",
                    bench_server(
                        "llama-server",
                        label,
                        lambda logf, port=port, t=t: start_llama_server(
                            cache, models["gguf"][t], port, parallel, args.new_tokens, args.prompt_len, logf
                        ),
                        port,
                        "/health",
                        prompt,
                        args.new_tokens,
                        args.clients,
                        {"cache_prompt": False},
                    ),
                )  # both servers prefill every prompt
        for r in results["serve"].values():
            r["greedy16_matches_ours_fp32"] = r["greedy16"] == ref
        results["serve_reference_greedy16"] = ref
        mism = [k for k, r in results["serve"].items() if not r["greedy16_matches_ours_fp32"]]
        log(
            "same-weights check, 16 greedy tokens of each server against ours in-process: "
            + ("all match" if not mism else f"differ for {', '.join(mism)}")
        )
        if mism:
            notes.append(
                "greedy 16-token continuations differ from ours fp32 for "
                + ", ".join(mism)
                + " (random weights give near-ties in the logits; f16/q8_0 rounding can flip them)"
            )
        log(f"server part done in {fmt_s(time.perf_counter() - t_srv)}")

    rows = build_rows(results, args.batches, args.clients, args.prefill_len)
    print(
        f"\nCPU: {cpu['model']} ({cpu['cores']} cores; {' '.join(cpu['flags'])}); memory read bandwidth "
        f"{bw:.1f} GB/s; torch {torch.__version__} with {THREADS} threads; llama.cpp from "
        f"{llama_version(cache)} with -t {THREADS}"
    )
    print(
        f"GPT-2 small (124M), random weights (seed {SEED}); decode: {args.new_tokens} steps after a "
        f"{args.prompt_len}-token prompt (llama.cpp batch 1: llama-bench tg{args.new_tokens} from an empty "
        f"context; batch > 1: llama-batched-bench); serve: {args.new_tokens} tokens per client"
    )
    print_table(rows)
    busy = [b for _, b in BUSY if b >= 0]
    if busy:
        print(
            f"\nother processes' CPU share, sampled for 1 s before each phase while this benchmark idled: "
            f"median {sorted(busy)[len(busy) // 2]:.0%}, max {max(busy):.0%} "
            f"({', '.join(f'{p}: {b:.0%}' for p, b in BUSY)})"
        )
    for n in notes:
        print(f"note: {n}")
    total = time.perf_counter() - T0
    print(
        f"\nbuild {fmt_s(build_s) if build_s else 'cached'}; benchmarks "
        f"{fmt_s(time.perf_counter() - t_run)}; "
        f"total {fmt_s(total)}"
    )
    if args.json:
        doc = dict(
            cpu=cpu,
            memory_read_gb_s=bw,
            torch=torch.__version__,
            threads=THREADS,
            llama_cpp=llama_version(cache),
            build_s=build_s,
            total_s=total,
            args=vars(args),
            notes=notes,
            background_cpu_busy=BUSY,
            rows=rows,
            results=results,
        )
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2, default=str)
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
