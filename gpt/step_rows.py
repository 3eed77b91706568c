"""Linear layers' kernels for a forward of one sequence, whatever its number of rows.

A linear layer picks its kernel by the rows it gets: one row runs on our matrix-vector kernels,
several may run on oneDNN (a large float32 layer, int8 on a CPU with VNNI), and two kernels round
differently. A speculative draft of one sequence is verified as a decode step whose rows are the
drafted tokens (gpt.transformer); inside `one_sequence()` every layer picks what a single row
picks, for any number of rows, so each drafted token gets the numbers that decoding it alone
gives. A compiled step of one row runs inside it too (gpt.compile), so that it and a draft's
verification trace the same choices into one graph.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

_depth = 0


@contextlib.contextmanager
def one_sequence() -> Iterator[None]:
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1


def active() -> bool:
    """Whether the forward running now is one sequence's (see the module's doc)."""
    return _depth > 0
