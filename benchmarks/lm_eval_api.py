"""lm-evaluation-harness through gpt-serve: its `local-completions` backend (HTTP: `echo` with
`logprobs`) against its in-process `hf` backend (transformers) on the same model directory. The two
must agree: the same accuracy on a multiple-choice task and the same bits per byte on a
perplexity task.

Not part of the test suite, and it installs nothing: it needs `pip install 'lm-eval[api]'`
(lm-eval's `hf` backend also uses transformers, already a dev dependency here). Nothing is
downloaded and no network is used at run time (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE):

1. a GPT-2-shaped model with random weights (seed 0; by default 2 layers x 128, a 256-token
   context, GPT-2's 50,257-token vocabulary, so not padded: the `hf` backend normalises over every
   output id, the server over the tokenizer's) is written as a Hugging Face GPT-2 directory, with
   vocab.json / merges.txt derived from our bundled GPT-2 ranks file (benchmarks/llamacpp.py) and
   checked against our tokenizer;
2. two local tasks are written as YAML plus JSONL data: `gptserve_mc`, multiple choice (arithmetic
   questions, 4 choices; metrics acc, acc_norm) and `gptserve_ppl`, loglikelihood_rolling over
   docstrings of standard-library modules, several longer than the context so they are scored in
   rolling windows (word_perplexity, byte_perplexity, bits_per_byte);
3. `hf` runs in this process (`pretrained=DIR,dtype=float32,device=cpu`);
4. `gpt-serve --model DIR` starts on a free port and `local-completions` runs against it
   (`tokenizer_backend=huggingface,tokenizer=DIR`: lm-eval counts the context's tokens itself, so
   loglikelihood tasks need a tokenizer on its side; requests then go as token ids);
5. the figures are printed side by side; the script exits 1 if they differ (accuracy exactly, the
   perplexity metrics beyond 1e-5 relative).

Windows: lm-eval's API backends keep one token for generation and one for the rolling context,
so `max_length=N` scores windows of N - 2 tokens where `hf` with `max_length=N` scores N; the
script passes the server's context to the API backend and two less to `hf`, so both score the same
windows.

    .venv/bin/python benchmarks/lm_eval_api.py
    .venv/bin/python benchmarks/lm_eval_api.py --layers 4 --n-embd 256 --context 512 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serve  # noqa: E402  (benchmarks/serve.py: start, wait for and stop a gpt-serve process)
from llamacpp import check_tokenizer, write_gpt2_tokenizer  # noqa: E402

import gpt  # noqa: E402

MC_TASK, PPL_TASK = "gptserve_mc", "gptserve_ppl"
PPL_METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")
MC_METRICS = ("acc", "acc_norm")
DOC_MODULES = (
    "json",
    "re",
    "string",
    "textwrap",
    "argparse",
    "pathlib",
    "collections",
    "itertools",
    "functools",
    "random",
    "datetime",
    "subprocess",
)


def log(msg: str) -> None:
    print(f"[lm_eval_api] {msg}", flush=True)


def build_model_dir(path: str, layers: int, n_embd: int, context: int) -> None:
    torch.manual_seed(0)
    n_head = max(1, n_embd // 64)
    model = gpt.GPT(
        gpt.preset("gpt2", n_layer=layers, n_head=n_head, n_embd=n_embd, block_size=context)
    ).eval()
    gpt.export_hf_gpt2(model, path)
    write_gpt2_tokenizer(path)
    checked = check_tokenizer(path)
    log(
        f"GPT-2-shaped random weights ({layers} layers x {n_embd}, context {context}, "
        f"{model.num_params() / 1e6:.1f}M parameters) in {path}; vocab.json/merges.txt agree with our "
        "tokenizer "
        f"({', '.join(checked)})"
    )


def write_tasks(path: str, questions: int) -> dict:
    """The two tasks' YAML and JSONL files; returns counts for the report."""
    rng = random.Random(0)
    mc = []
    for _ in range(questions):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        right = a + b
        wrong = rng.sample([x for x in range(2, 41) if x != right], 3)
        choices = [str(x) for x in [right, *wrong]]
        rng.shuffle(choices)
        mc.append(
            {
                "question": f"Question: What is {a} plus {b}?\nAnswer:",
                "choices": [" " + c for c in choices],
                "answer": choices.index(str(right)),
            }
        )
    docs = []
    for name in DOC_MODULES:
        doc = (__import__(name).__doc__ or "").strip()
        if doc:
            docs.append({"text": doc[:3000]})
    data = {MC_TASK: mc, PPL_TASK: docs}
    for task, rows in data.items():
        with open(os.path.join(path, f"{task}.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)

    def files(task: str) -> str:
        return (
            "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: "
            f"{os.path.join(path, task + '.jsonl')}\n"
            f"test_split: test\n"
        )

    with open(os.path.join(path, f"{MC_TASK}.yaml"), "w") as f:
        f.write(
            f"task: {MC_TASK}\n{files(MC_TASK)}output_type: multiple_choice\n"
            'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: answer\n'
            "metric_list:\n"
            "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
            "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
            "metadata:\n  version: 1.0\n"
        )
    with open(os.path.join(path, f"{PPL_TASK}.yaml"), "w") as f:
        f.write(
            f"task: {PPL_TASK}\n{files(PPL_TASK)}output_type: loglikelihood_rolling\n"
            'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
            "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: "
            "bits_per_byte\n"
            "metadata:\n  version: 1.0\n"
        )
    return {"questions": len(mc), "documents": len(docs), "document_chars": sum(len(d["text"]) for d in docs)}


def evaluate(model: str, model_args: str, tasks_dir: str, batch_size: int) -> tuple[dict, float]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=[MC_TASK, PPL_TASK],
        task_manager=TaskManager(include_path=tasks_dir),
        batch_size=batch_size,
        log_samples=False,
    )
    seconds = time.perf_counter() - t0
    r = out["results"]
    figures = {m: r[MC_TASK][f"{m},none"] for m in MC_METRICS}
    figures.update({m: r[PPL_TASK][f"{m},none"] for m in PPL_METRICS})
    return figures, seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", help="where the model and tasks go (default: a temporary directory)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--questions", type=int, default=40)
    ap.add_argument(
        "--batch-size", type=int, default=8, help="lm-eval's batch size (prompts per API request)"
    )
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models import api_models  # noqa: F401  (the [api] extra: aiohttp, tenacity, ...)
    except ImportError as e:
        print(
            f"lm-evaluation-harness is not importable ({e}); pip install 'lm-eval[api]' first",
            file=sys.stderr,
        )
        return 2
    import logging

    logging.getLogger("lm-eval").setLevel(logging.WARNING)
    logging.getLogger("lm_eval").setLevel(logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or tmp
        model_dir, tasks_dir = os.path.join(work, "hf-gpt2-random"), os.path.join(work, "tasks")
        os.makedirs(tasks_dir, exist_ok=True)
        build_model_dir(model_dir, args.layers, args.n_embd, args.context)
        counts = write_tasks(tasks_dir, args.questions)
        log(
            f"tasks: {MC_TASK} ({counts['questions']} questions x 4 choices), {PPL_TASK} "
            f"({counts['documents']} "
            f"docstrings, {counts['document_chars']} characters)"
        )

        hf_args = f"pretrained={model_dir},dtype=float32,device=cpu,max_length={args.context - 2}"
        log(f"hf: --model_args {hf_args}")
        hf, hf_s = evaluate("hf", hf_args, tasks_dir, args.batch_size)

        port = serve.free_port()
        url = f"http://127.0.0.1:{port}"
        start = lambda logf: serve.start_server(model_dir, port, args.batch_size, logf)  # noqa: E731
        with serve.served("gpt-serve", start, url):
            import httpx

            name = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
            api_args = (
                f"model={name},base_url={url}/v1/completions,tokenizer_backend=huggingface,"
                f"tokenizer={model_dir},max_length={args.context}"
            )
            log(f"local-completions: --model_args {api_args} --batch_size {args.batch_size}")
            api, api_s = evaluate("local-completions", api_args, tasks_dir, args.batch_size)

    print()
    print(f"{'metric':<18} {'hf (in-process)':>20} {'local-completions':>20} {'|difference|':>14}")
    bad = []
    for m in (*MC_METRICS, *PPL_METRICS):
        diff = abs(hf[m] - api[m])
        print(f"{m:<18} {hf[m]:>20.10g} {api[m]:>20.10g} {diff:>14.3g}")
        if (m in MC_METRICS and diff != 0) or (m in PPL_METRICS and diff > 1e-5 * abs(hf[m])):
            bad.append(m)
    print(f"{'wall seconds':<18} {hf_s:>20.1f} {api_s:>20.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "hf": hf,
                    "local_completions": api,
                    "seconds": {"hf": hf_s, "local_completions": api_s},
                    "config": vars(args),
                    **counts,
                },
                f,
                indent=2,
            )
    if bad:
        print(f"DIFFERENT: {', '.join(bad)}")
        return 1
    print("the same figures through gpt-serve as in-process")
    return 0


if __name__ == "__main__":
    sys.exit(main())
