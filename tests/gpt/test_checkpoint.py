"""Checkpoint directories: exact round trips, atomic replacement, no unpickling, clear errors."""

import json
import os
import pickle

import pytest
import safetensors.torch
import torch

from gpt.checkpoint import CheckpointError, atomic_write_bytes, load, load_checkpoint, save
from gpt.config import preset
from gpt.model import build_model

VARIANTS = {
    "gpt-tiny": preset("gpt-tiny"),
    "gpt-rotary-post-ln-untied": preset(
        "gpt-tiny", pos_encoding="rotary", norm="post", tie_embeddings=False, bias=False, d_ff=48
    ),
    "seq2seq-tiny": preset("seq2seq-tiny"),
    "seq2seq-separate-embeddings": preset(
        "seq2seq-tiny", share_embeddings=False, pos_encoding="sinusoidal", norm="post", activation="relu"
    ),
}


def _logits(model):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=g)
    with torch.no_grad():
        if model.config.arch == "gpt":
            return model(ids)
        return model(ids, ids[:, :7])


def _entries(parent):
    return sorted(p.name for p in parent.iterdir())


def _randomised(config):
    # Fresh init leaves biases zero and LayerNorm gains one; perturb everything so a parameter
    # that failed to load could not go unnoticed.
    model = build_model(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize("name", VARIANTS)
def test_round_trip_preserves_weights_logits_config_metadata_and_tokenizer(tmp_path, name):
    model = _randomised(VARIANTS[name])
    meta = {"step": 123, "loss": 1.5, "notes": ["a", "b"]}
    save(model, tmp_path / "ckpt", metadata=meta)

    loaded, config, got_meta = load_checkpoint(tmp_path / "ckpt")
    assert type(loaded) is type(model) and not loaded.training
    assert config == model.config and got_meta == meta
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    assert torch.equal(_logits(model), _logits(loaded))

    model2, tok = load(tmp_path / "ckpt")
    assert tok.name == "byte" and torch.equal(_logits(model2), _logits(model))


def test_tied_embeddings_are_stored_once_and_tied_again_on_load(tmp_path):
    model = _randomised(preset("gpt-tiny"))
    save(model, tmp_path / "c")
    stored = safetensors.torch.load_file(tmp_path / "c" / "model.safetensors")
    assert "lm_head.weight" not in stored and "transformer.wte.weight" in stored
    loaded, _, _ = load_checkpoint(tmp_path / "c")
    assert loaded.lm_head.weight is loaded.transformer.wte.weight

    untied = _randomised(preset("gpt-tiny", tie_embeddings=False))
    save(untied, tmp_path / "u")
    assert "lm_head.weight" in safetensors.torch.load_file(tmp_path / "u" / "model.safetensors")


def test_config_json_has_the_documented_layout_and_tokenizer_override(tmp_path):
    model = build_model(preset("gpt-tiny"))
    save(model, tmp_path / "c", tokenizer="gpt2", metadata={"run": "x"})
    header = json.loads((tmp_path / "c" / "config.json").read_text())
    assert header["format"] == "gpt-checkpoint" and header["version"] == 1
    assert header["tokenizer"] == "gpt2" and header["metadata"] == {"run": "x"}
    assert header["model"]["n_layer"] == 2
    _, config, _ = load_checkpoint(tmp_path / "c")
    assert config.tokenizer == "gpt2"
    _, tok = load(tmp_path / "c")
    assert tok.name == "gpt2"


def test_extra_files_are_written_inside_the_checkpoint(tmp_path):
    save(build_model(preset("gpt-tiny")), tmp_path / "c", extra_files={"trainer.safetensors": b"abc"})
    assert (tmp_path / "c" / "trainer.safetensors").read_bytes() == b"abc"
    with pytest.raises(ValueError, match="plain file name"):
        save(build_model(preset("gpt-tiny")), tmp_path / "d", extra_files={"../escape": b""})
    assert not (tmp_path / "d").exists()


def test_dtype_and_device_arguments_convert_the_loaded_model(tmp_path):
    model = _randomised(preset("gpt-tiny"))
    save(model.to(torch.bfloat16), tmp_path / "c")
    kept, _, _ = load_checkpoint(tmp_path / "c")
    assert kept.transformer.wte.weight.dtype == torch.bfloat16
    as32, _, _ = load_checkpoint(tmp_path / "c", dtype=torch.float32)
    assert as32.transformer.wte.weight.dtype == torch.float32
    assert torch.equal(as32.transformer.wte.weight.to(torch.bfloat16), model.transformer.wte.weight)


# --- atomicity ------------------------------------------------------------------------------


def test_saving_over_an_existing_checkpoint_replaces_it_and_leaves_no_temp_dirs(tmp_path):
    first, second = _randomised(preset("gpt-tiny")), _randomised(preset("gpt-tiny"))
    save(first, tmp_path / "c", metadata={"step": 1}, extra_files={"old.bin": b"x"})
    save(second, tmp_path / "c", metadata={"step": 2})
    loaded, _, meta = load_checkpoint(tmp_path / "c")
    assert meta == {"step": 2} and torch.equal(_logits(loaded), _logits(second))
    assert not (tmp_path / "c" / "old.bin").exists()
    assert _entries(tmp_path) == ["c"]
    for p in [tmp_path / "c", *(tmp_path / "c").iterdir()]:
        assert p.stat().st_mode & 0o044, p  # readable by others, unlike tempfile's private files


@pytest.mark.parametrize("fail_at", ["safetensors.torch.save_file", "os.replace", "os.rename"])
def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch, fail_at):
    first = _randomised(preset("gpt-tiny"))
    save(first, tmp_path / "c", metadata={"step": 1})
    before = {p.name: p.read_bytes() for p in (tmp_path / "c").iterdir()}

    def boom(*args, **kwargs):
        raise OSError("disk full")

    module, attr = fail_at.rsplit(".", 1)
    monkeypatch.setattr(__import__(module, fromlist=[attr]), attr, boom)
    with pytest.raises(OSError, match="disk full"):
        save(_randomised(preset("gpt-tiny")), tmp_path / "c", metadata={"step": 2})
    monkeypatch.undo()

    assert _entries(tmp_path) == ["c"]  # no temporary or set-aside directories left behind
    assert {p.name: p.read_bytes() for p in (tmp_path / "c").iterdir()} == before
    loaded, _, meta = load_checkpoint(tmp_path / "c")
    assert meta == {"step": 1} and torch.equal(_logits(loaded), _logits(first))


def test_a_failure_after_moving_the_old_checkpoint_aside_puts_it_back(tmp_path, monkeypatch):
    first = _randomised(preset("gpt-tiny"))
    save(first, tmp_path / "c")
    real_replace = os.replace

    def replace(src, dst):  # the final rename of the new directory into place fails
        if str(dst) == str(tmp_path / "c"):
            raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"):
        save(_randomised(preset("gpt-tiny")), tmp_path / "c")
    monkeypatch.undo()
    assert _entries(tmp_path) == ["c"]
    assert torch.equal(_logits(load_checkpoint(tmp_path / "c")[0]), _logits(first))


def test_save_refuses_to_replace_a_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "important.py").write_text("keep me")
    with pytest.raises(CheckpointError, match="refusing"):
        save(build_model(preset("gpt-tiny")), tmp_path / "src")
    assert (tmp_path / "src" / "important.py").read_text() == "keep me"


def test_atomic_write_bytes_replaces_whole_files_and_cleans_up_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "state.bin"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert target.stat().st_mode & 0o044  # readable by others like any file, not tempfile's 0600

    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("nope")))
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"three")
    monkeypatch.undo()
    assert target.read_bytes() == b"two" and _entries(tmp_path) == ["state.bin"]


# --- safety and errors ----------------------------------------------------------------------


def test_loading_never_unpickles(tmp_path, monkeypatch):
    save(_randomised(preset("gpt-tiny")), tmp_path / "c")

    def forbidden(*args, **kwargs):
        raise AssertionError("unpickling during checkpoint load")

    for mod, attr in [(pickle, "loads"), (pickle, "load"), (pickle, "Unpickler"), (torch, "load")]:
        monkeypatch.setattr(mod, attr, forbidden)
    model, tok = load(tmp_path / "c")
    assert model is not None and tok.name == "byte"


def _saved(tmp_path, **overrides):
    save(_randomised(preset("gpt-tiny", **overrides)), tmp_path / "c")
    return tmp_path / "c"


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint directory") as e:
        load_checkpoint(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value)
    with pytest.raises(CheckpointError, match="nope"):
        load(tmp_path / "nope")


def test_missing_config_json_is_a_clear_error(tmp_path):
    path = _saved(tmp_path)
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json: missing"):
        load(path)


def test_missing_weights_file_is_a_clear_error(tmp_path):
    path = _saved(tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors: missing"):
        load_checkpoint(path)


def test_truncated_weights_file_is_a_clear_error(tmp_path):
    path = _saved(tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read safetensors"):
        load_checkpoint(path)


def test_invalid_json_is_a_clear_error(tmp_path):
    path = _saved(tmp_path)
    (path / "config.json").write_text('{"format": "gpt-checkpoint", ')
    with pytest.raises(CheckpointError, match="config.json: invalid JSON"):
        load_checkpoint(path)


def _edit_config(path, **model_changes):
    header = json.loads((path / "config.json").read_text())
    header["model"].update(model_changes)
    (path / "config.json").write_text(json.dumps(header))


def test_config_whose_shapes_do_not_match_the_weights_is_a_clear_error(tmp_path):
    path = _saved(tmp_path)
    _edit_config(path, vocab_size=100)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert str(e.value) == (
        f"{path / 'model.safetensors'}: transformer.wte.weight has shape (257, 32), "
        f"config.json says (100, 32)"
    )


def test_config_with_more_layers_than_the_weights_names_the_missing_tensors(tmp_path):
    path = _saved(tmp_path)
    _edit_config(path, n_layer=3)
    with pytest.raises(
        CheckpointError, match=r"model.safetensors: missing tensors transformer\.h\.2\.ln_1\.weight"
    ):
        load_checkpoint(path)


def test_config_with_fewer_layers_than_the_weights_names_the_unexpected_tensors(tmp_path):
    path = _saved(tmp_path)
    _edit_config(path, n_layer=1)
    with pytest.raises(CheckpointError, match=r"model.safetensors: unexpected tensors transformer\.h\.1\."):
        load_checkpoint(path)


def test_invalid_model_config_and_unknown_format_are_clear_errors(tmp_path):
    path = _saved(tmp_path)
    _edit_config(path, n_head=5)
    with pytest.raises(CheckpointError, match="config.json: bad model config.*divisible"):
        load_checkpoint(path)
    (path / "config.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError, match="config.json: not a gpt-checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="expected a gpt-checkpoint checkpoint or a Hugging Face GPT-2"):
        load(path)


def test_a_newer_format_version_is_refused(tmp_path):
    path = _saved(tmp_path)
    header = json.loads((path / "config.json").read_text())
    header["version"] = 99
    (path / "config.json").write_text(json.dumps(header))
    with pytest.raises(CheckpointError, match="unsupported version 99"):
        load_checkpoint(path)


def test_a_missing_local_path_that_is_not_a_hub_name_does_not_try_the_network(tmp_path, monkeypatch):
    import gpt.checkpoint as ckpt

    monkeypatch.setattr(ckpt, "_download_from_hub", lambda name: pytest.fail("tried to download"))
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    for name in ["runs/missing", "./gpt2", str(tmp_path / "gpt2"), "a/b/c"]:
        with pytest.raises(CheckpointError, match="no such checkpoint directory"):
            load(name)


def test_a_hub_name_is_handed_to_the_downloader(tmp_path, monkeypatch):
    import gpt.checkpoint as ckpt

    save(_randomised(preset("gpt-tiny")), tmp_path / "snapshot")
    asked = []
    monkeypatch.setattr(ckpt, "_download_from_hub", lambda name: asked.append(name) or tmp_path / "snapshot")
    monkeypatch.chdir(tmp_path)
    model, _ = load("openai-community/gpt2")
    assert asked == ["openai-community/gpt2"] and model.config.n_layer == 2


def test_a_run_directory_finds_its_best_then_latest_checkpoint_and_names_itself(tmp_path):
    import gpt
    from gpt.checkpoint import find_checkpoint, run_name

    run = tmp_path / "default"
    gpt.save(gpt.GPT(gpt.preset("gpt-tiny")), run / "latest")
    assert find_checkpoint(run) == run / "latest"
    gpt.save(gpt.GPT(gpt.preset("gpt-tiny")), run / "best")
    assert find_checkpoint(run) == run / "best"
    assert run_name(run) == run_name(run / "best") == run_name(run / "latest") == "default"
    assert find_checkpoint(run / "best") == run / "best"
    assert run_name(tmp_path / "elsewhere") == "elsewhere"
