import random

import pytest

from gpt.streaming import IncrementalDetokenizer, StopMatcher, TextStream
from gpt.tokenizer import ByteTokenizer, Tokenizer, get_tokenizer

EMOJI_TEXT = "héllo 😀🎉 wörld 👩‍👩‍👧 中文 🇫🇷 ✓ end"


@pytest.fixture(scope="module")
def gpt2() -> Tokenizer:
    return get_tokenizer("gpt2")


def stream_all(tok: Tokenizer, ids: list[int]) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push(i) for i in ids]
    tail = detok.flush()
    assert detok.text == "".join(pieces) + tail
    return pieces, tail


def without_incomplete_tail(data: bytes) -> str:
    """Decode the longest prefix of valid UTF-8 whose only defect is a cut-off last char."""
    for cut in range(len(data), max(len(data) - 4, -1), -1):
        try:
            return data[:cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
    raise AssertionError(f"not a valid UTF-8 prefix: {data!r}")


# ---------------------------------------------------------------- detokenizer


def test_detokenizer_joins_to_decode_for_random_bytes_with_invalid_utf8():
    tok = ByteTokenizer()
    rng = random.Random(0)
    for _ in range(300):
        # Bias towards lead/continuation bytes so broken and truncated sequences are common.
        pool = list(range(0x80, 0x100)) * 3 + list(range(0x20, 0x7F)) + [tok.eot_token]
        ids = [rng.choice(pool) for _ in range(rng.randint(0, 25))]
        pieces, tail = stream_all(tok, ids)
        assert "".join(pieces) + tail == tok.decode(ids)


def test_detokenizer_joins_to_decode_for_random_gpt2_ids(gpt2):
    rng = random.Random(1)
    for _ in range(200):
        ids = [rng.randrange(gpt2.vocab_size) for _ in range(rng.randint(0, 20))]
        pieces, tail = stream_all(gpt2, ids)
        assert "".join(pieces) + tail == gpt2.decode(ids)


def test_detokenizer_never_emits_half_a_character(gpt2):
    ids = gpt2.encode(EMOJI_TEXT)
    # Sanity: this text really does have tokens that end mid-character.
    assert any(gpt2.decode([i]).endswith("\ufffd") for i in ids)
    detok = IncrementalDetokenizer(gpt2)
    emitted = ""
    for n, i in enumerate(ids, 1):
        emitted += detok.push(i)
        assert "\ufffd" not in emitted
        assert emitted == without_incomplete_tail(gpt2.decode_bytes(ids[:n]))
    assert detok.flush() == ""
    assert emitted == EMOJI_TEXT


def test_detokenizer_flush_replaces_a_dangling_partial_character():
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok)
    assert detok.push(ord("a")) == "a"
    assert detok.push(0xF0) == ""  # first byte of a 4-byte char: held
    assert detok.push(0x9F) == ""
    assert detok.flush() == "\ufffd"
    assert detok.text == tok.decode([ord("a"), 0xF0, 0x9F])


def test_detokenizer_streams_eot_as_its_text(gpt2):
    ids = gpt2.encode("hi") + [gpt2.eot_token]
    pieces, tail = stream_all(gpt2, ids)
    assert "".join(pieces) + tail == "hi<|endoftext|>"


# ---------------------------------------------------------------- stop matcher


def test_stop_split_across_pushes_is_found():
    m = StopMatcher(["o W"])
    assert m.push("Hel") == ("Hel", False)
    assert m.push("lo Wo") == ("l", True)
    assert m.push("rld") == ("", True)
    assert m.matched == m.stop_reason == "o W"
    assert m.flush() == ""


def test_possible_stop_prefix_is_held_until_disambiguated():
    m = StopMatcher(["STOP"])
    assert m.push("abc ST") == ("abc ", False)  # "ST" might start "STOP"
    assert m.push("O") == ("", False)
    assert m.push("RM") == ("STORM", False)  # ruled out: released in full
    assert m.push("S") == ("", False)
    assert m.flush() == "S"
    assert m.matched is None


def test_earliest_of_several_stops_wins():
    m = StopMatcher(["world", "lo", "xyz"])
    assert m.push("hello world") == ("hel", True)
    assert m.matched == "lo"

    m = StopMatcher(["END", "\n"])
    out = [m.push(c) for c in "one\ntwo END"]
    assert "".join(p for p, _ in out) == "one"
    assert m.matched == "\n"


def test_overlapping_prefix_stop_is_still_found():
    # After "aa" the held "aa" fails to become "aab", but its suffix "a" + "ab" does.
    m = StopMatcher(["aab"])
    assert m.push("a") == ("", False)
    assert m.push("a") == ("", False)
    assert m.push("a") == ("a", False)
    assert m.push("b") == ("", True)
    assert m.matched == "aab"


def test_no_stop_flush_returns_held_text():
    m = StopMatcher(["</s>"])
    assert m.push("text </") == ("text ", False)
    assert m.flush() == "</"
    assert not m.stopped


def test_no_stops_passes_text_straight_through():
    for stops in (None, [], [""]):
        m = StopMatcher(stops)
        assert m.push("anything <") == ("anything <", False)
        assert m.flush() == ""


def test_bare_string_is_a_single_stop():
    m = StopMatcher("\n\n")
    assert m.push("a\n\nb") == ("a", True)


def test_stop_completing_first_wins_over_longer_stop_started_earlier():
    # Generation halts as soon as any stop is complete; it can't wait to see
    # whether "abcd" would have matched too. Same result however text is chunked.
    for chunks in (["abcd"], ["ab", "cd"], ["a", "b", "c", "d"]):
        m = StopMatcher(["abcd", "bc"])
        out = "".join(m.push(c)[0] for c in chunks)
        assert (out, m.matched) == ("a", "bc")


def reference_truncate(text: str, stops: list[str]) -> tuple[str, str | None]:
    """Char-by-char reference: stop at the first position where any stop ends."""
    stops = [s for s in stops if s]
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text.endswith(s, 0, end)]
        if done:
            stop = max(done, key=len)  # the one that started earliest
            return text[: end - len(stop)], stop
    return text, None


def random_chunks(rng: random.Random, text: str) -> list[str]:
    chunks, i = [], 0
    while i < len(text):
        n = rng.choice([0, 1, 1, 2, 3, 5])  # empty pushes are allowed too
        chunks.append(text[i : i + n])
        i += n
    return chunks


def test_stop_matcher_output_equals_truncated_text_for_random_chunkings():
    rng = random.Random(2)
    alphabet = "ab c\n"
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        stops = []
        for _ in range(rng.randint(0, 3)):
            if text and rng.random() < 0.8:
                i = rng.randrange(len(text))
                stops.append(text[i : i + rng.randint(1, 4)])
            else:
                stops.append("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 3))))
        expected, expected_stop = reference_truncate(text, stops)

        m = StopMatcher(stops)
        emitted, stopped = [], False
        for chunk in random_chunks(rng, text):
            piece, stopped = m.push(chunk)
            emitted.append(piece)
            # Never emit anything past where the output is allowed to go.
            assert expected.startswith("".join(emitted))
        if not stopped:
            emitted.append(m.flush())
        assert "".join(emitted) == expected, (text, stops)
        assert stopped == (expected_stop is not None)
        assert m.matched == expected_stop


# ---------------------------------------------------------------- text stream


def test_text_stream_stops_on_string_spanning_tokens(gpt2):
    text = "The answer is 42.\n\nQ: next question"
    stream = TextStream(gpt2, stop=["\n\nQ:"])
    emitted, stopped = "", False
    for tok in gpt2.encode(text):
        piece, stopped = stream.push(tok)
        emitted += piece
        if stopped:
            break
    assert stopped and stream.stopped
    assert emitted == "The answer is 42."
    assert stream.matched == "\n\nQ:"
    assert stream.flush() == ""
    assert stream.text == emitted


def test_text_stream_without_stop_reproduces_decode(gpt2):
    ids = gpt2.encode(EMOJI_TEXT)
    stream = TextStream(gpt2, stop=["never appears"])
    pieces = [stream.push(i)[0] for i in ids]
    assert "".join(pieces) + stream.flush() == EMOJI_TEXT
    assert not stream.stopped and stream.matched is None


def test_text_stream_flush_can_still_match_a_stop():
    tok = ByteTokenizer()
    stream = TextStream(tok, stop=["x\ufffd"])
    assert stream.push(ord("a")) == ("a", False)
    assert stream.push(ord("x")) == ("", False)
    assert stream.push(0xE2) == ("", False)  # dangling lead byte -> U+FFFD on flush
    assert stream.flush() == ""
    assert stream.stopped and stream.matched == "x\ufffd"
    assert stream.text == "a"


def test_long_stop_strings_cost_memory_linear_in_their_length():
    # 16 stop strings of 20,000 characters: a matcher that kept every prefix would hold ~3 GB.
    import tracemalloc

    rng = random.Random(5)
    stops = ["".join(rng.choice("ab") for _ in range(20_000)) for _ in range(16)]
    tracemalloc.start()
    try:
        m = StopMatcher(stops)
        text = stops[3][:19_999]  # all but the last character: held back, not emitted
        assert m.push(text) == ("", False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2**20
    assert m.push(stops[3][-1]) == ("", True) and m.matched == stops[3]
