"""Source/target pairs for the encoder-decoder: read from JSONL or TSV files, or generated (the
date task), and batched with padding for teacher forcing."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import torch

from gpt.evaluate import IGNORE  # noqa: F401 (both used by the trainer too)
from gpt.evaluate import collate_pairs as collate
from gpt.tokenizer import Tokenizer

from .config import ConfigError
from .data import find_files

Pair = tuple[list[int], list[int]]


def read_pairs(path: Path) -> list[tuple[str, str]]:
    """(source, target) strings from JSONL ({"source": ..., "target": ...} per line) or TSV
    (source<TAB>target per line); the format is decided by the first non-blank line."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out = []
    is_json = None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if is_json is None:
            is_json = line.lstrip().startswith("{")
        if is_json:
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise ConfigError(f"{path}:{n}: invalid JSON ({e})") from None
            if not (
                isinstance(obj, dict)
                and isinstance(obj.get("source"), str)
                and isinstance(obj.get("target"), str)
            ):
                raise ConfigError(f"{path}:{n}: expected an object with string fields 'source' and 'target'")
            out.append((obj["source"], obj["target"]))
        else:
            parts = line.split("\t")
            if len(parts) != 2:
                raise ConfigError(
                    f"{path}:{n}: expected two tab-separated columns (source, target), found {len(parts)}"
                )
            out.append((parts[0], parts[1]))
    return out


def encode_pairs(
    pairs: list[tuple[str, str]], tokenizer: Tokenizer, block_size: int, where: str
) -> list[Pair]:
    out = []
    for i, (src, tgt) in enumerate(pairs):
        s, t = tokenizer.encode(src), tokenizer.encode(tgt)
        if not s:
            raise ConfigError(f"{where}: pair {i + 1} has an empty source")
        # the decoder sees the start token plus the target, and predicts the target plus end-of-text
        if len(s) > block_size or len(t) + 1 > block_size:
            raise ConfigError(
                f"{where}: pair {i + 1} is longer than the block size {block_size} "
                f"({len(s)} source / {len(t)} target tokens); raise --block-size"
            )
        out.append((s, t))
    return out


def read_pair_files(specs: list[str], option: str = "--data", least: int = 1) -> list[tuple[str, str]]:
    texts: list[tuple[str, str]] = []
    for f in find_files(specs, option):
        texts.extend(read_pairs(f))
    if len(texts) < least:
        raise ConfigError(
            f"{option} {' '.join(specs)}: need at least {least} source/target pairs, found {len(texts)}"
        )
    return texts


def load_pair_files(
    specs: list[str],
    tokenizer: Tokenizer,
    block_size: int,
    val_fraction: float,
    val_specs: list[str] | None = None,
) -> tuple[list[Pair], list[Pair], list[tuple[str, str]]]:
    """Training pairs, validation pairs (the last val_fraction, or with `val_specs` those
    files' pairs), and the validation texts."""
    if val_specs:
        texts = read_pair_files(specs)
        val_texts = read_pair_files(val_specs, "--val-data")
        return (
            encode_pairs(texts, tokenizer, block_size, "--data"),
            encode_pairs(val_texts, tokenizer, block_size, "--val-data"),
            val_texts,
        )
    texts = read_pair_files(specs, least=2)
    n_val = max(1, int(len(texts) * val_fraction))
    ids = encode_pairs(texts, tokenizer, block_size, "--data")
    return ids[:-n_val], ids[-n_val:], texts[-n_val:]


class PairSampler:
    """Random batches from a fixed list of pairs, with a saveable generator."""

    def __init__(self, pairs: list[Pair], batch_size: int, seed: int, bos: int, eos: int):
        self.pairs, self.batch_size, self.bos, self.eos = pairs, batch_size, bos, eos
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self):
        ix = torch.randint(len(self.pairs), (self.batch_size,), generator=self.generator).tolist()
        return collate([self.pairs[i] for i in ix], self.bos, self.eos)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class GeneratedPairSampler:
    """Fresh pairs from a generator function on every batch, never any of the held-out sources."""

    def __init__(
        self,
        make: Callable[[random.Random], tuple[str, str]],
        tokenizer: Tokenizer,
        block_size: int,
        batch_size: int,
        seed: int,
        exclude: set[str],
        bos: int,
        eos: int,
    ):
        self.make, self.tokenizer, self.block_size = make, tokenizer, block_size
        self.batch_size, self.exclude, self.bos, self.eos = batch_size, exclude, bos, eos
        self.rng = random.Random(seed)

    def _one(self) -> tuple[str, str]:
        while True:
            src, tgt = self.make(self.rng)
            if src not in self.exclude:
                return src, tgt

    def next_batch(self):
        texts = [self._one() for _ in range(self.batch_size)]
        return collate(
            encode_pairs(texts, self.tokenizer, self.block_size, "generated pairs"), self.bos, self.eos
        )

    def state_dict(self) -> dict:
        version, internal, gauss = self.rng.getstate()
        return {"python_random": [version, list(internal), gauss]}

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = state["python_random"]
        self.rng.setstate((version, tuple(internal), gauss))


def held_out(make: Callable[[random.Random], tuple[str, str]], n: int, seed: int) -> list[tuple[str, str]]:
    """n distinct generated pairs for validation, from a stream separate from training's."""
    rng = random.Random(f"held-out-{seed}")
    seen, out = set(), []
    for _ in range(100 * n):
        src, tgt = make(rng)
        if src not in seen:
            seen.add(src)
            out.append((src, tgt))
            if len(out) == n:
                break
    return out


def exact_match(
    model,
    tokenizer: Tokenizer,
    pairs: list[tuple[str, str]],
    num_beams: int = 1,
    batch_size: int = 64,
    stopping=lambda: False,
) -> float | None:
    """Fraction of sources whose decoded output equals the target exactly (greedy, or beam
    search); None if `stopping()` turned true before every batch was decoded."""
    import gpt

    if not pairs:
        return 0.0
    max_new = max(len(tokenizer.encode(t)) for _, t in pairs) + 1
    params = gpt.SamplingParams(max_new_tokens=max_new, temperature=0.0, num_beams=num_beams)
    hits = 0
    for i in range(0, len(pairs), batch_size):
        if stopping():
            return None
        chunk = pairs[i : i + batch_size]
        outs = gpt.complete(model, tokenizer, [s for s, _ in chunk], params)
        hits += sum(o.text == t for o, (_, t) in zip(outs, chunk))
    return hits / len(pairs)
