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
import threading
from collections.abc import Iterator

_state = threading.local()  # per thread: two engines in one process never see each other's


@contextlib.contextmanager
def one_sequence() -> Iterator[None]:
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1


def active() -> bool:
    """Whether the forward running now, on this thread, is one sequence's (see the module's doc)."""
    return getattr(_state, "depth", 0) > 0
