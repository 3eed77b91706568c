"""Saving and loading models: our own checkpoint directories, plus Hugging Face GPT-2 ones.

A checkpoint is a directory:
  config.json        {"format": "gpt-checkpoint", "version": 1, "model": {...ModelConfig...},
                      "tokenizer": "gpt2", "metadata": {...}}
  model.safetensors  the weights; a tied output projection is stored once, as the embedding
  (anything else)    files the caller adds, e.g. the trainer's optimizer state

Weights are only ever read with safetensors, so loading a checkpoint cannot run code the way
unpickling can. Saving is atomic: the directory is written under a temporary name next to its
destination and renamed into place, so `path` holds either the old checkpoint or the new one.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Union

import safetensors.torch
import torch
import torch.nn as nn

from .config import ModelConfig
from .model import build_model
from .tokenizer import Tokenizer, get_tokenizer

FORMAT = "gpt-checkpoint"
VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not match its config."""


# --- atomic writes ---------------------------------------------------------------------------

# tempfile creates private (0600/0700) files and directories; published checkpoints should get
# the permissions an ordinary write would, so a server running as another user can read them.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _fsync_path(path: Path) -> None:
    # Directories must be fsynced too, or a crash can lose the rename that published a file.
    # Windows cannot open a directory for that, and does not need it.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if path.is_dir():
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write `data` to `path` so that readers see the old file or the new one, never a part.

    The bytes go to a temporary file in the same directory (a rename is only atomic within one
    filesystem), are fsynced, and then replace `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_path(path.parent)
    return path


def _looks_replaceable(path: Path) -> bool:
    # Only ever delete what is plausibly a previous checkpoint: saving to the wrong path
    # (a home directory, a source tree) must not wipe it.
    return path.is_dir() and (not any(path.iterdir()) or (path / CONFIG_FILE).is_file())


@contextmanager
def atomic_directory(path: PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory; when the block finishes, it replaces `path`.

    If the block raises, the temporary directory is removed and `path` is left untouched.
    An existing `path` is renamed aside, the new directory renamed in, and only then is the old
    one deleted; the two renames are each atomic, and a crash between them leaves the old
    checkpoint intact under `.{name}.old-*` next to `path`."""
    path = Path(path)
    if path.exists() and not _looks_replaceable(path):
        raise CheckpointError(f"{path}: refusing to replace it, it exists and does not look like a "
                              f"checkpoint directory (no {CONFIG_FILE})")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~_UMASK)
        yield tmp
        for f in tmp.iterdir():
            if f.is_file():
                os.chmod(f, 0o666 & ~_UMASK)  # safetensors writes its files private
            _fsync_path(f)
        _fsync_path(tmp)
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{secrets.token_hex(4)}"
            os.rename(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:
                os.rename(old, path)  # put the previous checkpoint back
            raise
        _fsync_path(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --- tensors <-> model ---------------------------------------------------------------------

def tied_names(model: nn.Module) -> dict[str, str]:
    """{alias: name} for state-dict entries that are the same tensor as an earlier entry, e.g.
    lm_head.weight -> transformer.wte.weight when the embeddings are tied."""
    seen: dict[tuple, str] = {}
    aliases = {}
    for name, t in model.state_dict(keep_vars=True).items():
        key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if t.numel() and key in seen:
            aliases[name] = seen[key]
        else:
            seen.setdefault(key, name)
    return aliases


def _shape(t) -> str:
    return "(" + ", ".join(str(s) for s in t) + ")"


def _list(names: list[str], limit: int = 5) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_tensors_into(model: nn.Module, tensors: dict[str, torch.Tensor], source: PathLike,
                      config_file: str = CONFIG_FILE) -> None:
    """Copy `tensors` into the model, insisting on exactly the expected names and shapes.

    `source` (the weights file) names the culprit in errors. Tied aliases must be absent, as
    they are filled from the tensor they share."""
    aliases = tied_names(model)
    expected = {k: v for k, v in model.state_dict().items() if k not in aliases}
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing:
        raise CheckpointError(f"{source}: missing tensor{'s' if len(missing) > 1 else ''} {_list(missing)}")
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor{'s' if len(unexpected) > 1 else ''} "
                              f"{_list(unexpected)}")
    for k, want in expected.items():
        if tuple(tensors[k].shape) != tuple(want.shape):
            raise CheckpointError(f"{source}: {k} has shape {_shape(tensors[k].shape)}, "
                                  f"{config_file} says {_shape(want.shape)}")
        if not (tensors[k].is_floating_point() or tensors[k].dtype == want.dtype):
            raise CheckpointError(f"{source}: {k} has dtype {tensors[k].dtype}, expected {want.dtype}")
    full = dict(tensors)
    full.update({alias: tensors[name] for alias, name in aliases.items()})
    with torch.no_grad():
        model.load_state_dict(full, strict=True)


def _stored_dtype(tensors: dict[str, torch.Tensor]) -> Optional[torch.dtype]:
    return next((t.dtype for t in tensors.values() if t.is_floating_point()), None)


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file on the CPU, with any failure as a CheckpointError."""
    if not file.is_file():
        raise CheckpointError(f"{file}: missing weights file")
    try:
        return safetensors.torch.load_file(str(file), device="cpu")
    except Exception as e:  # SafetensorError for truncated/corrupt files, OSError, ...
        raise CheckpointError(f"{file}: cannot read safetensors weights, the file is truncated or "
                              f"corrupt ({type(e).__name__}: {e})") from e


def read_json(file: Path) -> dict:
    """A JSON object from `file`, with any failure as a CheckpointError naming it."""
    if not file.is_file():
        hint = ""
        if not file.parent.exists():
            leftovers = sorted(file.parent.parent.glob(f".{file.parent.name}.old-*"))
            if leftovers:
                hint = f"; an interrupted save left the previous checkpoint at {leftovers[-1]}"
            raise CheckpointError(f"{file.parent}: no such checkpoint directory{hint}")
        raise CheckpointError(f"{file}: missing (not a checkpoint directory?)")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: invalid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


# --- our checkpoints -------------------------------------------------------------------------

def save(model: nn.Module, path: PathLike, *, tokenizer: Optional[str] = None,
         metadata: Optional[dict] = None, extra_files: Optional[dict[str, bytes]] = None) -> Path:
    """Save `model` as a checkpoint directory at `path`, atomically replacing any previous one.

    tokenizer: the tokenizer name to record (default: model.config.tokenizer).
    metadata: JSON-serialisable facts to keep with it (step, loss, data, ...).
    extra_files: {file name: bytes} written into the same directory, e.g. trainer state."""
    config: ModelConfig = model.config
    tokenizer = tokenizer or config.tokenizer
    model_dict = config.to_dict()
    model_dict["tokenizer"] = tokenizer  # one answer to "which tokenizer", wherever it is read
    header = {"format": FORMAT, "version": VERSION, "model": model_dict, "tokenizer": tokenizer,
              "metadata": dict(metadata or {})}
    # Serialise before touching the disk, so bad metadata fails without leaving anything behind.
    config_bytes = (json.dumps(header, indent=2, sort_keys=False) + "\n").encode("utf-8")
    extra_files = dict(extra_files or {})
    for name in extra_files:
        if name in (CONFIG_FILE, WEIGHTS_FILE) or not name or Path(name).name != name or name.startswith("."):
            raise ValueError(f"extra file name {name!r} must be a plain file name other than "
                             f"{CONFIG_FILE} and {WEIGHTS_FILE}")
    aliases = tied_names(model)
    # safetensors refuses tensors that share memory, so tied weights are stored once.
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k not in aliases}

    path = Path(path)
    with atomic_directory(path) as tmp:
        safetensors.torch.save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_bytes(config_bytes)
        for name, data in extra_files.items():
            (tmp / name).write_bytes(data)
    return path


def load_checkpoint(path: PathLike, *, device="cpu", dtype: Optional[torch.dtype] = None
                    ) -> tuple[nn.Module, ModelConfig, dict]:
    """Load a checkpoint directory: (model in eval mode, its config, its metadata).

    dtype: convert the weights to it; None keeps the dtype they were saved in."""
    path = Path(path)
    config_file = path / CONFIG_FILE
    header = read_json(config_file)
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{config_file}: not a {FORMAT} config (format is {header.get('format')!r})")
    version = header.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise CheckpointError(f"{config_file}: unsupported version {version!r}; this code reads "
                              f"version {VERSION} or older")
    try:
        model_dict = dict(header["model"])
        if isinstance(header.get("tokenizer"), str):
            model_dict["tokenizer"] = header["tokenizer"]
        config = ModelConfig.from_dict(model_dict)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{config_file}: bad model config ({type(e).__name__}: {e})") from e
    metadata = header.get("metadata") or {}

    tensors = read_safetensors(path / WEIGHTS_FILE)
    model = build_model(config)
    load_tensors_into(model, tensors, path / WEIGHTS_FILE)
    model.to(device=device, dtype=dtype or _stored_dtype(tensors))
    return model.eval(), config, metadata


# --- the public loader -----------------------------------------------------------------------

HUB_FILES = ["config.json", "model.safetensors", "pytorch_model.bin"]
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def _is_hf_gpt2(header: dict) -> bool:
    return header.get("model_type") == "gpt2" or any(
        a in ("GPT2LMHeadModel", "GPT2Model") for a in header.get("architectures") or [])


def _looks_like_hub_name(name: str) -> bool:
    # "gpt2" or "openai-community/gpt2"; but "runs/ckpt" is a mistyped local path when "runs" exists.
    return bool(_HUB_NAME.match(name)) and not (("/" in name) and Path(name.split("/")[0]).exists())


def _download_from_hub(repo_id: str) -> Path:
    """Fetch a Hugging Face GPT-2 from the hub (needs network and `huggingface_hub`)."""
    try:
        import huggingface_hub
    except ImportError:
        raise CheckpointError(f"{repo_id}: no such local directory; to download it from the Hugging Face "
                              f"hub, `pip install huggingface_hub`, or pass a local directory") from None
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as e:
        raise CheckpointError(f"{repo_id}: no such local directory, and downloading it from the Hugging "
                              f"Face hub failed ({type(e).__name__}: {e})") from e


def load(path: PathLike, *, device="cpu", dtype: Optional[torch.dtype] = None) -> tuple[nn.Module, Tokenizer]:
    """Load a model and its tokenizer from any supported source:

    - a checkpoint directory written by `save`;
    - a Hugging Face GPT-2 directory (config.json + model.safetensors or pytorch_model.bin);
    - a Hugging Face hub name such as "gpt2" or "openai-community/gpt2", when no such local path
      exists (downloads: needs network and `pip install huggingface_hub`).

    The model comes back in eval mode on `device`; dtype None keeps the stored dtype."""
    from .hf import load_hf_gpt2  # hf imports this module

    p = Path(path)
    if not p.exists() and _looks_like_hub_name(str(path)):
        p = _download_from_hub(str(path))
    if p.exists() and not p.is_dir():
        raise CheckpointError(f"{p}: is a file; expected a checkpoint directory")
    header = read_json(p / CONFIG_FILE)
    if header.get("format") == FORMAT:
        model, config, _ = load_checkpoint(p, device=device, dtype=dtype)
    elif _is_hf_gpt2(header):
        model, config = load_hf_gpt2(p, device=device, dtype=dtype)
    else:
        kind = header.get("format") or header.get("model_type") or header.get("architectures")
        raise CheckpointError(f"{p / CONFIG_FILE}: expected a {FORMAT} checkpoint or a Hugging Face GPT-2 "
                              f"directory (model_type 'gpt2'), found {kind!r}")
    return model, get_tokenizer(config.tokenizer)
