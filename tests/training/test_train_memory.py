"""gpt-train's memory options: --activation-checkpointing trains with every block checkpointed
(both model kinds) and --resume keeps it; the closing summary shows the run's peak memory."""

import pytest
from train_helpers import TINY, train_argv

import gpt.layers
from training.cli import main
from training.state import latest_checkpoint, load_state
from training.summary import closing_lines, peak_memory
from training.trainer import train


@pytest.fixture
def checkpoint_calls(monkeypatch):
    calls = []
    real = gpt.layers.checkpoint
    monkeypatch.setattr(gpt.layers, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_activation_checkpointing_trains_is_kept_by_resume_and_the_summary_shows_peak_memory(
    tmp_path, corpus, capsys, checkpoint_calls
):
    out = tmp_path / "run"
    argv = train_argv(out, corpus, max_iters=2, eval_interval=2, quiet=False, activation_checkpointing=True)
    assert main(argv) == 0
    assert len(checkpoint_calls) == 2 * 2  # 2 steps x 2 blocks: evaluation is not checkpointed
    assert load_state(latest_checkpoint(out))["config"]["activation_checkpointing"] is True
    summary = capsys.readouterr().out.split("summary:")[1]
    line = next(x for x in summary.splitlines() if "peak memory" in x)
    assert line.strip().startswith("peak memory") and "(peak resident memory of the process)" in line
    assert line.split()[3] in ("MiB", "GiB") and float(line.split()[2]) > 0

    checkpoint_calls.clear()
    s = train({"out": str(out), "max_iters": 3}, resume=True)
    assert len(checkpoint_calls) == 2  # one more step, still checkpointed
    assert load_state(latest_checkpoint(out))["config"]["activation_checkpointing"] is True
    assert (
        s["peak_memory"]["bytes"] > 2**20
        and s["peak_memory"]["what"] == "peak resident memory of the process"
    )


def test_activation_checkpointing_trains_the_encoder_decoder(tmp_path, checkpoint_calls):
    overrides = dict(
        TINY, preset="seq2seq-tiny", model="seq2seq", block_size=48, max_iters=2, eval_interval=2
    )
    s = train(
        dict(overrides, eval_pairs=2, num_beams=1, out=str(tmp_path / "s2s"), activation_checkpointing=True)
    )
    assert s["step"] == 2 and len(checkpoint_calls) == 2 * 4  # 2 encoder + 2 decoder blocks a step
    checkpoint_calls.clear()
    train(dict(overrides, eval_pairs=2, num_beams=1, out=str(tmp_path / "plain")))
    assert checkpoint_calls == []  # off by default


def test_peak_memory_reads_the_process_peak_rss_on_cpu_and_the_summary_names_it(tmp_path):
    import torch

    peak = peak_memory(torch.device("cpu"))
    assert peak["bytes"] > 10 * 2**20 and peak["what"] == "peak resident memory of the process"
    lines = closing_lines(tmp_path, float("inf"), None, False, {"bytes": 3 * 2**30, "what": "x"})
    assert "  peak memory      3.00 GiB (x)" in lines
    assert not any("peak memory" in x for x in closing_lines(tmp_path, float("inf"), None, False))


def test_the_summary_serves_a_chat_model_with_its_template(tmp_path):
    import gpt

    gpt.save(gpt.GPT(gpt.preset("gpt-tiny")), tmp_path / "best")
    lines = closing_lines(tmp_path, 1.5, None, False, None, "tmpl.json")
    assert f"  serve it         gpt-serve --model {tmp_path / 'best'} --chat-template tmpl.json" in lines
