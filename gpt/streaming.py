"""Turning a stream of token ids into a stream of text, with stop strings.

Two problems make this harder than calling decode() per token:
  * a token may end in the middle of a multi-byte UTF-8 character, so its text
    is only known once the next token arrives (IncrementalDetokenizer);
  * a stop string may span several tokens, so text that could be the start of
    one must be held back until it is confirmed or ruled out (StopMatcher).
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable

from gpt.tokenizer import Tokenizer


class IncrementalDetokenizer:
    """Decode token ids one at a time without ever emitting half a character.

    Invariant: "".join(push(i) for i in ids) + flush() == tokenizer.decode(ids).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        # The stdlib incremental decoder buffers incomplete sequences and replaces
        # invalid bytes exactly like bytes.decode(errors="replace") would.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pieces: list[str] = []

    def push(self, token_id: int) -> str:
        """Feed one token; return the text it completes (possibly "")."""
        piece = self._decoder.decode(self.tokenizer.token_bytes(token_id))
        self._pieces.append(piece)
        return piece

    def flush(self) -> str:
        """End of stream: any dangling partial character becomes U+FFFD."""
        piece = self._decoder.decode(b"", final=True)
        self._pieces.append(piece)
        return piece

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._pieces)

    def fork(self) -> "IncrementalDetokenizer":
        """An independent copy, mid-character state included."""
        twin = IncrementalDetokenizer(self.tokenizer)
        twin._decoder.setstate(self._decoder.getstate())
        twin._pieces = [self.text]
        return twin


class StopMatcher:
    """Cut a text stream at the first stop string, which may span many pushes.

    The stream stops as soon as a stop string is complete, i.e. at the earliest
    point where one *ends* (generation cannot wait to see whether a longer stop
    string that started earlier would also have matched). What was emitted is
    then exactly the text before that occurrence; the stop string itself is not
    emitted, as in OpenAI's API.
    """

    def __init__(self, stops: str | Iterable[str] | None = None):
        if isinstance(stops, str):  # OpenAI allows a bare string as well as a list
            stops = [stops]
        self.stops: list[str] = list(dict.fromkeys(s for s in stops or () if s))
        # Every proper prefix of a stop string: a buffer ending in one of these
        # might turn into a match, so that tail must not be emitted yet.
        self._prefixes = {s[:k] for s in self.stops for k in range(1, len(s))}
        self._max_prefix = max((len(p) for p in self._prefixes), default=0)
        self._held = ""
        self.stopped = False
        self.matched: str | None = None

    @property
    def stop_reason(self) -> str | None:
        """The stop string that ended the stream, or None."""
        return self.matched

    def push(self, text: str) -> tuple[str, bool]:
        """Feed new text; return (text safe to emit now, stopped)."""
        if self.stopped:
            return "", True
        buf = self._held + text
        hit = self._first_match(buf)
        if hit is not None:
            start, stop = hit
            self.stopped, self.matched, self._held = True, stop, ""
            return buf[:start], True
        keep = self._held_back_len(buf)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        """End of stream without a stop: release whatever was held back."""
        held, self._held = self._held, ""
        return held

    def fork(self) -> "StopMatcher":
        """An independent copy (the stop strings themselves are shared: they never change)."""
        twin = object.__new__(StopMatcher)
        twin.__dict__.update(self.__dict__)
        return twin

    def _first_match(self, buf: str) -> tuple[int, str] | None:
        # The held-back part never contains a whole stop string (we would have
        # stopped already), so any match here ends in the new text. Pick the one
        # that ends first; on a tie, the longer one (it starts earlier).
        best: tuple[int, int, str] | None = None
        for stop in self.stops:
            start = buf.find(stop)
            if start < 0:
                continue
            key = (start + len(stop), start, stop)
            if best is None or key[:2] < best[:2]:
                best = key
        return None if best is None else (best[1], best[2])

    def _held_back_len(self, buf: str) -> int:
        # Longest suffix of buf that is a proper prefix of some stop string.
        for k in range(min(len(buf), self._max_prefix), 0, -1):
            if buf[-k:] in self._prefixes:
                return k
        return 0


class TextStream:
    """Token ids in, emit-ready text out: detokenization plus stop strings.

        stream = TextStream(tokenizer, stop=["\\n\\n"])
        for tok in tokens:
            piece, stopped = stream.push(tok)
            ...
            if stopped: break
        tail = stream.flush()
    """

    def __init__(self, tokenizer: Tokenizer, stop: str | Iterable[str] | None = None):
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.matcher = StopMatcher(stop)
        self._pieces: list[str] = []

    @property
    def stopped(self) -> bool:
        return self.matcher.stopped

    @property
    def matched(self) -> str | None:
        """The stop string that ended the stream, or None."""
        return self.matcher.matched

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._pieces)

    def fork(self) -> "TextStream":
        """An independent copy: beam search extends one hypothesis with several tokens."""
        twin = object.__new__(TextStream)
        twin.detokenizer, twin.matcher = self.detokenizer.fork(), self.matcher.fork()
        twin._pieces = [self.text]
        return twin

    def push(self, token_id: int) -> tuple[str, bool]:
        """Feed one token; return (text to emit now, stopped)."""
        if self.matcher.stopped:
            return "", True
        piece, stopped = self.matcher.push(self.detokenizer.push(token_id))
        self._pieces.append(piece)
        return piece, stopped

    def flush(self) -> str:
        """End of generation: the remaining text (a stop may still match in it)."""
        if self.matcher.stopped:
            return ""
        piece, stopped = self.matcher.push(self.detokenizer.flush())
        if not stopped:
            piece += self.matcher.flush()
        self._pieces.append(piece)
        return piece
