"""One config for both model kinds, plus named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

POSITION_ENCODINGS = ("learned", "sinusoidal", "rotary")
ACTIVATIONS = ("gelu", "relu")
NORM_PLACEMENTS = ("pre", "post")
ARCHITECTURES = ("gpt", "seq2seq")


@dataclass
class ModelConfig:
    arch: Literal["gpt", "seq2seq"] = "gpt"
    vocab_size: int = 50257
    block_size: int = 1024  # longest sequence the position encoding (and KV cache) supports
    n_layer: int = 12  # decoder layers (all layers of a GPT)
    n_encoder_layer: int = 0  # seq2seq only
    n_head: int = 12
    n_embd: int = 768
    d_ff: int = 0  # feed-forward width; 0 means 4 * n_embd
    dropout: float = 0.0
    bias: bool = True
    pos_encoding: Literal["learned", "sinusoidal", "rotary"] = "learned"
    rope_base: float = 10000.0
    activation: Literal["gelu", "relu"] = "gelu"  # gelu is GPT-2's tanh approximation
    norm: Literal["pre", "post"] = "pre"
    layer_norm_eps: float = 1e-5
    scale_embeddings: bool = False  # multiply token embeddings by sqrt(n_embd), as the original did
    tie_embeddings: bool = True  # output projection shares the (target) embedding matrix
    share_embeddings: bool = True  # seq2seq: source and target use one embedding table
    # seq2seq: the token the decoder starts from; None = the tokenizer's end-of-text id
    decoder_start_token: int | None = None
    tokenizer: str = "gpt2"  # the name `gpt.get_tokenizer` understands
    extra: dict = field(default_factory=dict)  # free-form metadata kept with checkpoints

    def __post_init__(self) -> None:
        if not self.d_ff:
            self.d_ff = 4 * self.n_embd
        self.validate()

    @property
    def is_seq2seq(self) -> bool:
        """An encoder-decoder (the prompt is a source to encode), not a decoder-only GPT."""
        return self.arch == "seq2seq"

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"invalid model config: {msg}")

        need(self.arch in ARCHITECTURES, f"arch must be one of {ARCHITECTURES}, got {self.arch!r}")
        need(
            self.pos_encoding in POSITION_ENCODINGS,
            f"pos_encoding must be one of {POSITION_ENCODINGS}, got {self.pos_encoding!r}",
        )
        need(
            self.activation in ACTIVATIONS,
            f"activation must be one of {ACTIVATIONS}, got {self.activation!r}",
        )
        need(self.norm in NORM_PLACEMENTS, f"norm must be one of {NORM_PLACEMENTS}, got {self.norm!r}")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "d_ff"):
            need(
                isinstance(getattr(self, name), int) and getattr(self, name) > 0,
                f"{name} must be a positive integer, got {getattr(self, name)!r}",
            )
        need(self.n_encoder_layer >= 0, f"n_encoder_layer must be >= 0, got {self.n_encoder_layer}")
        need(self.arch != "seq2seq" or self.n_encoder_layer > 0, "a seq2seq model needs n_encoder_layer > 0")
        need(
            self.n_embd % self.n_head == 0,
            f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})",
        )
        need(
            self.pos_encoding != "rotary" or self.head_dim % 2 == 0,
            f"rotary position encoding needs an even head size, got {self.head_dim}",
        )
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        need(
            self.decoder_start_token is None or 0 <= self.decoder_start_token < self.vocab_size,
            f"decoder_start_token must be in [0, vocab_size), got {self.decoder_start_token}",
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"invalid model config: unknown fields {unknown}")
        return cls(**d)

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


_GPT2 = dict(arch="gpt", vocab_size=50257, block_size=1024, tokenizer="gpt2")
# The original Transformer ("Attention Is All You Need", base model).
_ORIGINAL = dict(
    arch="seq2seq",
    norm="post",
    pos_encoding="sinusoidal",
    activation="relu",
    scale_embeddings=True,
    dropout=0.1,
    tie_embeddings=True,
    share_embeddings=True,
)

PRESETS: dict[str, dict] = {
    "gpt2": dict(_GPT2, n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(_GPT2, n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(_GPT2, n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(_GPT2, n_layer=48, n_head=25, n_embd=1600),
    "transformer-base": dict(
        _ORIGINAL,
        n_layer=6,
        n_encoder_layer=6,
        n_head=8,
        n_embd=512,
        d_ff=2048,
        block_size=512,
        vocab_size=50257,
    ),
    # Small models that train in minutes on a laptop CPU.
    "gpt-mini": dict(arch="gpt", n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.1),
    "gpt-char": dict(
        arch="gpt", n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=257, tokenizer="byte"
    ),
    # ./start.sh's default model: a BPE GPT for Python, sized for a few minutes on a 2-core CPU.
    "gpt-code": dict(
        arch="gpt",
        n_layer=3,
        n_head=4,
        n_embd=128,
        block_size=256,
        tokenizer="bpe",
        pos_encoding="rotary",
        dropout=0.0,
    ),
    "seq2seq-mini": dict(
        arch="seq2seq",
        n_layer=3,
        n_encoder_layer=3,
        n_head=4,
        n_embd=128,
        block_size=64,
        vocab_size=257,
        tokenizer="byte",
        dropout=0.0,
    ),
    # For tests: builds in milliseconds.
    "gpt-tiny": dict(
        arch="gpt", n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=257, tokenizer="byte"
    ),
    "seq2seq-tiny": dict(
        arch="seq2seq",
        n_layer=2,
        n_encoder_layer=2,
        n_head=2,
        n_embd=32,
        block_size=64,
        vocab_size=257,
        tokenizer="byte",
    ),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A named preset, with any field overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
