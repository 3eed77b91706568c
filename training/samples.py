"""Samples during training: at each evaluation the model continues a few prompts, so a run shows
what it writes, not only a loss. They go to the log, metrics.jsonl and TensorBoard."""

from __future__ import annotations

import gpt

SAMPLE_SEED = 1234  # the same draws at every evaluation: differences come from the weights


def default_prompts(kind: str, accuracy_pairs: list) -> list[str]:
    """A GPT starts a new line; an encoder-decoder translates its first held-out source."""
    if kind == "gpt":
        return ["\n"]
    return [accuracy_pairs[0][0]] if accuracy_pairs else []


def sample(
    model, tokenizer: gpt.Tokenizer, prompts: list[str], max_new_tokens: int, kind: str, stop=None
) -> list[dict]:
    """One continuation per prompt, in eval mode (the caller restores train mode). A GPT samples
    (temperature 0.8, top-p 0.95, a fixed seed); an encoder-decoder decodes greedily, as its
    exact-match accuracy does. A GPT's prompt is cut to its last tokens if it leaves no room for
    max_new_tokens (an encoder-decoder's, to its source context). `stop`: strings that end a
    sample (a chat run's: the chat template's, as gpt-serve stops a reply)."""
    if kind == "gpt":
        params = gpt.SamplingParams(
            max_new_tokens=max_new_tokens, temperature=0.8, top_p=0.95, seed=SAMPLE_SEED, stop=stop or []
        )
    else:
        params = gpt.SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    limits = gpt.ContextLimits.of(model, tokenizer)
    out = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt)
        keep = limits.max_source_len if limits.is_seq2seq else max(1, limits.max_len - max_new_tokens)
        ids = ids[-keep:] if ids else [tokenizer.eot_token]
        piece = gpt.complete(model, tokenizer, [ids], params)[0]
        out.append({"prompt": prompt, "text": piece.text})
    return out


def describe(samples: list[dict]) -> str:
    """The samples as log lines: the prompt and its continuation, newlines shown as ⏎."""

    def show(s: str) -> str:
        return s.replace("\n", "⏎")

    return "\n".join(f"  sample: {show(s['prompt'])} → {show(s['text'])}" for s in samples)
