"""--dtype auto (training.precision): float32 unless the CPU has bfloat16 arithmetic and a probe
measures bfloat16 autocast faster for the model; the probe leaves no trace, and the choice is
saved with the run so a resume keeps it."""

import json

import pytest
import torch

import gpt
from training import precision
from training.state import STATE_JSON, latest_checkpoint


@pytest.fixture
def bf16_cpu(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    monkeypatch.setattr(precision, "MIN_PARAMS", 0)


def _tiny():
    torch.manual_seed(0)
    return gpt.GPT(gpt.preset("gpt-tiny", dropout=0.1))


def _no_probe(*a):
    raise AssertionError("probed")


def test_a_cpu_without_bfloat16_arithmetic_trains_in_float32_without_a_probe(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "fma", "avx512f"})
    monkeypatch.setattr(precision, "MIN_PARAMS", 0)
    monkeypatch.setattr(precision, "probe", _no_probe)
    assert precision.choose(_tiny(), "gpt", 16, torch.device("cpu")) == ("float32", None)


def test_small_models_the_encoder_decoder_and_gpus_are_not_probed(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"amx_bf16"})
    monkeypatch.setattr(precision, "probe", _no_probe)
    model = _tiny()
    assert precision.choose(model, "gpt", 16, torch.device("cpu"))[0] == "float32"  # under MIN_PARAMS
    monkeypatch.setattr(precision, "MIN_PARAMS", 0)
    assert precision.choose(model, "seq2seq", 16, torch.device("cpu"))[0] == "float32"
    assert precision.choose(model, "gpt", 16, torch.device("cuda"))[0] == "float32"


@pytest.mark.parametrize(
    "times, want", [((1.0, 0.6), "bfloat16"), ((1.0, 0.95), "float32"), ((1.0, 1.8), "float32")]
)
def test_bfloat16_is_chosen_only_where_it_measures_faster(monkeypatch, bf16_cpu, times, want):
    monkeypatch.setattr(precision, "probe", lambda model, length: times)
    dtype, why = precision.choose(_tiny(), "gpt", 16, torch.device("cpu"))
    assert dtype == want and f"{times[1]:.2f}x" in why


def test_the_probe_leaves_the_random_state_gradients_and_mode_as_they_were():
    model = _tiny().eval()
    first = next(model.parameters())
    first.grad = torch.ones_like(first)
    torch.manual_seed(5)
    rng = torch.get_rng_state()
    f32, bf16 = precision.probe(model, 16)
    assert f32 > 0 and bf16 > 0
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(first.grad, torch.ones_like(first))
    assert all(p.grad is None for p in list(model.parameters())[1:])
    assert not model.training


def test_the_choice_is_saved_with_the_run_and_a_resume_keeps_it(run, tmp_path, monkeypatch, bf16_cpu):
    monkeypatch.setattr(precision, "probe", lambda model, length: (1.0, 0.5))
    run(max_iters=4)
    saved = json.loads((latest_checkpoint(tmp_path / "run") / STATE_JSON).read_text())
    assert saved["config"]["dtype"] == "bfloat16"
    monkeypatch.setattr(precision, "probe", lambda model, length: (1.0, 2.0))  # would say float32
    run(resume=True, max_iters=6)
    saved = json.loads((latest_checkpoint(tmp_path / "run") / STATE_JSON).read_text())
    assert saved["config"]["dtype"] == "bfloat16"
