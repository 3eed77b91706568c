"""Greedy decoding throughput: our GPT against transformers' GPT2LMHeadModel.generate.

Both models hold the same random GPT-2-small weights (124M, fp32, nothing is downloaded) and run
in one process, alternating ours / transformers for each batch size so that both see the same
machine state (other load, caches). A generation of N new tokens is one prefill forward over the
prompt (which yields the first new token) and N - 1 single-token forwards. Two numbers per model:

  total   batch x N / (time of the whole generation, prefill included)
  decode  batch x (N - 1) / (time(N new tokens) - time(1 new token)): the per-token loop alone,
          measured the same way for both (a 1-token generation is the prefill plus fixed costs)

Times are the best of `--repeats` runs (least disturbed by other processes on a shared machine).

Then the library's own overhead: `gpt.generate(...)` (temperature 0, batch 1, ignore_eos=True so it
runs the full length; sampler, logprob, detokenizer and stop-string bookkeeping included) against
the bare `model.start`/`model.step` argmax loop above, on the same model, prompt, token count and
threads. After `--lib-warmup` untimed runs each, the two alternate `--lib-repeats` times and each
keeps its median. The acceptance: whole generations (total tokens/s) at a library / bare ratio of
at least 0.95, i.e. the library within 5% of the bare loop.

    python benchmarks/decode.py --batch-sizes 1,8,32 --new-tokens 128 --prompt-len 32 --repeats 3
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import transformers

import gpt


def build_ours() -> gpt.GPT:
    torch.manual_seed(0)
    return gpt.GPT(gpt.preset("gpt2")).eval()


def build_hf(ours: gpt.GPT):
    """transformers' GPT-2 holding our weights, written by our exporter and read by theirs."""
    import tempfile

    from transformers import GPT2LMHeadModel

    with tempfile.TemporaryDirectory() as tmp:
        gpt.export_hf_gpt2(ours, f"{tmp}/gpt2")
        return GPT2LMHeadModel.from_pretrained(f"{tmp}/gpt2").eval()


@torch.inference_mode()
def generate_ours(model: gpt.GPT, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """The plainest greedy loop on the incremental interface: prefill, then one token at a time."""
    B, P = prompts.shape
    cache = model.new_cache(B, max_len=P + new_tokens)
    out = torch.empty(B, new_tokens, dtype=torch.long)
    logits = model.start(prompts.tolist(), cache)
    for i in range(new_tokens):
        nxt = logits.argmax(-1)
        out[:, i] = nxt
        if i + 1 < new_tokens:
            logits = model.step(nxt[:, None], cache)
    return out


@torch.inference_mode()
def generate_hf(hf, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    out = hf.generate(
        prompts,
        attention_mask=torch.ones_like(prompts),
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,  # never stop at EOS
        pad_token_id=hf.config.eos_token_id,
        num_beams=1,
    )
    return out[:, prompts.shape[1] :]


def generate_library(model: gpt.GPT, tokenizer, prompt: list[int], new_tokens: int) -> str:
    """The library's public entry point, greedy, for exactly `new_tokens` tokens."""
    return gpt.generate(model, tokenizer, prompt, max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)


def cpu_description() -> str:
    """The CPU's model name and its vector extensions (from /proc/cpuinfo where there is one)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            info = [line.partition(":") for line in f]
        name = next((v.strip() for k, _, v in info if k.strip() == "model name"), name)
        flags = set(next((v.split() for k, _, v in info if k.strip() in ("flags", "Features")), []))
    except OSError:
        pass
    wanted = (
        "avx",
        "avx2",
        "fma",
        "f16c",
        "avx512f",
        "avx512bw",
        "avx512vl",
        "avx512_vnni",
        "avx512_bf16",
        "avx_vnni",
        "amx_tile",
        "amx_bf16",
        "asimd",
        "sve",
    )
    shown = [f for f in wanted if f in flags]
    return (
        f"CPU: {name}; {', '.join(shown) or 'no vector flags listed'}; "
        f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}"
    )


def library_vs_bare(model: gpt.GPT, prompt: torch.Tensor, new_tokens: int, warmup: int, repeats: int) -> None:
    """gpt.generate against the bare start/step loop at batch 1: medians, tokens/s and the ratio."""
    tokenizer = gpt.get_tokenizer(model.config.tokenizer)
    ids = prompt[0].tolist()
    runs = {
        "gpt.generate": lambda n: generate_library(model, tokenizer, ids, n),
        "bare start/step": lambda n: generate_ours(model, prompt, n),
    }
    for _ in range(warmup):
        for run in runs.values():
            run(new_tokens)
            run(1)
    times = {name: ([], []) for name in runs}  # (N tokens, 1 token)
    for _ in range(repeats):  # interleaved, so that both see the same machine state
        for name, run in runs.items():
            times[name][0].append(timed(lambda: run(new_tokens))[0])
            times[name][1].append(timed(lambda: run(1))[0])
    med = {name: (statistics.median(t[0]), statistics.median(t[1])) for name, t in times.items()}
    total = {name: new_tokens / t[0] for name, t in med.items()}
    decode = {name: (new_tokens - 1) / (t[0] - t[1]) for name, t in med.items()}

    text = generate_library(model, tokenizer, ids, new_tokens)
    bare = tokenizer.decode(generate_ours(model, prompt, new_tokens)[0].tolist())
    check = (
        "check: gpt.generate's text is the bare loop's tokens decoded"
        if text == bare
        else "WARNING: gpt.generate's text differs from the bare loop's tokens decoded"
    )
    print(
        f"\nlibrary vs bare loop: batch 1, greedy, prompt {prompt.shape[1]} tokens, {new_tokens} new tokens, "
        f"{torch.get_num_threads()} threads; median of {repeats} (after {warmup} warm-up runs)\n{check}"
    )
    print(f"{'':>16}  {'total tokens/s':>14} {'decode tokens/s':>15} {'ms/token':>9}")
    for name in runs:
        print(f"{name:>16}  {total[name]:>14.1f} {decode[name]:>15.1f} {1000 / decode[name]:>9.2f}")
    ratio_total = total["gpt.generate"] / total["bare start/step"]
    ratio_decode = decode["gpt.generate"] / decode["bare start/step"]
    print(f"{'library / bare':>16}  {ratio_total:>13.3f}x {ratio_decode:>14.3f}x")
    verdict = "within" if ratio_total >= 0.95 else "NOT within"
    print(
        f"acceptance: gpt.generate is {verdict} 5% of the bare loop (total tokens/s ratio {ratio_total:.3f})"
    )


def timed(fn) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


@torch.inference_mode()
def max_logit_diff(ours: gpt.GPT, hf, prompts: torch.Tensor) -> float:
    return (ours(prompts) - hf(prompts).logits).abs().max().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument(
        "--repeats", type=int, default=3, help="timed runs per model and batch size; best is kept"
    )
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument(
        "--compile", action="store_true", help="torch.compile our model (optional, off by default)"
    )
    ap.add_argument(
        "--no-pack",
        action="store_true",
        help="leave our linear weights in the plain layout (default: gpt.pack_linear_weights)",
    )
    ap.add_argument(
        "--lib-warmup", type=int, default=2, help="untimed runs before the library-vs-bare timing"
    )
    ap.add_argument(
        "--lib-repeats",
        type=int,
        default=7,
        help="timed runs of gpt.generate and of the bare loop at batch 1; the median is kept",
    )
    args = ap.parse_args()
    if args.new_tokens < 2:
        ap.error("--new-tokens must be at least 2")
    if args.lib_repeats < 1 or args.lib_warmup < 0:
        ap.error("--lib-repeats must be at least 1 and --lib-warmup at least 0")

    if args.threads:
        torch.set_num_threads(args.threads)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    ours = build_ours()
    hf = build_hf(ours)
    if not args.no_pack:
        gpt.pack_linear_weights(ours)
    if args.compile:
        ours.compile(dynamic=True)  # in place, so that start/step, which call the module, use it
    N = args.new_tokens
    print(cpu_description())
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.get_num_threads()} threads; "
        f"GPT-2 small (124M) random weights, fp32; prompt {args.prompt_len} tokens, {N} new tokens, greedy; "
        f"best of {args.repeats}; ours {'plain' if args.no_pack else 'packed'} weights"
    )

    g = torch.Generator().manual_seed(1)
    rows = []
    for B in batch_sizes:
        prompts = torch.randint(0, ours.config.vocab_size, (B, args.prompt_len), generator=g)
        runs = {
            "ours": lambda n: generate_ours(ours, prompts, n),
            "HF": lambda n: generate_hf(hf, prompts, n),
        }
        for run in runs.values():  # warm-up: allocator, oneDNN/MKL kernels, lazy imports
            run(4)
        best = {name: [float("inf"), float("inf")] for name in runs}  # [N tokens, 1 token]
        out = {}
        for _ in range(args.repeats):  # interleaved: ours, HF, ours, HF, ...
            for name, run in runs.items():
                t, out[name] = timed(lambda: run(N))
                best[name][0] = min(best[name][0], t)
                best[name][1] = min(best[name][1], timed(lambda: run(1))[0])
        if B == 1:
            diff = max_logit_diff(ours, hf, prompts)
            if torch.equal(out["ours"], out["HF"]):
                print(
                    f"check: batch-1 greedy tokens are identical to transformers' "
                    f"(prompt logits differ by at most {diff:.1e})"
                )
            else:
                first = int((out["ours"] != out["HF"]).nonzero()[0, 1])
                print(
                    f"WARNING: batch-1 greedy tokens differ from transformers' from new token {first} on "
                    f"(prompt logits differ by at most {diff:.1e})"
                )
        total = {k: B * N / t[0] for k, t in best.items()}
        decode = {k: B * (N - 1) / (t[0] - t[1]) for k, t in best.items()}
        rows.append((B, total, decode))

    print(f"\n{'':>5}  {'total tokens/s (prefill incl.)':^30}   {'decode tokens/s':^30}")
    print(f"{'batch':>5}  {'ours':>9} {'HF':>9} {'ratio':>9}    {'ours':>9} {'HF':>9} {'ratio':>9}")
    for B, total, decode in rows:
        print(
            f"{B:>5}  {total['ours']:>9.1f} {total['HF']:>9.1f} {total['ours'] / total['HF']:>8.2f}x    "
            f"{decode['ours']:>9.1f} {decode['HF']:>9.1f} {decode['ours'] / decode['HF']:>8.2f}x"
        )

    hf = None  # not needed any more: its memory back before the next measurement
    prompt = torch.randint(
        0, ours.config.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(2)
    )
    library_vs_bare(ours, prompt, N, args.lib_warmup, args.lib_repeats)


if __name__ == "__main__":
    main()
