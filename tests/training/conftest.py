import pytest
from train_helpers import TINY, make_corpus

from training.trainer import train


@pytest.fixture
def corpus(tmp_path):
    return make_corpus(tmp_path / "corpus.txt")


@pytest.fixture
def run(tmp_path, corpus):
    """train() with the tiny settings; keyword arguments override them."""

    def _run(resume=False, **kw):
        if resume:  # a resumed run takes its settings from the checkpoint, except those given
            overrides = dict(kw)
            overrides.setdefault("out", str(tmp_path / "run"))
        else:
            overrides = dict(TINY, data=[str(corpus)], out=str(tmp_path / "run"))
            overrides.update(kw)
        return train(overrides, resume=resume)

    return _run
