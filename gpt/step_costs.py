"""Measured time of decode forwards of each shape (batch size, tokens per row), for the
speculative decoder's decision of whether, and how far, to speculate (gpt.speculative)."""

from __future__ import annotations

import bisect
import math
import statistics
from collections import deque


def _bucket(batch: int) -> int:
    """1, 2, 3, 4, 6, 8, 12, 16, 24, 32, ...: batch sizes whose steps cost about the same. Coarser
    buckets mixed steps of quite different sizes: as a burst of requests finishes, the plain
    steps of a bucket were mostly timed at its largest batches and the wider ones at smaller."""
    top = 1 << (batch - 1).bit_length()
    return top * 3 // 4 if batch <= top * 3 // 4 else top


class StepCosts:
    """Measured time of forwards of B rows by T tokens (batch sizes in buckets, `_bucket`): the
    median of the latest few of each shape, and from them what a wider forward costs relative
    to T = 1 (`relative`). A median, not an average: a step's time includes Python work and, in
    the server, whatever else the process did meanwhile (streaming out the last step's tokens, a
    request arriving), and a few slow steps must not decide. Plain steps are measured first:
    until they are, speculation counts as too dear. The first forward of each shape is not
    counted: it pays for warming up (buffers, kernels' plans)."""

    untried_ratio_per_token = 0.1
    keep = 9  # samples per shape
    refresh = 16  # recorded forwards between readings of the costs by relatives()

    def __init__(self):
        self.samples: dict[tuple[int, int], deque[float]] = {}  # (bucket, T) -> latest seconds
        self.seconds: dict[tuple[int, int], float] = {}  # (bucket, T) -> their median
        self.seen: set[tuple[int, int]] = set()  # shapes whose warm-up forward has run
        self._records = 0  # forwards recorded
        self._memo: dict[tuple, tuple[int, int, dict[int, float]]] = {}  # relatives() of late

    def record(self, batch: int, width: int, seconds: float) -> None:
        self._records += 1
        if (batch, width) not in self.seen:
            self.seen.add((batch, width))
            return
        key = (_bucket(batch), width)
        samples = self.samples.setdefault(key, deque(maxlen=self.keep))
        samples.append(seconds)
        self.seconds[key] = statistics.median(samples)

    def step(self, batch: int) -> float | None:
        """Seconds of a plain (T = 1) step of this many rows, once measured."""
        return self.seconds.get((_bucket(batch), 1))

    def relative(self, batch: int, width: int) -> float:
        """How many T = 1 steps a forward of `width` tokens per row costs: measured, or between
        two measured widths, interpolated; past the widest measured one, guessed as growing with
        the square root of the width (a wider forward costs less than its share while weights
        are read, and the guess is only kept until the width is tried); with no wider forward
        measured, taken to be cheap, so it gets tried."""
        return self.relatives(batch, [width])[width]

    def relatives(self, batch: int, widths) -> dict[int, float]:
        """`relative` of each of `widths`, the measured costs read once for all of them, and
        kept for the next `refresh` forwards recorded: asked at every step, they drift slowly,
        and reading them took a one-row step's few percent."""
        key = (_bucket(batch), tuple(widths))
        kept = self._memo.get(key)
        if kept is not None and kept[0] == len(self.seconds) and self._records - kept[1] < self.refresh:
            return kept[2]  # no shape measured since, and few forwards
        out = self._relatives(batch, key[1])
        self._memo[key] = (len(self.seconds), self._records, out)
        return out

    def _relatives(self, batch: int, widths) -> dict[int, float]:
        b, base = _bucket(batch), self.step(batch)
        if base is None:
            return {w: 1.0 if w == 1 else math.inf for w in widths}
        measured = {t: s / base for (bb, t), s in self.seconds.items() if bb == b}
        tried = sorted(measured)  # T = 1 is among them: base is not None
        out = {}
        for width in widths:
            if width == 1 or width in measured:
                out[width] = 1.0 if width == 1 else measured[width]
                continue
            i = bisect.bisect_left(tried, width)
            lo = tried[i - 1]
            if i < len(tried):
                hi = tried[i]
                out[width] = measured[lo] + (measured[hi] - measured[lo]) * (width - lo) / (hi - lo)
            elif lo == 1:
                out[width] = 1 + self.untried_ratio_per_token * (width - 1)
            else:
                out[width] = measured[lo] * math.sqrt(width / lo)
        return out

    def widest_to_try(self, batch: int) -> int:
        """The widest forward worth trying now at this batch size: twice the widest measured.
        Widths are tried a doubling at a time: a guess may be far off, and a wide forward that
        costs what it computes (a large batch) is dear to find out about."""
        b = _bucket(batch)
        return 2 * max((t for bb, t in self.seconds if bb == b), default=1)
