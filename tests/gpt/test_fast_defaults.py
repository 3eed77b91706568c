"""gpt.fast_defaults: what runs when the user names no setting, and that a named one is kept."""

import shutil

import pytest
import torch

import gpt
from gpt import fast_defaults, kernels

pytestmark = pytest.mark.real_fast_defaults


def _f16_kernel_fits(model) -> bool:
    head = model.config.n_embd // model.config.n_head
    return kernels.attention_f16_available() and head % 8 == 0 and head <= 256


def test_a_cpu_with_a_compiler_compiles_a_server_and_reads_halves_where_our_kernel_does(tiny_gpt):
    fast = fast_defaults.choose(tiny_gpt)
    from torch._inductor.cpp_builder import get_cpp_compiler

    compiler = shutil.which(get_cpp_compiler()) is not None
    assert fast.compile == (compiler and torch._dynamo.is_dynamo_supported())
    expected = torch.float16 if _f16_kernel_fits(tiny_gpt) else None
    assert fast.kv_cache_dtype == expected
    assert len(fast.reasons) == 2


def test_without_a_compiler_nothing_is_compiled(tiny_gpt, monkeypatch):
    monkeypatch.setattr(fast_defaults, "cpp_compiler_present", lambda: False)
    fast = fast_defaults.choose(tiny_gpt)
    assert not fast.compile and "no C++ compiler" in fast.reasons[0]


def test_a_short_one_shot_run_is_not_compiled_and_a_long_one_is(tiny_gpt, monkeypatch):
    monkeypatch.setattr(fast_defaults, "cpp_compiler_present", lambda: True)
    short = fast_defaults.choose(tiny_gpt, tokens=fast_defaults.COMPILE_PAYS_AFTER_TOKENS - 1)
    long = fast_defaults.choose(tiny_gpt, tokens=fast_defaults.COMPILE_PAYS_AFTER_TOKENS)
    assert not short.compile and "does not win back" in short.reasons[0]
    assert long.compile


def test_settings_the_user_names_are_kept(tiny_gpt, monkeypatch):
    monkeypatch.setattr(fast_defaults, "cpp_compiler_present", lambda: True)
    fast = fast_defaults.choose(tiny_gpt, compile=False, kv_cache_dtype="float32")
    assert not fast.compile and fast.kv_cache_dtype == torch.float32
    assert fast.reasons == ("not compiled (--no-compile)", "float32 KV cache (--kv-cache-dtype)")
    fast = fast_defaults.choose(tiny_gpt, compile=True, kv_cache_dtype=None)
    assert fast.compile and fast.kv_cache_dtype is None


def test_the_encoder_decoder_and_a_16_bit_model_keep_their_own_cache_dtype(tiny_s2s):
    assert fast_defaults.choose(tiny_s2s).kv_cache_dtype is None
    half = gpt.GPT(gpt.preset("gpt-tiny")).eval().to(torch.bfloat16)
    fast = fast_defaults.choose(half)
    assert fast.kv_cache_dtype is None and fast.reasons[1] == "bfloat16 KV cache"


def test_the_start_up_line_names_the_faster_flag(tiny_gpt, monkeypatch):
    monkeypatch.setattr(fast_defaults, "cpp_compiler_present", lambda: True)
    fast = fast_defaults.choose(tiny_gpt)
    line = fast_defaults.describe(fast, tiny_gpt, quantized=False)
    assert line.startswith("decoding with: compiled decode step, ")
    assert "--quantize int8 would be faster" in line
    slow = fast_defaults.choose(tiny_gpt, compile=False)
    assert "--compile would be faster" in fast_defaults.describe(slow, tiny_gpt, quantized=True)
    assert "would be faster" not in fast_defaults.describe(fast, tiny_gpt, quantized=True)
