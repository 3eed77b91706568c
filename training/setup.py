"""Everything a run builds before its first step: config (fresh or resumed), tokenizer, data,
model and optimizer. Bad input surfaces here as a ConfigError, before anything is written."""

from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import gpt
from gpt import lora
from gpt.bpe import TOKENIZER_FILE, BPETokenizer, train_bpe
from gpt.files import CheckpointError, atomic_write_bytes

from . import chats
from . import data as corpus
from . import pairs as pairdata
from . import state as ckpt
from .config import DEFAULT_PRESET, MODEL_FIELDS, ConfigError, TrainConfig
from .dates import date_pair

DATES_HELD_OUT = 1000  # generated validation pairs of the built-in date task


def resolve_config(overrides: dict, resume: bool) -> tuple[TrainConfig, Path | None, dict | None]:
    """The run's TrainConfig: the defaults, or with --resume the saved run's settings, updated
    by whatever the command line set explicitly. Also the checkpoint and state to resume from."""
    out = Path(overrides.get("out") or TrainConfig.out)
    if not resume:
        cfg = TrainConfig(**overrides)
        cfg.validate()
        if ckpt.has_run(out):
            raise ConfigError(
                f"--out {out} already holds a training run; pass --resume to continue it, "
                f"or choose another --out"
            )
        return cfg, None, None
    path = ckpt.latest_checkpoint(out)
    if path is None:
        raise ConfigError(f"--resume: no checkpoint to resume from in {out}")
    try:
        saved = ckpt.load_state(path)
    except CheckpointError as e:
        raise ConfigError(f"--resume: {e}") from None
    cfg = TrainConfig.from_dict(saved["config"]).replace(**{**overrides, "out": str(out)})
    cfg.validate()
    if saved["step"] >= cfg.max_iters:
        raise ConfigError(
            f"--resume: the run in {out} already reached step {saved['step']} of --max-iters "
            f"{cfg.max_iters}; pass a larger --max-iters to train further"
        )
    return cfg, path, saved


def check_writable(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--out {out}: not writable ({e.strerror or e})") from None


def model_and_tokenizer(
    cfg: TrainConfig, resume_path: Path | None = None, is_main: bool = True, barrier=lambda: None
) -> tuple[torch.nn.Module, gpt.Tokenizer]:
    """A freshly initialised model (seeded by cfg.seed), or the --init-from weights."""
    if cfg.init_from:
        try:
            model, tok = gpt.load(cfg.init_from)
        except (OSError, ValueError) as e:
            raise ConfigError(f"--init-from {cfg.init_from}: {e}") from None
        if model.config.arch != cfg.model:
            raise ConfigError(
                f"--init-from {cfg.init_from} holds a {model.config.arch} model: pass "
                f"--model {model.config.arch}"
            )
        if cfg.tokenizer and cfg.tokenizer != tok.name:
            raise ConfigError(f"--tokenizer {cfg.tokenizer}: --init-from {cfg.init_from} uses {tok.name!r}")
        if model.config.vocab_size < tok.vocab_size:
            raise ConfigError(
                f"--init-from {cfg.init_from}: the model has {model.config.vocab_size} token "
                f"embeddings but its tokenizer {tok.name!r} has {tok.vocab_size} ids"
            )
        changed = [
            f
            for f in MODEL_FIELDS
            if getattr(cfg, f) is not None
            and f not in ("dropout", "block_size")
            and getattr(cfg, f) != getattr(model.config, f)
        ]
        if changed:
            raise ConfigError(
                f"--{changed[0].replace('_', '-')}: cannot change the shape of the model "
                f"loaded by --init-from (only --dropout, and --block-size as the training length)"
            )
        context = model.config.block_size
        if cfg.block_size is not None and cfg.block_size > context:
            raise ConfigError(
                f"--block-size {cfg.block_size}: longer than the {context}-token context of the "
                f"model loaded by --init-from; pass at most {context} (the training sequence length)"
            )
        if cfg.dropout is not None:
            fresh = gpt.build_model(model.config.replace(dropout=cfg.dropout))
            fresh.load_state_dict(model.state_dict())
            model = fresh
        return model.train(), tok
    name = cfg.tokenizer or gpt.PRESETS[cfg.preset or DEFAULT_PRESET[cfg.model]].get("tokenizer", "gpt2")
    if name == "bpe":
        tok = trained_tokenizer(cfg, resume_path, is_main, barrier)
    else:
        try:
            tok = gpt.get_tokenizer(name)
        except ValueError as e:
            raise ConfigError(f"--tokenizer: {e}") from None
    mcfg = cfg.model_config(tok.vocab_size, tok.name, eot=tok.eot_token if name == "bpe" else None)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank, and for every rerun
    return gpt.build_model(mcfg).train(), tok


TOKENIZER_SAMPLE_PAIRS = 20_000  # generated pairs a seq2seq run without --data learns its BPE from


def trained_tokenizer(cfg: TrainConfig, resume_path: Path | None, is_main: bool, barrier) -> BPETokenizer:
    """--tokenizer bpe: the one saved with the checkpoint being resumed, or one learned now from
    the training part of the data (by rank 0, into OUT/tokenizer.json, which every rank reads)."""
    if resume_path is not None:
        try:
            return BPETokenizer.from_file(resume_path / TOKENIZER_FILE)
        except ValueError as e:
            raise ConfigError(f"--resume: {e}") from None
    path = Path(cfg.out) / TOKENIZER_FILE
    if is_main:
        tok = train_bpe(_tokenizer_texts(cfg), cfg.bpe_vocab, progress=not cfg.quiet and sys.stderr.isatty())
        atomic_write_bytes(path, tok.to_json().encode("utf-8"))
    barrier()
    return BPETokenizer.from_file(path)


def _tokenizer_texts(cfg: TrainConfig):
    if chats.is_chat_run(cfg):
        yield from chats.chat_texts(cfg)
    elif cfg.model == "gpt":
        files = corpus.find_files(cfg.data) if cfg.data else corpus.stdlib_files()
        if not files:
            raise ConfigError("no --data given and no standard library sources found; pass --data")
        yield from corpus.training_texts(files, 0.0 if cfg.val_data else cfg.val_fraction)
    elif cfg.data:
        pairs = [p for f in corpus.find_files(cfg.data) for p in pairdata.read_pairs(f)]
        held = 0 if cfg.val_data else max(1, int(len(pairs) * cfg.val_fraction))
        for src, tgt in pairs[: len(pairs) - held]:
            yield src
            yield tgt
    else:
        rng = random.Random(cfg.seed)
        for _ in range(TOKENIZER_SAMPLE_PAIRS):
            yield from date_pair(rng)


@dataclass
class Data:
    train: Any  # a sampler with next_batch / state_dict / load_state_dict
    make_val: Any  # seed -> a fresh validation sampler (the same batches at every evaluation)
    accuracy_pairs: list  # seq2seq: held-out (source, target) texts for exact match
    description: str
    sample_prompts: list[str] | None = None  # what samples continue, where not the model kind's default
    sample_stop: list[str] | None = None  # chat: a sample ends with the assistant's turn


def build_data(cfg: TrainConfig, tok: gpt.Tokenizer, context: int, rank: int, is_main: bool, barrier) -> Data:
    """The training and validation data for a model with `context` positions, in sequences of
    cfg.train_length(context) tokens (seq2seq: sources and targets at most that long)."""
    seed = cfg.seed + rank  # each rank draws its own batches
    block_size = cfg.train_length(context)
    data = _build_data(cfg, tok, block_size, seed, is_main, barrier)
    if block_size != context:
        data.description += f"; {block_size}-token training sequences (the model's context: {context})"
    return data


def _build_data(
    cfg: TrainConfig, tok: gpt.Tokenizer, block_size: int, seed: int, is_main: bool, barrier
) -> Data:
    if chats.is_chat_run(cfg):  # conversations: each one a padded row, the loss on the assistant's tokens
        train, make_val, what, (prompt, stops) = chats.build_chat_data(cfg, tok, block_size, seed, is_main)
        return Data(train, make_val, [], what, sample_prompts=[prompt], sample_stop=stops)
    if cfg.model == "gpt":
        files = corpus.find_files(cfg.data) if cfg.data else corpus.stdlib_files()
        if not files:
            raise ConfigError("no --data given and no standard library sources found; pass --data")
        val_files = corpus.find_files(cfg.val_data, "--val-data") if cfg.val_data else None
        cache = Path(cfg.out) / "tokens"
        # rank 0 tokenizes, the others then find the finished cache
        tokens = None
        if is_main:
            corpus.recover(cache)  # the other ranks wait at the barrier: nobody else writes there now
            tokens = corpus.prepare(
                files,
                tok,
                cache,
                val_fraction=cfg.val_fraction,
                block_size=block_size,
                progress=not cfg.quiet and sys.stderr.isatty(),
                val_files=val_files,
            )
        barrier()
        if tokens is None:
            tokens = corpus.prepare(
                files,
                tok,
                cache,
                val_fraction=cfg.val_fraction,
                block_size=block_size,
                progress=False,
                val_files=val_files,
            )
        what = " ".join(cfg.data) if cfg.data else f"the Python standard library ({len(files)} files)"
        if cfg.val_data:
            what += f", validated on {' '.join(cfg.val_data)}"
        return Data(
            train=corpus.BlockSampler(tokens.train, block_size, cfg.batch_size, seed),
            make_val=lambda s: corpus.BlockSampler(tokens.val, block_size, cfg.batch_size, s),
            accuracy_pairs=[],
            description=f"{what}: {len(tokens.train):,} training / {len(tokens.val):,} validation tokens",
        )
    eot = tok.eot_token
    if cfg.data:
        train, val, val_texts = pairdata.load_pair_files(
            cfg.data, tok, block_size, cfg.val_fraction, cfg.val_data
        )
        sampler = pairdata.PairSampler(train, cfg.batch_size, seed, eot, eot)
        what = f"{' '.join(cfg.data)}: {len(train):,} training / {len(val):,} validation pairs"
    else:
        if cfg.val_data:
            val_texts = pairdata.read_pair_files(cfg.val_data, "--val-data")
        else:
            val_texts = pairdata.held_out(date_pair, DATES_HELD_OUT, cfg.seed)
        val = pairdata.encode_pairs(val_texts, tok, block_size, "--val-data" if cfg.val_data else "date task")
        sampler = pairdata.GeneratedPairSampler(
            date_pair, tok, block_size, cfg.batch_size, seed, {s for s, _ in val_texts}, eot, eot
        )
        what = f"the date-normalisation task: generated training pairs, {len(val):,} held-out"
    return Data(
        train=sampler,
        make_val=lambda s: pairdata.PairSampler(val, cfg.batch_size, s, eot, eot),
        accuracy_pairs=val_texts[: cfg.eval_pairs],
        description=what,
    )


def add_lora(model: torch.nn.Module, cfg: TrainConfig) -> str | None:
    """--lora-rank: freeze `model` and give it adapters; a description for the log, or None."""
    if not cfg.lora_rank:
        return None
    torch.manual_seed(cfg.seed)  # the adapters' random A: the same on every rank and every rerun
    try:
        layers = lora.apply(
            model,
            cfg.lora_rank,
            cfg.lora_alpha,
            cfg.lora_dropout,
            cfg.lora_targets or lora.DEFAULT_TARGETS,
            cfg.lora_bias,
        )
    except ValueError as e:
        raise ConfigError(f"--lora-targets: {e}") from None
    trainable, total = lora.trainable_count(model)
    return (
        f"LoRA rank {cfg.lora_rank} on {len(layers)} layers: {trainable:,} of {total:,} parameters train "
        f"({100 * trainable / total:.2f}%)"
    )


def resume_adapters(model: torch.nn.Module, saved: dict, path: Path) -> None:
    try:
        lora.load_adapters(model, saved.get("adapters") or {})
    except ValueError as e:
        raise ConfigError(f"--resume: {path}: {e}; resume with the run's own --lora settings") from None


def check_resumable(model: torch.nn.Module, path: Path) -> None:
    """The checkpoint's model must be the one this run builds; load its weights."""
    try:
        saved_model, saved_cfg, _ = gpt.load_checkpoint(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--resume: {e}") from None
    want, have = model.config.to_dict(), saved_cfg.to_dict()
    diff = [k for k in want if want[k] != have.get(k)]
    if diff:
        k = diff[0]
        raise ConfigError(
            f"--resume: {path} holds a model with {k}={have.get(k)!r}, but this run asks for "
            f"{k}={want[k]!r}; use the same settings or another --out"
        )
    with torch.no_grad():
        model.load_state_dict(saved_model.state_dict())


def make_optimizer(
    model: torch.nn.Module, cfg: TrainConfig, device: torch.device, fused: bool | None = None
) -> torch.optim.AdamW:
    """AdamW; weight decay on the matrices (>= 2-D: linear weights, embeddings), not on biases
    and LayerNorm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    if fused is None:
        # the fused kernel is one op for all parameters: measured faster on CPU and CUDA alike
        fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)
