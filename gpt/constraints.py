"""Structured output: a constraint (JSON schema, regex, choice or grammar) that decides, token by
token, which tokens may come next, so every output is valid by construction.

The automaton is llguidance's (MIT): of the three libraries measured on our GPT-2 vocabulary
(benchmarks/structured_libraries.py), it compiled a schema 10-20x faster than xgrammar and
100-1000x faster than outlines-core, at a per-token mask cost far below a decoding step, and it
takes regexes and Lark/GBNF grammars directly.

    c = Constraint.json_schema({"type": "object", ...})
    gpt.generate(model, tokenizer, prompt, constraint=c)

`Constraint.compile` builds the matcher over a tokenizer (llguidance releases the GIL meanwhile,
and its parser limits bound the work; a server still compiles off its engine thread, with a
deadline). Every sequence then holds a `ConstraintState`: a copy of the compiled matcher,
advanced by each token.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .limits import RequestError
from .tokenizer import TiktokenTokenizer, Tokenizer

KINDS = ("json_schema", "regex", "choice", "grammar")
MAX_CONSTRAINT_CHARS = 256 * 1024  # a schema, regex, grammar or all choices together, as text
MAX_GRAMMAR_CHARS = 8 * 1024 * 1024  # what a constraint may expand to (a big enum, a long pattern)
# JSON without free whitespace: small models given the choice fill their budget with spaces
JSON_OPTIONS = {"whitespace_flexible": False}


@dataclass(frozen=True)
class Constraint:
    """What the output must match. Build one with `json_schema`, `json_object`, `regex`,
    `choice` or `grammar`; `param` is the request field it came from, named in its errors."""

    kind: str
    text: str  # canonical text: the schema as sorted JSON, the regex, the choices as a JSON list
    param: str = "constraint"
    _compiled: dict = field(default_factory=dict, compare=False, repr=False)  # tokenizer -> compiled

    @classmethod
    def json_schema(cls, schema: dict | bool | str, param: str = "constraint") -> Constraint:
        """Output is JSON valid against `schema` (a dict, or its JSON text)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise _invalid(param, f"is not valid JSON: {e}") from None
        if not isinstance(schema, (dict, bool)):
            raise _invalid(param, f"a JSON schema is an object, got {type(schema).__name__}")
        return cls._sized("json_schema", json.dumps(_canonical(schema)), param)

    @classmethod
    def json_object(cls, param: str = "constraint") -> Constraint:
        """Output is a JSON object, of any shape (OpenAI's JSON mode)."""
        return cls.json_schema({"type": "object"}, param)

    @classmethod
    def regex(cls, pattern: str, param: str = "constraint") -> Constraint:
        """Output matches `pattern` in full (Rust regex syntax, close to Python's)."""
        if not isinstance(pattern, str) or not pattern:
            raise _invalid(param, "a regex is a non-empty string")
        return cls._sized("regex", pattern, param)

    @classmethod
    def choice(cls, options: Sequence[str], param: str = "constraint") -> Constraint:
        """Output is exactly one of `options`."""
        if isinstance(options, str) or not options or not all(isinstance(o, str) and o for o in options):
            raise _invalid(param, "choices are a non-empty list of non-empty strings")
        return cls._sized("choice", json.dumps(list(dict.fromkeys(options))), param)

    @classmethod
    def grammar(cls, text: str, param: str = "constraint") -> Constraint:
        """Output is a sentence of a context-free grammar: Lark (llguidance's dialect, start
        rule `start`) or llama.cpp's GBNF (start rule `root`)."""
        if not isinstance(text, str) or not text.strip():
            raise _invalid(param, "a grammar is a non-empty string")
        return cls._sized("grammar", text, param)

    @classmethod
    def _sized(cls, kind: str, text: str, param: str) -> Constraint:
        if len(text) > MAX_CONSTRAINT_CHARS:
            raise _invalid(param, f"is {len(text)} characters; the limit is {MAX_CONSTRAINT_CHARS}")
        return cls(kind, text, param)

    @property
    def key(self) -> str:
        """Identifies what it accepts (compiled constraints are cached by it)."""
        return f"{self.kind}:{self.text}"

    def compile(self, tokenizer: Tokenizer, grammar: str | None = None) -> CompiledConstraint:
        """The matcher of this constraint over `tokenizer`'s ids: from the cache, or built now
        (from `grammar`, this constraint's `to_grammar` text when the caller made it already).
        Raises RequestError with llguidance's reason when the constraint is invalid."""
        fp = tokenizer.fingerprint
        if fp not in self._compiled:
            self._compiled[fp] = CACHE.get(self, tokenizer, grammar)
        return self._compiled[fp]

    def start(self, tokenizer: Tokenizer) -> ConstraintState:
        """A fresh state for one sequence."""
        return ConstraintState(self.compile(tokenizer).matcher.deep_copy())


def _canonical(node):
    """A JSON schema with its object keys sorted, except the properties' own order, which is the
    order the output writes them in."""
    if isinstance(node, dict):
        out = {}
        for k in sorted(node, key=str):
            v = node[k]
            if k == "properties" and isinstance(v, dict):
                out[k] = {name: _canonical(sub) for name, sub in v.items()}
            else:
                out[k] = _canonical(v)
        return out
    if isinstance(node, list):
        return [_canonical(x) for x in node]
    return node


def to_grammar(kind: str, text: str) -> str:
    """llguidance's grammar text for a constraint; ValueError with the library's reason when it
    cannot be converted."""
    import llguidance

    if kind == "json_schema":
        return llguidance.LLMatcher.grammar_from_json_schema(text, defaults=JSON_OPTIONS)
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(text)
    if kind == "choice":
        return llguidance.LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(o) for o in json.loads(text))
        )
    if kind == "grammar":
        return llguidance.grammar_from("grammar", text)  # Lark, or GBNF converted to Lark
    raise ValueError(f"unknown constraint kind {kind!r}; known: {', '.join(KINDS)}")


def _limits():
    import llguidance

    # errors quote the user's grammar, not the parser's internal state
    return llguidance.LLParserLimits(verbose_errors=False)


_LL_TOKENIZERS: dict[str, object] = {}
_LL_LOCK = threading.Lock()


class _TokenizerView:
    """What llguidance asks of a tokenizer that is not a tiktoken encoding."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.eos_token_id, self.bos_token_id = tokenizer.eot_token, None
        self.special_token_ids = [tokenizer.eot_token]
        self.tokens = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]

    def __call__(self, text):
        if isinstance(text, bytes):
            raise TypeError("text only")  # tells llguidance to pass str
        return self.tok.encode(text)


def ll_tokenizer(tokenizer: Tokenizer):
    """llguidance's view of a tokenizer, built once per tokenizer (about 0.2 s for GPT-2)."""
    import llguidance
    from llguidance.tiktoken import lltokenizer_from_encoding

    fp = tokenizer.fingerprint
    with _LL_LOCK:
        if fp not in _LL_TOKENIZERS:
            if isinstance(tokenizer, TiktokenTokenizer):
                ll = lltokenizer_from_encoding(
                    tokenizer.enc, n_vocab=tokenizer.vocab_size, eos_token=tokenizer.eot_token
                )
            else:
                ll = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_TokenizerView(tokenizer)))
            _LL_TOKENIZERS[fp] = ll
        return _LL_TOKENIZERS[fp]


@dataclass
class CompiledConstraint:
    """A constraint's matcher over one tokenizer, in its start state, its first mask computed
    (so a grammar that fails only there fails at compile time). Sequences copy it."""

    constraint: Constraint
    matcher: object  # llguidance.LLMatcher
    seconds: float  # how long it took to build

    @classmethod
    def build(cls, c: Constraint, tokenizer: Tokenizer, grammar: str | None = None) -> CompiledConstraint:
        import time

        import llguidance

        t0 = time.perf_counter()
        try:
            grammar = to_grammar(c.kind, c.text) if grammar is None else grammar
        except ValueError as e:
            raise _invalid(c.param, _reason(e)) from None
        if len(grammar) > MAX_GRAMMAR_CHARS:
            raise _invalid(c.param, f"expands to a grammar over {MAX_GRAMMAR_CHARS} characters")
        m = llguidance.LLMatcher(ll_tokenizer(tokenizer), grammar, log_level=0, limits=_limits())
        if not m.is_error():
            m.compute_bitmask()
        if m.is_error():
            raise _invalid(c.param, _reason(m.get_error()))
        return cls(c, m, time.perf_counter() - t0)


def _invalid(param: str, reason: str) -> RequestError:
    """A constraint the library cannot honour: its own code, as a JSON schema cannot say which
    schemas, regexes and grammars are valid ones."""
    return RequestError.of(param, reason, "invalid_constraint")


def _reason(error) -> str:
    """llguidance's message, on one line."""
    return " ".join(str(error).split())[:1000]


class ConstraintCache:
    """Compiled constraints by tokenizer and canonical text, least recently used dropped first."""

    def __init__(self, size: int = 256):
        self.size = size
        self._items: OrderedDict[tuple[str, str], CompiledConstraint] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, c: Constraint, tokenizer: Tokenizer, grammar: str | None = None) -> CompiledConstraint:
        key = (tokenizer.fingerprint, c.key)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        compiled = CompiledConstraint.build(c, tokenizer, grammar)  # outside the lock: may take a while
        with self._lock:
            self._items[key] = compiled
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return compiled

    def __contains__(self, item: tuple[Constraint, Tokenizer]) -> bool:
        c, tokenizer = item
        with self._lock:
            return (tokenizer.fingerprint, c.key) in self._items


CACHE = ConstraintCache()


class ConstraintState:
    """One sequence's position in its constraint."""

    def __init__(self, matcher):
        self.matcher = matcher

    def fork(self) -> ConstraintState:
        return ConstraintState(self.matcher.deep_copy())

    def advance(self, token: int) -> None:
        """Take a chosen token (one the mask allowed)."""
        self.matcher.consume_token(token)

    @property
    def complete(self) -> bool:
        """The output is a whole sentence that nothing can extend: the sequence is done."""
        return self.matcher.is_stopped()

    @property
    def failed(self) -> str | None:
        """Why the matcher gave up (a token it did not allow, a resource limit), else None."""
        return _reason(self.matcher.get_error()) if self.matcher.is_error() else None


# bias of byte b's 8 tokens: 0 where bit k of b is set (token 8b + k allowed), else -inf
_BYTE_BIAS = torch.where((torch.arange(256)[:, None] >> torch.arange(8)) & 1 == 1, 0.0, float("-inf")).to(
    torch.float32
)


_EXECUTOR = None


def _executor():
    """llguidance's thread pool for the masks of several sequences at once, as many threads
    as PyTorch uses (the forward that would use them has finished when masks are computed)."""
    global _EXECUTOR
    if _EXECUTOR is None:
        import llguidance

        _EXECUTOR = llguidance.LLExecutor(num_threads=max(1, torch.get_num_threads()))
    return _EXECUTOR


def mask_bias(states: Sequence[ConstraintState], vocab_size: int) -> Tensor:
    """(len(states), vocab_size) float32: 0 for the tokens each state allows next, -inf for the
    rest (added to logits). A failed state allows nothing (its sequence ends with "error"
    rather than leave the constraint)."""
    words = (vocab_size + 31) // 32
    bits = torch.zeros((len(states), words), dtype=torch.int32)
    live = [(s.matcher, i) for i, s in enumerate(states) if s.failed is None]
    if len(live) == 1:
        live[0][0].unsafe_compute_mask_ptr(bits[live[0][1]].data_ptr(), words * 4)
    elif live:
        _executor().unsafe_compute_mask_ptr(live, bits.data_ptr(), words * 4, len(states))
    # little-endian words: bit k of byte b is token 8b + k; an embedding lookup per byte (PyTorch's
    # fastest gather of small rows)
    bias = torch.nn.functional.embedding(bits.view(torch.uint8).long(), _BYTE_BIAS)
    return bias.view(len(states), -1)[:, :vocab_size]
