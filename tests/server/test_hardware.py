"""The start-up check that warns when a 16-bit model would be slow to serve in batches."""

import logging

import pytest
import torch
from conftest import tiny_settings

import server.hardware
from server.app import load_engine


def test_the_slowdown_of_fp32_is_one_and_of_bfloat16_a_measured_ratio():
    assert server.hardware.batched_slowdown(torch.float32, 8, 64) == 1.0
    ratio = server.hardware.batched_slowdown(torch.bfloat16, 8, 64)
    assert 0 < ratio < float("inf")


@pytest.mark.parametrize("slowdown, warned", [(4.0, True), (0.5, False)])
def test_serving_a_16_bit_model_warns_only_when_batches_run_slower(
    tiny_checkpoint, monkeypatch, caplog, slowdown, warned
):
    monkeypatch.setattr(server.hardware, "batched_slowdown", lambda dtype, rows, width: slowdown)
    with caplog.at_level(logging.WARNING, logger="server"):
        engine = load_engine(tiny_settings(tiny_checkpoint, dtype="bfloat16", max_batch_size=4))
    assert engine.model.lm_head.weight.dtype == torch.bfloat16
    assert any("slower than float32" in r.message for r in caplog.records) == warned
