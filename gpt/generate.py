"""Text generation for both model kinds: a batch of prompts decoded together with a KV cache.

`generate` is the friendly entry point; `complete` returns whole completions; `generate_batch`
yields pieces as they become safe to show, and is what streaming is built on. The rules that
turn a token into output live in `gpt/decoding.py`, shared with beam search and the server.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from .beam import beam_search
from .compile import is_compiled
from .decoding import Piece, SequenceDecoder, decode_tokens
from .limits import ContextLimits
from .sampling import SamplingParams
from .speculative import SpeculativeConfig, decode_step, speculator_for
from .tokenizer import Tokenizer

Prompt = str | Sequence[int]
Completion = Piece  # a whole sequence's output is its pieces merged


def encode_prompt(tokenizer: Tokenizer, prompt: Prompt) -> list[int]:
    """Token ids of a prompt given as text or ids (checked later, by ContextLimits)."""
    return tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)


@torch.inference_mode()
def generate_batch(
    model,
    tokenizer: Tokenizer,
    prompts: Sequence[Sequence[int]],
    params: Sequence[SamplingParams],
    speculative: SpeculativeConfig | str | None = "auto",
) -> Iterator[tuple[int, Piece]]:
    """Decode every prompt (token ids) together in one batch; yield (row, piece) as text becomes
    safe to show. Each row stops at end-of-text, a stop string, or its token budget (shrunk to
    what fits in the context). Finished rows leave the batch. `speculative`: a mode of
    gpt.speculative ("auto", "ngram", "off") or its config; it never changes the output."""
    if not prompts:
        return
    limits = ContextLimits.of(model, tokenizer)
    decoders = []
    for ids, p in zip(prompts, params, strict=True):
        ids, budget = limits.check(ids, p, clamp=True)
        decoders.append(SequenceDecoder(tokenizer, ids, p, budget))
    B = len(decoders)
    if B == 1 and is_compiled(model):
        cache = model.new_cache(
            1
        )  # full length: the compiled step's graph is specialised to the cache's shape
    elif limits.is_seq2seq:
        cache = model.new_cache(
            B, max_len=max(d.budget for d in decoders) + 1, src_len=max(len(d.prompt_ids) for d in decoders)
        )
    else:
        cache = model.new_cache(B, max_len=max(len(d.prompt_ids) + d.budget for d in decoders))
    active = [i for i, d in enumerate(decoders) if d.budget > 0]
    for i, d in enumerate(decoders):
        if d.budget == 0:  # max_new_tokens 0: nothing to generate
            yield i, d.end("length")
    if not active:
        return
    spec = speculator_for(model, speculative, B, cache.max_len, tokenizer.vocab_size)
    drafters = [spec.drafter(d) if spec else None for d in decoders]
    logits = model.start([d.prompt_ids for d in decoders], cache)[active]
    pieces = decode_tokens(logits, [decoders[i] for i in active])
    while True:
        yield from zip(active, pieces)
        active = [i for i in active if not decoders[i].finished]
        if not active:
            return
        decs = [decoders[i] for i in active]
        pieces, _ = decode_step(model, cache, torch.tensor(active), decs, [drafters[i] for i in active], spec)


def complete(
    model,
    tokenizer: Tokenizer,
    prompts: Sequence[Prompt],
    params: SamplingParams | Sequence[SamplingParams],
    speculative: SpeculativeConfig | str | None = "auto",
) -> list[Piece]:
    """Generate for several prompts at once (greedy, sampled or beam search); one whole
    completion per prompt. `speculative`: as in `generate_batch`."""
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    plist = [params] * len(ids) if isinstance(params, SamplingParams) else list(params)
    if len(plist) != len(ids):
        raise ValueError(f"got {len(ids)} prompts but {len(plist)} sampling params")
    out: list[Piece | None] = [None] * len(ids)
    plain = [i for i, p in enumerate(plist) if p.num_beams == 1]
    if plain:
        for row, piece in generate_batch(
            model, tokenizer, [ids[i] for i in plain], [plist[i] for i in plain], speculative
        ):
            i = plain[row]
            out[i] = piece if out[i] is None else out[i].merge(piece)
    for i, p in enumerate(plist):
        if p.num_beams > 1:
            out[i] = beam_search(model, tokenizer, ids[i], p)[0]
    return out  # type: ignore[return-value]


def generate(
    model,
    tokenizer: Tokenizer,
    prompt: Prompt | Sequence[str],
    *,
    stream: bool = False,
    speculative: SpeculativeConfig | str | None = "auto",
    **sampling,
) -> str | list[str] | Iterator[str]:
    """Generate text.

    prompt: a string (or a list of token ids); for an encoder-decoder, the source text. A list of
    strings is decoded together as one batch and gives a list of strings.
    stream: return an iterator of text pieces instead (a single prompt only; beam search yields
    its best sequence as one piece).
    sampling: any SamplingParams field: max_new_tokens=64, temperature=1.0 (0 = greedy), top_k,
    top_p, min_p, repetition_penalty, presence_penalty, frequency_penalty, logit_bias, seed,
    stop (a string or list), ignore_eos, num_beams, length_penalty, prediction (text the output
    is expected to repeat: drafts for speculative decoding).
    speculative: "auto" (default), "ngram" or "off", or a gpt.speculative.SpeculativeConfig:
    speculative decoding, which makes no difference to the output, only to its speed.
    """
    params = SamplingParams(**sampling)
    many = isinstance(prompt, (list, tuple)) and len(prompt) > 0 and isinstance(prompt[0], str)
    if stream:
        if many:
            raise ValueError("stream=True takes a single prompt")
        return _stream(model, tokenizer, prompt, params, speculative)
    if many:
        return [c.text for c in complete(model, tokenizer, prompt, params, speculative)]
    return complete(model, tokenizer, [prompt], params, speculative)[0].text


def _stream(
    model, tokenizer: Tokenizer, prompt: Prompt, params: SamplingParams, speculative
) -> Iterator[str]:
    ids = encode_prompt(tokenizer, prompt)
    ContextLimits.of(model, tokenizer).check(ids, params, clamp=True)  # errors now, not at first next()
    if params.num_beams > 1:
        return iter([beam_search(model, tokenizer, ids, params)[0].text])
    return (
        piece.text
        for _, piece in generate_batch(model, tokenizer, [ids], [params], speculative)
        if piece.text
    )
