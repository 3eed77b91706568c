"""The training loss of each model kind, and the tokens a batch trains on.

The output head and the cross-entropy run a slice of rows at a time (gpt.chunked_loss): the
loss is F.cross_entropy's on the model's logits, without every position's logits in memory."""

from __future__ import annotations

import torch

from gpt.chunked_loss import lm_cross_entropy

from .pairs import IGNORE


def compute_loss(model, batch, kind: str) -> torch.Tensor:
    if kind == "gpt":
        x, y = batch[:2]  # conversations carry their rows' lengths third
        return lm_cross_entropy(model, model(x, hidden=True), y)
    src, src_mask, tgt_in, tgt_out = batch
    hidden = model(src, tgt_in, src_mask, hidden=True)  # teacher forcing: the decoder reads the true prefix
    return lm_cross_entropy(model, hidden, tgt_out, ignore_index=IGNORE)


def count_tokens(batch, kind: str) -> int:
    """The tokens a batch trains on: every position of a block of text; the conversations' own
    tokens, without their padding; the target tokens of source/target pairs."""
    if kind != "gpt":
        return int((batch[3] != IGNORE).sum())
    return int(batch[2].sum()) if len(batch) == 3 else batch[0].numel()
