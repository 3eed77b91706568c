"""Tokenizers: GPT-2 BPE (via tiktoken, fully offline), a raw-byte fallback, and a BPE trained
on the user's corpus and stored in the checkpoint (gpt/bpe.py).

Every tokenizer maps text <-> a list of integer ids in [0, vocab_size) and can
return the raw bytes of any single id, which is what streaming detokenization
(gpt/streaming.py) needs to cope with tokens that split UTF-8 characters.
"""

from __future__ import annotations

import base64
import functools
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path

import tiktoken

EOT_TEXT = "<|endoftext|>"

GPT2_ASSET = Path(__file__).parent / "assets" / "gpt2.tiktoken"
# Same pattern tiktoken uses for gpt2/r50k, spelled out the way GPT-2's encoder.py had it.
GPT2_PAT_STR = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_EOT_ID = 50256


def load_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """Parse a tiktoken ranks file: one `base64(token_bytes) rank` pair per line."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                token_b64, rank = line.split()
                ranks[base64.b64decode(token_b64, validate=True)] = int(rank)
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: malformed ranks line {line[:60]!r}") from e
    return ranks


@functools.cache
def gpt2_encoding() -> tiktoken.Encoding:
    """GPT-2's encoding built from the bundled ranks file (tiktoken.get_encoding would download)."""
    ranks = load_tiktoken_ranks(GPT2_ASSET)
    # A truncated or edited asset would silently shift ids; fail loudly instead.
    if len(ranks) != GPT2_EOT_ID or max(ranks.values()) != GPT2_EOT_ID - 1:
        raise ValueError(f"{GPT2_ASSET} does not look like the GPT-2 ranks file ({len(ranks)} entries)")
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PAT_STR,
        mergeable_ranks=ranks,
        special_tokens={EOT_TEXT: GPT2_EOT_ID},
        explicit_n_vocab=GPT2_EOT_ID + 1,
    )


class Tokenizer(ABC):
    """Common interface: text <-> ids, plus per-token bytes for streaming."""

    name: str
    vocab_size: int  # number of ids, specials included
    eot_token: int  # end-of-text id

    @abstractmethod
    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Encode text. Special-token text (e.g. "<|endoftext|>") is only mapped
        to its special id when allow_special=True; by default it is plain text,
        so user prompts cannot inject control tokens."""

    @abstractmethod
    def _decode_bytes(self, ids: list[int]) -> bytes:
        """decode_bytes for ids already checked to be in range."""

    @abstractmethod
    def _token_bytes(self, token_id: int) -> bytes:
        """token_bytes for an id already checked to be in range."""

    @property
    def fingerprint(self) -> str:
        """Identifies the exact mapping (token caches are keyed by it); a name, for fixed ones."""
        return self.name

    def to_json(self) -> str | None:
        """A tokenizer that lives in its checkpoint returns what to store there; named ones None."""
        return None

    def encode_batch(self, texts: Iterable[str], *, allow_special: bool = False) -> list[list[int]]:
        return [self.encode(t, allow_special=allow_special) for t in texts]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self._decode_bytes(self._check_ids(ids))

    def decode(self, ids: Iterable[int]) -> str:
        """Decode to text; bytes that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of one token; special tokens give their text as UTF-8."""
        return self._token_bytes(self._check_ids([token_id])[0])

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        # Accept anything int-like (numpy ints, 0-d tensors) but reject bad ids
        # with a readable error instead of a KeyError/panic from the backend.
        out = [int(i) for i in ids]
        for i in out:
            if not 0 <= i < self.vocab_size:
                raise ValueError(
                    f"token id {i} is out of range for tokenizer {self.name!r} (vocab_size={self.vocab_size})"
                )
        return out

    def __repr__(self) -> str:
        fields = f"name={self.name!r}, vocab_size={self.vocab_size}, eot_token={self.eot_token}"
        return f"{type(self).__name__}({fields})"


class TiktokenTokenizer(Tokenizer):
    """A tiktoken encoding; "gpt2" comes from the bundled asset, others via tiktoken."""

    def __init__(self, name: str = "gpt2", encoding: tiktoken.Encoding | None = None):
        if encoding is None:
            encoding = self._load(name)
        self.enc = encoding
        self.name = encoding.name
        self.vocab_size = encoding.n_vocab
        self.eot_token = encoding.eot_token

    @staticmethod
    def _load(name: str) -> tiktoken.Encoding:
        if name == "gpt2":
            return gpt2_encoding()
        try:
            return tiktoken.get_encoding(name)
        except Exception as e:  # unknown name, no network, corrupt cache, ...
            raise ValueError(f"cannot load tiktoken encoding {name!r}: {e}") from e

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        if allow_special:
            return self.enc.encode(text, allowed_special="all")
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: Iterable[str], *, allow_special: bool = False) -> list[list[int]]:
        texts = list(texts)
        if allow_special:
            return self.enc.encode_batch(texts, allowed_special="all")
        return self.enc.encode_ordinary_batch(texts)

    def _decode_bytes(self, ids: list[int]) -> bytes:
        try:
            return self.enc.decode_bytes(ids)
        except Exception as e:  # ids inside n_vocab that the encoding leaves unassigned
            raise ValueError(f"cannot decode ids with tokenizer {self.name!r}: {e}") from e

    def _token_bytes(self, token_id: int) -> bytes:
        try:
            return self.enc.decode_single_token_bytes(token_id)
        except Exception as e:
            raise ValueError(f"token id {token_id} is not assigned in tokenizer {self.name!r}") from e


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, with 256 as end-of-text. Handy for tiny tests."""

    name = "byte"
    vocab_size = 257
    eot_token = 256

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        if not allow_special:
            return list(text.encode("utf-8"))
        ids: list[int] = []
        for i, part in enumerate(text.split(EOT_TEXT)):
            if i:
                ids.append(self.eot_token)
            ids.extend(part.encode("utf-8"))
        return ids

    def _decode_bytes(self, ids: list[int]) -> bytes:
        return b"".join(self._token_bytes(i) for i in ids)

    def _token_bytes(self, token_id: int) -> bytes:
        return EOT_TEXT.encode("utf-8") if token_id == self.eot_token else bytes([token_id])


LOCAL_TOKENIZERS = ("gpt2", "byte", "bpe")


def get_tokenizer(name: str = "gpt2") -> Tokenizer:
    """Tokenizer by name: "gpt2" (bundled, offline), "byte", or any tiktoken encoding name.
    A trained "bpe" is not found by name: it is read from its checkpoint (gpt.load)."""
    if name == "bpe":
        raise ValueError(
            "the 'bpe' tokenizer is trained per model and read from its checkpoint "
            "directory; load the checkpoint (gpt.load) rather than the tokenizer by name"
        )
    if name == "byte":
        return ByteTokenizer()
    if name == "gpt2":
        return TiktokenTokenizer("gpt2")
    known = list(LOCAL_TOKENIZERS) + [n for n in tiktoken.list_encoding_names() if n not in LOCAL_TOKENIZERS]
    if name not in known:
        raise ValueError(f"unknown tokenizer {name!r}; known: {', '.join(known)}")
    return TiktokenTokenizer(name)
