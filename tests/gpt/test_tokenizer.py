import pytest
import tiktoken
import tiktoken.load
import tiktoken.registry

from gpt.tokenizer import ByteTokenizer, TiktokenTokenizer, Tokenizer, get_tokenizer

TEXTS = [
    "",
    "Hello world",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew\r\nlines\n\n\n",
    "naïve café — “quotes” and ünïcödé",
    "emoji 😀🎉👩‍👩‍👧 and flags 🇫🇷",
    "中文字符和日本語のテキスト、한국어",
    "code: def f(x):\n    return x**2  # it's fine, isn't it?",
    "numbers 1234567890 3.14159 -42",
]


@pytest.fixture(scope="module")
def gpt2() -> Tokenizer:
    return get_tokenizer("gpt2")


def test_gpt2_encodes_hello_world_to_known_ids(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]


def test_gpt2_eot_is_50256_and_vocab_is_50257(gpt2):
    assert gpt2.eot_token == 50256
    assert gpt2.vocab_size == 50257
    assert gpt2.name == "gpt2"
    assert gpt2.token_bytes(50256) == b"<|endoftext|>"


@pytest.mark.parametrize("text", TEXTS)
def test_gpt2_round_trips_text(gpt2, text):
    ids = gpt2.encode(text)
    assert gpt2.decode(ids) == text
    assert gpt2.decode_bytes(ids) == text.encode("utf-8")
    assert b"".join(gpt2.token_bytes(i) for i in ids) == text.encode("utf-8")


def test_special_token_text_is_ordinary_text_by_default(gpt2):
    ids = gpt2.encode("a<|endoftext|>b")
    assert gpt2.eot_token not in ids
    assert gpt2.decode(ids) == "a<|endoftext|>b"


def test_special_token_text_maps_to_eot_with_allow_special(gpt2):
    ids = gpt2.encode("a<|endoftext|>b", allow_special=True)
    assert ids == gpt2.encode("a") + [50256] + gpt2.encode("b")
    assert gpt2.decode(ids) == "a<|endoftext|>b"


def test_encode_batch_matches_encode(gpt2):
    texts = TEXTS + ["x<|endoftext|>y"]
    assert gpt2.encode_batch(texts) == [gpt2.encode(t) for t in texts]
    assert gpt2.encode_batch(texts, allow_special=True) == [gpt2.encode(t, allow_special=True) for t in texts]


def test_decode_replaces_invalid_utf8(gpt2):
    # "😀" is 4 bytes split over several gpt2 tokens; dropping the last one leaves a broken char.
    ids = gpt2.encode("😀")
    assert len(ids) > 1
    assert gpt2.decode(ids[:-1]).endswith("\ufffd")


@pytest.mark.parametrize("bad", [-1, 50257, 10**9])
def test_decode_rejects_out_of_range_id(gpt2, bad):
    with pytest.raises(ValueError, match="out of range"):
        gpt2.decode([15496, bad])
    with pytest.raises(ValueError, match="out of range"):
        gpt2.token_bytes(bad)


def test_byte_tokenizer_round_trips_and_has_eot_256():
    tok = get_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer)
    assert (tok.eot_token, tok.vocab_size, tok.name) == (256, 257, "byte")
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids) == text


def test_byte_tokenizer_special_text_only_with_allow_special():
    tok = ByteTokenizer()
    assert 256 not in tok.encode("hi<|endoftext|>")
    assert tok.encode("hi<|endoftext|>", allow_special=True) == [104, 105, 256]
    assert tok.decode([104, 105, 256]) == "hi<|endoftext|>"
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([257])


def test_unknown_tokenizer_name_lists_known_options():
    with pytest.raises(ValueError, match="gpt2.*byte"):
        get_tokenizer("no-such-tokenizer")


def test_tokenizer_repr_names_class_and_vocab(gpt2):
    assert repr(gpt2) == "TiktokenTokenizer(name='gpt2', vocab_size=50257, eot_token=50256)"
    assert "ByteTokenizer" in repr(ByteTokenizer())


def test_tiktoken_load_failure_is_a_clear_value_error(monkeypatch):
    # Simulate an offline machine without the cached blob: must not try the network.
    def offline(blobpath: str) -> bytes:
        raise OSError(f"offline: {blobpath}")

    monkeypatch.setattr(tiktoken.load, "read_file", offline)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # no cache -> straight to read_file
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    with pytest.raises(ValueError, match="cannot load tiktoken encoding 'r50k_base'"):
        TiktokenTokenizer("r50k_base")


def test_bundled_gpt2_matches_tiktokens_own_when_cached(gpt2, monkeypatch):
    # Only compares when tiktoken already has gpt2 in its local cache; never downloads.
    def offline(blobpath: str) -> bytes:
        raise OSError("not cached")

    monkeypatch.setattr(tiktoken.load, "read_file", offline)
    try:
        reference = tiktoken.get_encoding("gpt2")
    except Exception:
        pytest.skip("tiktoken's gpt2 files are not cached locally")
    assert gpt2.vocab_size == reference.n_vocab
    assert gpt2.enc._mergeable_ranks == reference._mergeable_ranks
    for text in TEXTS + ["a<|endoftext|>b"]:
        assert gpt2.encode(text) == reference.encode_ordinary(text)
        assert gpt2.encode(text, allow_special=True) == reference.encode(text, allowed_special="all")
