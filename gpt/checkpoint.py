"""Saving and loading models: our own checkpoint directories, plus Hugging Face GPT-2 ones.

A checkpoint is a directory:
  config.json        {"format": "gpt-checkpoint", "version": 1, "model": {...ModelConfig...},
                      "tokenizer": "gpt2", "metadata": {...}}
  model.safetensors  the weights; a tied output projection is stored once, as the embedding
  tokenizer.json     only for a tokenizer trained with the model (gpt/bpe.py)
  (anything else)    files the caller adds, e.g. the trainer's optimizer state

Weights are only ever read with safetensors, so loading a checkpoint cannot run code the way
unpickling can. Saving is atomic: the directory is written under a temporary name next to its
destination and renamed into place, so `path` holds either the old checkpoint or the new one.
The file helpers doing that (atomic writes, safe reads) live in gpt.files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import safetensors.torch
import torch
import torch.nn as nn

from .bpe import TOKENIZER_FILE, BPETokenizer
from .config import ModelConfig

# Re-exported as well as used: callers and tests import the file helpers from here too.
from .files import (  # noqa: F401
    CONFIG_FILE,
    CheckpointError,
    PathLike,
    atomic_directory,
    atomic_write_bytes,
    load_tensors_into,
    read_json,
    read_safetensors,
    stored_dtype,
    tied_names,
)
from .hf import load_hf_gpt2
from .model import build_model
from .quantization import MODES as QUANTIZATIONS
from .quantization import is_quantized, quantize
from .tokenizer import Tokenizer, get_tokenizer

FORMAT = "gpt-checkpoint"
VERSION = 1
WEIGHTS_FILE = "model.safetensors"


# --- our checkpoints -------------------------------------------------------------------------


def save(
    model: nn.Module,
    path: PathLike,
    *,
    tokenizer: str | Tokenizer | None = None,
    metadata: dict | None = None,
    extra_files: dict[str, bytes] | None = None,
    extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Save `model` as a checkpoint directory at `path`, atomically replacing any previous one.

    tokenizer: the tokenizer, or its name, to record (default: model.config.tokenizer); one
        trained with the model (gpt/bpe.py) must be passed itself, as it is stored here.
    metadata: JSON-serialisable facts to keep with it (step, loss, data, ...).
    extra_files: {file name: bytes} written into the same directory, e.g. trainer state.
    extra_tensors: {file name: {key: tensor}} written there as safetensors files, straight from
        the tensors' memory (an optimizer's state is as large as the model, twice over)."""
    config: ModelConfig = model.config
    tokenizer_json = tokenizer.to_json() if isinstance(tokenizer, Tokenizer) else None
    tokenizer = (tokenizer.name if isinstance(tokenizer, Tokenizer) else tokenizer) or config.tokenizer
    if tokenizer == "bpe" and tokenizer_json is None:
        raise ValueError(
            "a model with a trained 'bpe' tokenizer is saved with the tokenizer itself: "
            "save(model, path, tokenizer=tok)"
        )
    model_dict = config.to_dict()
    model_dict["tokenizer"] = tokenizer  # one answer to "which tokenizer", wherever it is read
    header = {
        "format": FORMAT,
        "version": VERSION,
        "model": model_dict,
        "tokenizer": tokenizer,
        "metadata": dict(metadata or {}),
    }
    if is_quantized(model):  # int8 weights and their scales are stored as they are: a smaller file
        header["quantization"] = "int8"
    # Serialise before touching the disk, so bad metadata fails without leaving anything behind.
    config_bytes = (json.dumps(header, indent=2, sort_keys=False) + "\n").encode("utf-8")
    extra_files, extra_tensors = dict(extra_files or {}), dict(extra_tensors or {})
    for name in [*extra_files, *extra_tensors]:
        if (
            name in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE)
            or not name
            or Path(name).name != name
            or name.startswith(".")
        ):
            raise ValueError(
                f"extra file name {name!r} must be a plain file name other than "
                f"{CONFIG_FILE} and {WEIGHTS_FILE}"
            )
    aliases = tied_names(model)
    # safetensors refuses tensors that share memory, so tied weights are stored once.
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k not in aliases}

    path = Path(path)
    with atomic_directory(path) as tmp:
        safetensors.torch.save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if tokenizer_json is not None:
            (tmp / TOKENIZER_FILE).write_text(tokenizer_json, encoding="utf-8")
        (tmp / CONFIG_FILE).write_bytes(config_bytes)
        for name, data in extra_files.items():
            (tmp / name).write_bytes(data)
        for name, named in extra_tensors.items():
            safetensors.torch.save_file(named, str(tmp / name))
    return path


def load_checkpoint(
    path: PathLike, *, device="cpu", dtype: torch.dtype | None = None
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
        raise CheckpointError(
            f"{config_file}: unsupported version {version!r}; this code reads version {VERSION} or older"
        )
    try:
        model_dict = dict(header["model"])
        if isinstance(header.get("tokenizer"), str):
            model_dict["tokenizer"] = header["tokenizer"]
        config = ModelConfig.from_dict(model_dict)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{config_file}: bad model config ({type(e).__name__}: {e})") from e
    metadata = header.get("metadata") or {}

    quantization = header.get("quantization")
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise CheckpointError(
            f"{config_file}: unknown quantization {quantization!r}; this code reads "
            f"{', '.join(QUANTIZATIONS)}"
        )

    tensors = read_safetensors(path / WEIGHTS_FILE)
    model = build_model(config)
    if quantization is not None:
        quantize(model, quantization)  # the layers' shapes; the stored values replace theirs
    load_tensors_into(model, tensors, path / WEIGHTS_FILE)
    model.to(device=device, dtype=dtype or stored_dtype(tensors))
    return model.eval(), config, metadata


# --- the public loader -----------------------------------------------------------------------

HUB_FILES = ["config.json", "model.safetensors", "pytorch_model.bin"]
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def _is_hf_gpt2(header: dict) -> bool:
    return header.get("model_type") == "gpt2" or any(
        a in ("GPT2LMHeadModel", "GPT2Model") for a in header.get("architectures") or []
    )


def _looks_like_hub_name(name: str) -> bool:
    # "gpt2" or "openai-community/gpt2"; but "runs/ckpt" is a mistyped local path when "runs" exists.
    return bool(_HUB_NAME.match(name)) and not (("/" in name) and Path(name.split("/")[0]).exists())


def _download_from_hub(repo_id: str) -> Path:
    """Fetch a Hugging Face GPT-2 from the hub (needs network and `huggingface_hub`)."""
    try:
        import huggingface_hub
    except ImportError:
        raise CheckpointError(
            f"{repo_id}: no such local directory; to download it from the Hugging Face "
            f"hub, `pip install huggingface_hub`, or pass a local directory"
        ) from None
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as e:
        raise CheckpointError(
            f"{repo_id}: no such local directory, and downloading it from the Hugging "
            f"Face hub failed ({type(e).__name__}: {e})"
        ) from e


RUN_CHECKPOINTS = ("best", "latest")  # what gpt-train writes inside its --out directory


def find_checkpoint(path: PathLike) -> Path:
    """`path`, or the checkpoint a training run keeps inside it: given a run directory (no
    config.json of its own; gpt-train's --out), its best/ checkpoint, else its latest/."""
    p = Path(path)
    if p.is_dir() and not (p / CONFIG_FILE).exists():
        for name in RUN_CHECKPOINTS:
            if (p / name / CONFIG_FILE).is_file():
                return p / name
    return p


def run_name(path: PathLike) -> str:
    """A name a person recognises for a checkpoint: its run's (`default` for runs/default/best
    or runs/default), else its directory's."""
    p = find_checkpoint(path).resolve()
    if p.name in RUN_CHECKPOINTS and p.parent.name:
        return p.parent.name
    return p.name or str(path)


def _known_header(p: Path) -> dict:
    """`p`'s config.json, if it is one of ours or a Hugging Face GPT-2's; else CheckpointError."""
    header = read_json(p / CONFIG_FILE)
    if header.get("format") != FORMAT and not _is_hf_gpt2(header):
        kind = header.get("format") or header.get("model_type") or header.get("architectures")
        raise CheckpointError(
            f"{p / CONFIG_FILE}: expected a {FORMAT} checkpoint or a Hugging Face GPT-2 "
            f"directory (model_type 'gpt2'), found {kind!r}"
        )
    return header


def check_header(path: PathLike) -> None:
    """What `load(path)` would read, checked as far as its config.json tells, without reading
    the weights: a CheckpointError (or OSError) now rather than from a process that loads it
    later (gpt-serve's replicas)."""
    p = find_checkpoint(path)
    if p.exists() and not p.is_dir():
        raise CheckpointError(f"{p}: is a file; expected a checkpoint directory")
    _known_header(p)


def load(path: PathLike, *, device="cpu", dtype: torch.dtype | None = None) -> tuple[nn.Module, Tokenizer]:
    """Load a model and its tokenizer from any supported source:

    - a checkpoint directory written by `save`, or a training run's directory (its best/);
    - a Hugging Face GPT-2 directory (config.json + model.safetensors or pytorch_model.bin);
    - a Hugging Face hub name such as "gpt2" or "openai-community/gpt2", when no such local path
      exists (downloads: needs network and `pip install huggingface_hub`).

    The model comes back in eval mode on `device`; dtype None keeps the stored dtype."""
    p = find_checkpoint(path)
    if not p.exists() and _looks_like_hub_name(str(path)):
        p = _download_from_hub(str(path))
    if p.exists() and not p.is_dir():
        raise CheckpointError(f"{p}: is a file; expected a checkpoint directory")
    header = _known_header(p)
    if header.get("format") == FORMAT:
        model, config, _ = load_checkpoint(p, device=device, dtype=dtype)
    else:
        model, config = load_hf_gpt2(p, device=device, dtype=dtype)
    try:
        if config.tokenizer == BPETokenizer.name:  # trained with the model, stored beside it
            tokenizer = BPETokenizer.from_file(p / TOKENIZER_FILE)
        else:
            tokenizer = get_tokenizer(config.tokenizer)
    except ValueError as e:
        raise CheckpointError(f"{p}: {e}") from None
    return model, tokenizer
