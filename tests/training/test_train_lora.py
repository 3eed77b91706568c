"""gpt-train --lora-rank: only the adapters train, from --init-from; checkpoints hold the merged
model (gpt.load reads it as is) and the adapters with their optimizer state, so resume is exact;
a fine-tune on new text lowers the validation loss on that text."""

import pytest
import torch
from train_helpers import TINY, read_metrics

import gpt
from training.config import ConfigError
from training.state import load_state
from training.trainer import train

LORA = dict(lora_rank=4, lora_alpha=8.0, lr=1e-2, min_lr=1e-3, warmup=0, sample_tokens=0)


@pytest.fixture
def base(run, tmp_path):
    run(max_iters=30, out=str(tmp_path / "base"))
    return str(tmp_path / "base" / "best")


@pytest.fixture
def new_text(tmp_path):
    """Text unlike the base corpus: training and validation files."""
    import random

    rng = random.Random(1)
    words = ["zeta", "omega", "kappa", "rho", "dog", "ran", "far"]
    for name, n in (("new.txt", 600), ("new-val.txt", 120)):
        (tmp_path / name).write_text(
            "".join(" ".join(rng.choice(words) for _ in range(6)) + "!\n" for _ in range(n)), encoding="utf-8"
        )
    return str(tmp_path / "new.txt"), str(tmp_path / "new-val.txt")


def _lora_run(tmp_path, base, new_text, out, **kw):
    return train(
        dict(
            TINY,
            init_from=base,
            preset=None,
            block_size=None,
            data=[new_text[0]],
            val_data=[new_text[1]],
            out=str(tmp_path / out),
            **{**LORA, **kw},
        )
    )


def test_lora_lowers_the_validation_loss_on_new_text_and_changes_only_adapted_layers(
    tmp_path, base, new_text
):
    s = _lora_run(tmp_path, base, new_text, "ft", max_iters=40, eval_interval=10)
    evals = [r["val_loss"] for r in read_metrics(tmp_path / "ft") if r["kind"] == "eval"]
    before, tok = gpt.load(base)
    after, _ = gpt.load(tmp_path / "ft" / "best")  # a plain checkpoint: the adapters merged in
    assert s["best_val_loss"] == min(evals)
    val = [open(new_text[1], encoding="utf-8").read()]
    loss_before, loss_after = (gpt.score_texts(m, tok, val).loss for m in (before, after))
    assert loss_after < loss_before - 0.5, (loss_before, loss_after)
    for (name, a), b in zip(before.state_dict().items(), after.state_dict().values()):
        adapted = name.rsplit(".", 2)[-2] in ("c_attn", "c_proj", "c_fc") and name.endswith(".weight")
        if adapted:
            delta = (b - a).double()
            assert torch.linalg.matrix_rank(delta, atol=1e-5) <= 4, name  # a rank-4 update
        else:
            assert torch.equal(a, b), name  # frozen
    assert any(
        not torch.equal(a, b) for a, b in zip(before.state_dict().values(), after.state_dict().values())
    )
    assert gpt.generate(after, tok, "zeta ", max_new_tokens=4, temperature=0.0)


def test_lora_resume_continues_with_the_same_losses(tmp_path, base, new_text):
    # a constant learning rate: the first half's schedule does not depend on max_iters
    same = dict(eval_interval=4, lora_dropout=0.1, lr=1e-2, min_lr=1e-2)
    straight = _lora_run(tmp_path, base, new_text, "straight", max_iters=8, **same)
    _lora_run(tmp_path, base, new_text, "halves", max_iters=4, **same)
    resumed = train(dict(max_iters=8, out=str(tmp_path / "halves")), resume=True)
    losses = {
        p: {r["step"]: r["loss"] for r in read_metrics(tmp_path / p) if r["kind"] == "train"}
        for p in ("straight", "halves")
    }
    assert losses["halves"] == losses["straight"]
    assert resumed["best_val_loss"] == straight["best_val_loss"]
    state = load_state(tmp_path / "halves" / "ckpt-0000008")
    assert state["adapters"] and all(".lora_" in k for k in state["adapters"])
    gpt.load(tmp_path / "halves" / "ckpt-0000008")  # step checkpoints are plain models too


def test_lora_settings_without_a_base_or_with_unknown_layers_are_refused(tmp_path, base, new_text, run):
    with pytest.raises(ConfigError, match="--init-from"):
        run(lora_rank=4, out=str(tmp_path / "a"))
    with pytest.raises(ConfigError, match="--lora-targets"):
        _lora_run(tmp_path, base, new_text, "b", lora_targets=["query"])
    with pytest.raises(ConfigError, match="--lora-rank"):
        run(lora_alpha=4.0, out=str(tmp_path / "c"))
