"""Our checkpoint as GGUF for llama-server: exported as a Hugging Face GPT-2 directory (weights
and tokenizer), converted to f32 by llama.cpp's own converter, quantized to q8_0 by its own
`llama-quantize`. Each file is remade only when what it was made from changes.

Tokenizers: GPT-2's is written as vocab.json and merges.txt; a BPE learned by `gpt-train
--tokenizer bpe` as its own `tokenizers` JSON with end-of-text added as a special token. llama.cpp
names a BPE's pre-tokenizer by hashing the ids it gives a test string, which only known
vocabularies pass; ours is labelled GPT-2's, whose pattern it uses after first splitting off
newlines. That label only matters where llama.cpp turns text into tokens: the benchmarks send it
token ids, and it turns ids back into text byte by byte from the vocabulary, which is ours.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

from llamacpp import (
    TOKENIZER_CHECKS,
    bin_path,
    check_tokenizer,
    ensure_gguf_package,
    llama_dir,
    sha256_file,
    write_gpt2_tokenizer,
    write_tokenizer_config,
)

import gpt
from gpt.tokenizer import EOT_TEXT

# Runs llama.cpp's converter with the pre-tokenizer named rather than looked up by hash.
CONVERT_NAMING_PRE = """
import runpy, sys
script, pre = sys.argv[1], sys.argv[2]
sys.argv = [script, *sys.argv[3:]]
sys.path.insert(0, __import__("os").path.dirname(script))
from conversion import base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
runpy.run_path(script, run_name="__main__")
"""


def write_bpe_tokenizer(path: str, tok) -> None:
    """tokenizer.json (ours, with end-of-text as a special added token at its id) and a
    tokenizer_config.json that transformers' PreTrainedTokenizerFast loads."""
    spec = json.loads(tok.to_json())
    spec["added_tokens"] = [
        dict(id=tok.eot_token, content=EOT_TEXT, single_word=False, lstrip=False, rstrip=False,
             normalized=False, special=True)
    ]  # fmt: skip
    with open(os.path.join(path, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(spec, f, ensure_ascii=False)
    write_tokenizer_config(path, "PreTrainedTokenizerFast", 1 << 20)


def check_bpe_tokenizer(path: str, tok) -> None:
    """transformers, loading `path`, must give our ids and text back, end-of-text included."""
    import transformers

    theirs = transformers.AutoTokenizer.from_pretrained(path)
    for text in TOKENIZER_CHECKS:
        want, got = tok.encode(text), theirs.encode(text, add_special_tokens=False)
        if want != got:
            raise SystemExit(f"the exported tokenizer disagrees with ours on {text!r}: {want} != {got}")
        if theirs.decode(got) != text:
            raise SystemExit(f"the exported tokenizer does not decode {text!r} back")
    if theirs.convert_tokens_to_ids(EOT_TEXT) != tok.eot_token:
        raise SystemExit(f"the exported tokenizer does not map {EOT_TEXT} to {tok.eot_token}")


def ensure_gguf(cache: str, ckpt: str, name: str) -> str:
    """The checkpoint as `models/{name}-f32.gguf`, remade when the weights or tokenizer change."""
    models = os.path.join(cache, "models")
    hf_dir, out = os.path.join(models, f"{name}-hf"), os.path.join(models, f"{name}-f32.gguf")
    model, tok = gpt.load(ckpt)
    gpt.export_hf_gpt2(model, hf_dir)
    cfg_path = os.path.join(hf_dir, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["n_ctx"] = cfg["n_positions"]  # the converter's GPT-2 class reads n_ctx
    json.dump(cfg, open(cfg_path, "w"), indent=2)
    if tok.name == "gpt2":
        write_gpt2_tokenizer(hf_dir)
        check_tokenizer(hf_dir)
        pre = None
    elif tok.name == "bpe":
        write_bpe_tokenizer(hf_dir, tok)
        check_bpe_tokenizer(hf_dir, tok)
        pre = "gpt-2"
    else:
        raise SystemExit(f"no GGUF export for the {tok.name} tokenizer")
    stamp = out + ".sha256"
    sha = sha256_file(os.path.join(hf_dir, "model.safetensors"))
    sha = hashlib.sha256((sha + tok.fingerprint).encode()).hexdigest()
    if os.path.exists(out) and os.path.exists(stamp) and open(stamp).read().strip() == sha:
        return out
    src = llama_dir(cache)
    ensure_gguf_package(src)
    script = os.path.join(src, "convert_hf_to_gguf.py")
    args = [hf_dir, "--outtype", "f32", "--outfile", out]
    cmd = [sys.executable, script, *args]
    if pre is not None:
        cmd = [sys.executable, "-c", CONVERT_NAMING_PRE, script, pre, *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"llama.cpp's converter failed:\n{done.stderr[-3000:]}")
    open(stamp, "w").write(sha + "\n")
    return out


def ensure_q8(cache: str, f32: str) -> str:
    """llama.cpp's 8-bit quantization (q8_0) of the f32 GGUF, remade when that changes."""
    out, stamp = f32.replace("-f32.gguf", "-q8_0.gguf"), f32.replace("-f32.gguf", "-q8_0.gguf.sha256")
    sha = sha256_file(f32)
    if os.path.exists(out) and os.path.exists(stamp) and open(stamp).read().strip() == sha:
        return out
    subprocess.run(
        [bin_path(cache, "llama-quantize"), f32, out, "q8_0", "2"], check=True, capture_output=True
    )
    open(stamp, "w").write(sha + "\n")
    return out
