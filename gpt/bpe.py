"""A byte-level BPE tokenizer trained on the user's own corpus, kept inside the checkpoint.

GPT-2's 50k vocabulary costs a small model most of its parameters, and raw bytes spend most of
its context and capacity on spelling. A few thousand merges learned from the corpus itself (in
seconds, by Hugging Face `tokenizers`, whose Rust trainer and encoder we use rather than our own)
carry several bytes per token at a fraction of GPT-2's embedding. The trained tokenizer is saved
next to the weights as `tokenizer.json` (the `tokenizers` format, so other tools can read it).

Ids: 0 .. n-1 are the BPE vocabulary (the 256 byte symbols first, then the merges in the order
they were learned); n is end-of-text. End-of-text is ours, not registered with `tokenizers`, so
"<|endoftext|>" typed in a prompt stays plain text unless the caller allows specials.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from .tokenizer import EOT_TEXT, Tokenizer

TOKENIZER_FILE = "tokenizer.json"
MIN_VOCAB = 257  # the 256 byte symbols and end-of-text


@functools.lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of the byte-level alphabet: the printable character each byte is written as."""
    from tokenizers import pre_tokenizers

    # ByteLevel.alphabet() is unordered; the mapping itself is GPT-2's: printable bytes map to
    # themselves and the rest to 256, 257, ... in byte order.
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    assert set(table) == set(pre_tokenizers.ByteLevel.alphabet())
    return table


class BPETokenizer(Tokenizer):
    """Byte-level BPE from a `tokenizers` JSON, plus end-of-text."""

    name = "bpe"

    def __init__(self, json_text: str):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self._hf = HFTokenizer.from_str(json_text)
        except Exception as e:  # malformed JSON or an unknown model kind
            raise ValueError(f"not a tokenizers JSON: {e}") from None
        self._json = json_text
        vocab = self._hf.get_vocab(with_added_tokens=False)
        byte_of = _unicode_to_byte()
        pieces: list[bytes] = [b""] * len(vocab)
        try:
            for token, i in vocab.items():
                pieces[i] = bytes(byte_of[c] for c in token)
        except (KeyError, IndexError):
            raise ValueError(
                "not a byte-level BPE (tokens outside the byte alphabet, or ids with gaps)"
            ) from None
        self._pieces = pieces
        self.vocab_size = len(pieces) + 1
        self.eot_token = len(pieces)

    @property
    def fingerprint(self) -> str:
        return f"bpe-{hashlib.sha256(self._json.encode()).hexdigest()[:16]}"

    def to_json(self) -> str:
        return self._json

    @classmethod
    def from_file(cls, path: str | Path) -> BPETokenizer:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: cannot read the tokenizer ({e})") from None
        try:
            return cls(text)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        if not allow_special:
            return self._hf.encode(text, add_special_tokens=False).ids if text else []
        ids: list[int] = []
        for i, part in enumerate(text.split(EOT_TEXT)):
            if i:
                ids.append(self.eot_token)
            ids.extend(self.encode(part))
        return ids

    def encode_batch(self, texts: Iterable[str], *, allow_special: bool = False) -> list[list[int]]:
        texts = list(texts)
        if allow_special:
            return [self.encode(t, allow_special=True) for t in texts]
        return [e.ids for e in self._hf.encode_batch(texts, add_special_tokens=False)]

    def _decode_bytes(self, ids: list[int]) -> bytes:
        return b"".join(self._token_bytes(i) for i in ids)

    def _token_bytes(self, token_id: int) -> bytes:
        return EOT_TEXT.encode("utf-8") if token_id == self.eot_token else self._pieces[token_id]


def train_bpe(texts: Iterable[str], vocab_size: int, *, progress: bool = False) -> BPETokenizer:
    """Learn a byte-level BPE with `vocab_size` ids (end-of-text included) from `texts`."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    if vocab_size < MIN_VOCAB:
        raise ValueError(
            f"a BPE vocabulary needs at least {MIN_VOCAB} ids (256 bytes + end-of-text), got {vocab_size}"
        )
    hf = HFTokenizer(models.BPE())
    # Newlines are pieces of their own, never merged with the indentation after them: a prompt
    # ending in a newline (the usual way to ask for the next line) then ends on a boundary the
    # model saw in training. It costs a few more tokens on source code than GPT-2's pattern alone.
    # Within a line, GPT-2's pattern: words keep their leading space, and a run of spaces gives
    # all but its last to a token of its own, so indentation levels become single tokens.
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\n+"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=progress,
    )
    hf.train_from_iterator(_nonempty(texts), trainer=trainer)
    return BPETokenizer(hf.to_str())


def _nonempty(texts: Iterable[str]) -> Iterator[str]:
    return (t for t in texts if t)
