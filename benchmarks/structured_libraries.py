"""Which constrained-decoding library to build structured output on: llguidance, xgrammar or
outlines-core, measured on our GPT-2 tokenizer (50,257 ids), one thread, the way the server
would use each.

For each library: the one-off cost of reading the vocabulary, the compile time of a small, a
medium and a large JSON schema, and the cost per generated token of computing the allowed-token
mask and advancing the matcher, replayed over the GPT-2 tokens of a valid document.

    python benchmarks/structured_libraries.py [--json results/structured_libraries.json]

Needs `pip install llguidance xgrammar outlines-core` (a library that is missing is skipped).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from gpt.tokenizer import get_tokenizer  # noqa: E402

SMALL = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "ok": {"type": "boolean"}},
    "required": ["name", "age", "ok"],
    "additionalProperties": False,
}
SMALL_DOC = {"name": "Ada Lovelace", "age": 36, "ok": True}

MEDIUM = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
        "score": {"type": "number", "minimum": 0, "maximum": 100},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 4},
        "kind": {"enum": ["book", "film", "song"]},
        "author": {
            "type": "object",
            "properties": {"first": {"type": "string"}, "last": {"type": "string"}},
            "required": ["first", "last"],
            "additionalProperties": False,
        },
        "note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
    },
    "required": ["id", "score", "tags", "kind", "author"],
    "additionalProperties": False,
}
MEDIUM_DOC = {
    "id": "ABC-1234",
    "score": 87.5,
    "tags": ["classic", "poetry"],
    "kind": "book",
    "author": {"first": "Jane", "last": "Austen"},
    "note": None,
}


def large_schema(n: int = 40) -> tuple[dict, dict]:
    """n properties of mixed kinds, every fourth a nested object: a form-sized schema."""
    props, doc = {}, {}
    for i in range(n):
        kind = i % 4
        if kind == 0:
            props[f"field_{i}"] = {"type": "string", "maxLength": 40}
            doc[f"field_{i}"] = f"value {i}"
        elif kind == 1:
            props[f"field_{i}"] = {"type": "integer", "minimum": 0, "maximum": 1000}
            doc[f"field_{i}"] = i * 7
        elif kind == 2:
            props[f"field_{i}"] = {"enum": ["red", "green", "blue"]}
            doc[f"field_{i}"] = "green"
        else:
            props[f"field_{i}"] = {
                "type": "object",
                "properties": {"x": {"type": "number"}, "y": {"type": "array", "items": {"type": "integer"}}},
                "required": ["x", "y"],
                "additionalProperties": False,
            }
            doc[f"field_{i}"] = {"x": 1.5, "y": [1, 2, 3]}
    schema = {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}
    return schema, doc


class Llguidance:
    name = "llguidance"

    def __init__(self, encoding, eot: int):
        import llguidance
        from llguidance.tiktoken import lltokenizer_from_encoding

        self.ll = llguidance
        self.tok = lltokenizer_from_encoding(encoding)
        self.mask = torch.full((1, (encoding.n_vocab + 31) // 32), -1, dtype=torch.int32)

    def compile(self, schema: dict):
        g = self.ll.LLMatcher.grammar_from_json_schema(json.dumps(schema))
        m = self.ll.LLMatcher(self.tok, g, log_level=0)
        assert not m.is_error(), m.get_error()
        return m

    def step(self, m, token: int) -> None:
        m.unsafe_compute_mask_ptr(self.mask.data_ptr(), self.mask.numel() * 4)
        assert m.consume_token(token), m.get_error()


class Xgrammar:
    name = "xgrammar"

    def __init__(self, encoding, eot: int):
        import xgrammar

        self.xgr = xgrammar
        vocab = [encoding.decode_single_token_bytes(i) for i in range(encoding.n_vocab)]
        info = xgrammar.TokenizerInfo(vocab, xgrammar.VocabType.RAW, stop_token_ids=[eot])
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.mask = xgrammar.allocate_token_bitmask(1, info.vocab_size)

    def compile(self, schema: dict):
        return self.xgr.GrammarMatcher(self.compiler.compile_json_schema(json.dumps(schema)))

    def step(self, m, token: int) -> None:
        m.fill_next_token_bitmask(self.mask)
        assert m.accept_token(token)


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, encoding, eot: int):
        import outlines_core

        self.oc = outlines_core
        by_bytes: dict[bytes, list[int]] = {}
        for i in range(encoding.n_vocab):
            if i != eot:
                by_bytes.setdefault(encoding.decode_single_token_bytes(i), []).append(i)
        self.vocab = outlines_core.Vocabulary(eot, by_bytes)
        self.mask = torch.full(((encoding.n_vocab + 31) // 32,), -1, dtype=torch.int32)

    def compile(self, schema: dict):
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        return self.oc.Guide(self.oc.Index(regex, self.vocab))

    def step(self, m, token: int) -> None:
        m.write_mask_into(self.mask.data_ptr(), self.mask.numel(), 4)
        m.advance(token)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", help="write the figures to this JSON file")
    args = ap.parse_args()
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    tokenizer = get_tokenizer("gpt2")
    enc, eot = tokenizer.enc, tokenizer.eot_token
    large, large_doc = large_schema()
    cases = {"small": (SMALL, SMALL_DOC), "medium": (MEDIUM, MEDIUM_DOC), "large": (large, large_doc)}
    print(f"CPU: {cpu_model()}; torch {torch.__version__}; GPT-2 vocabulary {enc.n_vocab}")
    results = {"cpu": cpu_model(), "libraries": {}}
    for cls in (Llguidance, Xgrammar, OutlinesCore):
        try:
            t0 = time.perf_counter()
            lib = cls(enc, eot)
            setup = time.perf_counter() - t0
        except ImportError as e:
            print(f"{cls.name}: skipped ({e})")
            continue
        row = {"vocabulary_s": setup}
        print(f"{cls.name}: vocabulary read in {setup * 1000:.0f} ms")
        for case, (schema, doc) in cases.items():
            tokens = enc.encode(json.dumps(doc)) + [eot]
            compiles, steps = [], []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                try:
                    m = lib.compile(schema)
                except Exception as e:  # a library that cannot compile this schema
                    print(f"  {case}: cannot compile ({str(e)[:120]})")
                    compiles = []
                    break
                compiles.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                for t in tokens[:-1]:
                    lib.step(m, t)
                steps.append((time.perf_counter() - t0) / (len(tokens) - 1))
            if not compiles:
                row[case] = None
                continue
            row[case] = {
                "compile_ms_first": compiles[0] * 1000,
                "compile_ms_median": statistics.median(compiles) * 1000,
                "per_token_us_median": statistics.median(steps) * 1e6,
                "tokens": len(tokens) - 1,
            }
            print(
                f"  {case:6s}: compile first {compiles[0] * 1000:8.1f} ms, median "
                f"{statistics.median(compiles) * 1000:8.1f} ms; mask+advance "
                f"{statistics.median(steps) * 1e6:7.1f} us/token over {len(tokens) - 1} tokens"
            )
        results["libraries"][cls.name] = row
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
