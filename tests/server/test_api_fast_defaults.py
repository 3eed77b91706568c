"""gpt-serve with no flags runs what gpt.fast_defaults chooses, says so in one line, and keeps
what the user names instead."""

import pytest
import torch

from gpt import fast_defaults
from server.app import load_engine
from server.cli import build_parser
from server.config import Settings


@pytest.mark.real_fast_defaults
def test_a_server_with_no_flags_logs_its_choice_and_decodes_in_it(tiny_checkpoint, caplog, monkeypatch):
    # compiled steps have tests of their own (tests/gpt/test_compile.py); here, the choice
    monkeypatch.setattr(fast_defaults, "cpp_compiler_present", lambda: False)
    with caplog.at_level("INFO", logger="server"):
        engine = load_engine(Settings(model=tiny_checkpoint))
    lines = [r.getMessage() for r in caplog.records if "decoding with:" in r.getMessage()]
    assert len(lines) == 1 and "--quantize int8 would be faster" in lines[0]
    half = fast_defaults.half_cache_fits(engine.model)
    assert engine._sched.cache.layers[0].k.dtype == (torch.float16 if half else torch.float32)
    assert ("float16 KV cache" in lines[0]) == half


@pytest.mark.parametrize(
    "argv, compile, kv",
    [
        ([], None, None),
        (["--compile"], True, None),
        (["--no-compile"], False, None),
        (["--kv-cache-dtype", "auto"], None, "auto"),
        (["--kv-cache-dtype", "float32", "--no-compile"], False, "float32"),
    ],
)
def test_compile_and_the_cache_dtype_are_chosen_unless_named(argv, compile, kv):
    args = build_parser().parse_args(["--model", "m", *argv])
    assert args.compile is compile and args.kv_cache_dtype == kv


def test_the_environment_names_them_too():
    settings = Settings.from_env({"GPT_SERVE_COMPILE": "0", "GPT_SERVE_KV_CACHE_DTYPE": "auto"})
    assert settings.compile is False and settings.kv_cache_dtype == "auto"
    assert Settings().compile is None and Settings().kv_cache_dtype == "auto"
