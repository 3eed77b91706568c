"""The BPE tokenizer trained on the user's corpus: lossless, compact, and kept in the checkpoint."""

import json
import sysconfig
from pathlib import Path

import pytest
from test_tokenizer import TEXTS

import gpt
from gpt.bpe import TOKENIZER_FILE, BPETokenizer, train_bpe
from gpt.files import CheckpointError
from gpt.streaming import IncrementalDetokenizer
from gpt.tokenizer import EOT_TEXT, get_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def corpus() -> list[str]:
    names = ["argparse.py", "textwrap.py", "string.py", "shlex.py", "fnmatch.py", "glob.py"]
    return [(STDLIB / n).read_text(encoding="utf-8") for n in names]


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return train_bpe(corpus(), 1024)


def test_vocab_is_the_requested_size_with_end_of_text_last(bpe):
    assert bpe.vocab_size == 1024
    assert bpe.eot_token == 1023
    assert bpe.token_bytes(bpe.eot_token) == EOT_TEXT.encode()
    assert sorted(len(bpe.token_bytes(i)) for i in range(1023))[:256] == [1] * 256  # every byte is a token


@pytest.mark.parametrize("text", TEXTS + ["\x00\x7f\x80 control", "\ufeffbom", "x" * 5000])
def test_any_text_round_trips(bpe, text):
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert b"".join(bpe.token_bytes(i) for i in ids) == text.encode("utf-8")
    assert bpe.encode_batch([text, text]) == [ids, ids]


def test_streaming_detokenizer_rebuilds_text_split_inside_characters(bpe):
    text = "naïve 😀 中文 — done"
    detok = IncrementalDetokenizer(bpe)
    assert "".join(detok.push(i) for i in bpe.encode(text)) + detok.flush() == text


def test_code_from_unseen_files_takes_several_bytes_per_token(bpe):
    unseen = (STDLIB / "json" / "decoder.py").read_text(encoding="utf-8")
    assert len(unseen.encode()) / len(bpe.encode(unseen)) > 2.2  # bytes: 1; a 1,024-id BPE from six files
    assert len(bpe.encode("        return")) <= 2  # indentation and keywords are single tokens


def test_a_prompt_ending_in_a_newline_ends_on_a_token_boundary_seen_in_training(bpe):
    # the next line's indentation is a token of its own, so the prompt's ids are a prefix of
    # the ids of the text the model was trained on
    head, body = "    def test_x(self):\n", "        self.assertTrue(x)\n"
    assert bpe.encode(head + body)[: len(bpe.encode(head))] == bpe.encode(head)


def test_end_of_text_is_plain_text_unless_specials_are_allowed(bpe):
    text = f"a{EOT_TEXT}b"
    assert bpe.eot_token not in bpe.encode(text)
    assert bpe.decode(bpe.encode(text)) == text
    assert bpe.encode(text, allow_special=True) == bpe.encode("a") + [bpe.eot_token] + bpe.encode("b")


def test_training_is_deterministic_and_fingerprints_tell_tokenizers_apart(bpe):
    assert train_bpe(corpus(), 1024).to_json() == bpe.to_json()
    other = train_bpe(corpus()[:2], 1024)
    assert other.fingerprint != bpe.fingerprint
    assert get_tokenizer("byte").fingerprint == "byte"


def test_too_small_a_vocabulary_is_refused():
    with pytest.raises(ValueError, match="at least 257"):
        train_bpe(["abc"], 100)


def test_checkpoint_stores_the_tokenizer_and_load_gives_it_back(bpe, tmp_path):
    model = gpt.build_model(gpt.preset("gpt-tiny", vocab_size=bpe.vocab_size, tokenizer="bpe"))
    gpt.save(model, tmp_path / "ckpt", tokenizer=bpe)
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["tokenizer"] == "bpe"
    _, tok = gpt.load(tmp_path / "ckpt")
    assert isinstance(tok, BPETokenizer) and tok.to_json() == bpe.to_json()
    assert tok.encode("def f(x):\n    return x") == bpe.encode("def f(x):\n    return x")


def test_saving_a_bpe_model_without_its_tokenizer_is_refused(bpe, tmp_path):
    model = gpt.build_model(gpt.preset("gpt-tiny", vocab_size=bpe.vocab_size, tokenizer="bpe"))
    with pytest.raises(ValueError, match="tokenizer itself"):
        gpt.save(model, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("damage", ["missing", "garbage", "not-byte-level"])
def test_a_damaged_tokenizer_file_is_a_checkpoint_error(bpe, tmp_path, damage):
    model = gpt.build_model(gpt.preset("gpt-tiny", vocab_size=bpe.vocab_size, tokenizer="bpe"))
    path = gpt.save(model, tmp_path / "ckpt", tokenizer=bpe)
    f = path / TOKENIZER_FILE
    if damage == "missing":
        f.unlink()
    elif damage == "garbage":
        f.write_text("{not json")
    else:
        doc = json.loads(f.read_text())
        doc["model"]["vocab"]["☃"] = len(doc["model"]["vocab"])
        f.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="tokenizer"):
        gpt.load(path)


def test_bpe_by_name_alone_says_it_lives_in_a_checkpoint():
    with pytest.raises(ValueError, match="checkpoint"):
        get_tokenizer("bpe")
