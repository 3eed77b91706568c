"""The training loss of each model kind, and the tokens a batch trains on."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .pairs import IGNORE


def compute_loss(model, batch, kind: str) -> torch.Tensor:
    if kind == "gpt":
        x, y = batch
        logits = model(x)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))
    src, src_mask, tgt_in, tgt_out = batch
    logits = model(src, tgt_in, src_mask)  # teacher forcing: the decoder reads the true prefix
    return F.cross_entropy(logits.view(-1, logits.size(-1)), tgt_out.reshape(-1), ignore_index=IGNORE)


def count_tokens(batch, kind: str) -> int:
    return batch[0].numel() if kind == "gpt" else int((batch[3] != IGNORE).sum())
