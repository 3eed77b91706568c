"""Turning a stream of token ids into a stream of text, with stop strings.

Two problems make this harder than calling decode() per token:
  * a token may end in the middle of a multi-byte UTF-8 character, so its text
    is only known once the next token arrives (IncrementalDetokenizer);
  * a stop string may span several tokens, so text that could be the start of
    one must be held back until it is confirmed or ruled out (StopMatcher).
"""

from __future__ import annotations

import codecs
import functools
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

    def fork(self) -> IncrementalDetokenizer:
        """An independent copy, mid-character state included."""
        twin = IncrementalDetokenizer(self.tokenizer)
        twin._decoder.setstate(self._decoder.getstate())
        twin._pieces = [self.text]
        return twin


@functools.lru_cache(maxsize=256)
def _failure(stop: str) -> tuple[int, ...]:
    """Knuth-Morris-Pratt's failure function: fail[i] is the length of the longest proper prefix
    of stop[:i + 1] that is also a suffix of it."""
    fail = [0] * len(stop)
    k = 0
    for i in range(1, len(stop)):
        while k and stop[i] != stop[k]:
            k = fail[k - 1]
        if stop[i] == stop[k]:
            k += 1
        fail[i] = k
    return tuple(fail)


class StopMatcher:
    """Cut a text stream at the first stop string, which may span many pushes.

    The stream stops as soon as a stop string is complete, i.e. at the earliest
    point where one *ends* (generation cannot wait to see whether a longer stop
    string that started earlier would also have matched). What was emitted is
    then exactly the text before that occurrence; the stop string itself is not
    emitted, as in OpenAI's API.

    Each stop string is matched by a Knuth-Morris-Pratt automaton whose state is how much
    of the stop string the text ends with; the longest such partial match is what must be
    held back. Memory and set-up are linear in the stop strings' length, and each new
    character costs amortized O(1) per stop string, however long the stop strings are.
    """

    def __init__(self, stops: str | Iterable[str] | None = None):
        if isinstance(stops, str):  # OpenAI allows a bare string as well as a list
            stops = [stops]
        self.stops: list[str] = list(dict.fromkeys(s for s in stops or () if s))
        self._fail = [_failure(s) for s in self.stops]
        self._state = [0] * len(self.stops)  # characters of each stop string the text ends with
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
        if not self.stops:
            return buf, False
        base = len(self._held)
        state, stops, fails = self._state, self.stops, self._fail
        for i, ch in enumerate(text):
            done = None
            for j, stop in enumerate(stops):
                k, fail = state[j], fails[j]
                while k and stop[k] != ch:
                    k = fail[k - 1]
                if stop[k] == ch:
                    k += 1
                state[j] = k
                # ends here; on a tie, the longer one (it starts earlier)
                if k == len(stop) and (done is None or len(stop) > len(done)):
                    done = stop
            if done is not None:
                end = base + i + 1
                self.stopped, self.matched, self._held = True, done, ""
                return buf[: end - len(done)], True
        keep = max(state)  # the longest partial match: it may still become a stop string
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """End of stream without a stop: release whatever was held back."""
        held, self._held = self._held, ""
        self._state = [0] * len(self.stops)
        return held

    def fork(self) -> StopMatcher:
        """An independent copy (the stop strings and their tables are shared: they never change)."""
        twin = object.__new__(StopMatcher)
        twin.__dict__.update(self.__dict__)
        twin._state = list(self._state)
        return twin


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

    def fork(self) -> TextStream:
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
