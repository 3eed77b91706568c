"""Text corpora for the GPT: find the files, tokenize them once into memory-mapped token files
(train / validation split) cached under the run directory, and sample random contiguous blocks.

The cache is crash-safe: the token files are fsynced and renamed into place before meta.json,
written last, marks them complete; and a cache whose files are not the size meta.json gives
(a full disk, a copy cut short) is rebuilt rather than trained on."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import secrets
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gpt.files import atomic_write_bytes, fsync_path, recover_interrupted_writes
from gpt.tokenizer import Tokenizer

from .config import ConfigError

# The default corpus: this Python's own standard library sources, the first files in sorted
# order up to this many bytes (about all of them), so tokenizing takes seconds and runs compare.
# Left out: the tests (held out: they are what benchmarks/first_run.py scores on), installed
# packages, and two directories that are data rather than code: encodings/ (mostly generated
# codec tables) and pydoc_data/ (one 750 KB string of help text).
STDLIB_BYTES = 12 * 1024 * 1024
_SKIP_DIRS = {
    "site-packages",
    "dist-packages",
    "__pycache__",
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "encodings",
    "pydoc_data",
}
_SNIFF = 8192
META = "meta.json"  # written last: a cache without it is incomplete


def stdlib_files(limit: int = STDLIB_BYTES) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if _SKIP_DIRS.intersection(path.relative_to(root).parts[:-1]):
            continue
        size = path.stat().st_size
        if size == 0:
            continue
        if total + size > limit:
            break
        files.append(path)
        total += size
    return files


def _is_text(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(_SNIFF)
    if b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start > len(head) - 4  # a character cut off by the sniff window is fine
    return True


def find_files(specs: list[str], option: str = "--data") -> list[Path]:
    """Files named by `specs` (files, directories searched recursively, or globs), sorted within
    each spec. Named files must be text; inside directories, binary files are skipped. Errors
    name `option`, the flag that gave the specs."""
    out: list[Path] = []
    for spec in specs:
        if any(c in spec for c in "*?["):
            matches = sorted(Path(m) for m in glob.glob(spec, recursive=True))
            matches = [m for m in matches if m.is_file()]
            if not matches:
                raise ConfigError(f"{option} {spec}: the pattern matches no files")
            out.extend(m for m in matches if _is_text(m))
        elif os.path.isdir(spec):
            found = sorted(
                p
                for p in Path(spec).rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(spec).parts)
            )
            out.extend(p for p in found if _is_text(p))
        elif os.path.isfile(spec):
            if not _is_text(Path(spec)):
                raise ConfigError(f"{option} {spec}: not UTF-8 text (binary file?)")
            out.append(Path(spec))
        else:
            raise ConfigError(f"{option} {spec}: no such file or directory")
    if not out:
        raise ConfigError(f"{option} {' '.join(specs)}: no text files found")
    return out


def _fingerprint(
    files: list[Path], tokenizer: Tokenizer, val_fraction: float, val_files: list[Path] | None = None
) -> str:
    h = hashlib.sha256(json.dumps([tokenizer.fingerprint, val_fraction]).encode())
    for f in [*files, *(["--val-data"] if val_files else []), *(val_files or [])]:
        if isinstance(f, str):
            h.update(f.encode())
            continue
        st = f.stat()
        h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


@dataclass
class TokenData:
    train: np.ndarray  # memory-mapped token ids
    val: np.ndarray
    directory: Path
    n_files: int


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def _tokenize(files: list[Path], tokenizer: Tokenizer, dest: Path, progress: bool) -> int:
    """Stream every file's tokens into `dest`, documents separated by end-of-text; token count."""
    from tqdm import tqdm

    dtype = token_dtype(tokenizer.vocab_size)
    total = sum(f.stat().st_size for f in files)
    n = 0
    with (
        open(dest, "wb") as out,
        tqdm(
            total=total, unit="B", unit_scale=True, desc="tokenizing", disable=not progress, leave=False
        ) as bar,
    ):
        for i, f in enumerate(files):
            try:
                text = f.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise ConfigError(f"--data {f}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            ids = ([tokenizer.eot_token] if i else []) + tokenizer.encode(text)
            out.write(np.asarray(ids, dtype=dtype).tobytes())
            n += len(ids)
            bar.update(f.stat().st_size)
    return n


def training_texts(files: list[Path], val_fraction: float) -> Iterator[str]:
    """The files' texts up to the training share of their bytes: what a tokenizer may learn from
    without seeing the validation tail (validation is the corpus's last tokens)."""
    budget = sum(f.stat().st_size for f in files) * (1 - val_fraction)
    for f in files:
        if budget <= 0:
            return
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"--data {f}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        yield text if len(text) <= budget else text[: int(budget)]
        budget -= f.stat().st_size


def _complete_cache(d: Path) -> dict | None:
    """The metadata of the cache in `d`, or None if it is missing, unreadable, or its token
    files are not the size it gives."""
    try:
        meta = json.loads((d / META).read_text())
        size = np.dtype(meta["dtype"]).itemsize
        whole = all(
            (d / f"{name}.bin").stat().st_size == meta[f"{name}_tokens"] * size for name in ("train", "val")
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta if whole else None


def _build_cache(
    files: list[Path],
    tokenizer: Tokenizer,
    d: Path,
    val_fraction: float,
    progress: bool,
    val_files: list[Path] | None = None,
) -> dict:
    d.mkdir(parents=True, exist_ok=True)
    (d / META).unlink(missing_ok=True)  # it must only ever vouch for the files written below
    dtype = token_dtype(tokenizer.vocab_size)
    if val_files:
        return _build_separate_cache(files, val_files, tokenizer, d, dtype, progress)
    tmp = d / f".train.bin.tmp-{secrets.token_hex(4)}"  # a name recover() knows
    try:
        n = _tokenize(files, tokenizer, tmp, progress)
        if n == 0:
            raise ConfigError("the corpus is empty (no tokens)")
        n_val = max(1, int(n * val_fraction))
        size = np.dtype(dtype).itemsize
        # the validation tail is copied out, then the file is cut to the training prefix:
        # no pass over the whole corpus in memory
        with open(tmp, "r+b") as f:
            f.seek((n - n_val) * size)
            atomic_write_bytes(d / "val.bin", f.read())
            f.truncate((n - n_val) * size)
            f.flush()
            os.fsync(f.fileno())  # on disk before meta.json can say it is complete
        os.replace(tmp, d / "train.bin")
        fsync_path(d)
    finally:
        tmp.unlink(missing_ok=True)
    meta = {
        "tokenizer": tokenizer.name,
        "dtype": np.dtype(dtype).name,
        "train_tokens": n - n_val,
        "val_tokens": n_val,
        "files": [str(f) for f in files[:1000]],
        "n_files": len(files),
    }
    atomic_write_bytes(d / META, json.dumps(meta, indent=1).encode())  # written last: marks it complete
    return meta


def _build_separate_cache(
    files: list[Path], val_files: list[Path], tokenizer: Tokenizer, d: Path, dtype, progress: bool
) -> dict:
    """--val-data: every --data token trains, and the validation tokens are the other files'."""
    counts = {}
    for name, group in (("train", files), ("val", val_files)):
        tmp = d / f".{name}.bin.tmp-{secrets.token_hex(4)}"
        try:
            counts[name] = _tokenize(group, tokenizer, tmp, progress)
            if counts[name] == 0:
                raise ConfigError(
                    f"the {'--data' if name == 'train' else '--val-data'} files are empty (no tokens)"
                )
            with open(tmp, "r+b") as f:
                os.fsync(f.fileno())
            os.replace(tmp, d / f"{name}.bin")
        finally:
            tmp.unlink(missing_ok=True)
    fsync_path(d)
    meta = {
        "tokenizer": tokenizer.name,
        "dtype": np.dtype(dtype).name,
        "train_tokens": counts["train"],
        "val_tokens": counts["val"],
        "files": [str(f) for f in files[:1000]],
        "n_files": len(files),
        "val_files": [str(f) for f in val_files[:1000]],
    }
    atomic_write_bytes(d / META, json.dumps(meta, indent=1).encode())  # written last: marks it complete
    return meta


def recover(cache_root: Path) -> None:
    """Delete the temporary files a process killed while tokenizing left in the cache. Only
    call it while no other process is tokenizing into `cache_root`."""
    for d in cache_root.iterdir() if cache_root.is_dir() else ():
        if d.is_dir():
            recover_interrupted_writes(d)


def prepare(
    files: list[Path],
    tokenizer: Tokenizer,
    cache_root: Path,
    *,
    val_fraction: float,
    block_size: int,
    progress: bool = True,
    val_files: list[Path] | None = None,
) -> TokenData:
    """Tokenize `files` into cache_root/<fingerprint>/{train,val}.bin once; later runs reuse it.

    The last `val_fraction` of the tokens is validation, as nanoGPT splits its corpora; with
    `val_files`, all of `files` trains and validation is those files."""
    d = cache_root / _fingerprint(files, tokenizer, val_fraction, val_files)
    meta = _complete_cache(d) or _build_cache(files, tokenizer, d, val_fraction, progress, val_files)
    for name in ("train", "val"):
        if meta[f"{name}_tokens"] <= block_size:
            raise ConfigError(
                f"the corpus is too short: its {'training' if name == 'train' else 'validation'} "
                f"split has {meta[f'{name}_tokens']} tokens, and one block needs {block_size + 1} "
                f"(block size {block_size}); add text or lower --block-size"
            )
    train = np.memmap(d / "train.bin", dtype=meta["dtype"], mode="r")
    val = np.memmap(d / "val.bin", dtype=meta["dtype"], mode="r")
    return TokenData(train=train, val=val, directory=d, n_files=meta["n_files"])


class BlockSampler:
    """Random contiguous blocks (x, y = x shifted by one) from a token array, drawn with its own
    generator so that its position in the random stream can be saved and restored exactly."""

    def __init__(self, data: np.ndarray, block_size: int, batch_size: int, seed: int):
        self.data, self.block_size, self.batch_size = data, block_size, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self._offsets = np.arange(block_size + 1)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        ix = torch.randint(len(self.data) - self.block_size, (self.batch_size,), generator=self.generator)
        rows = torch.from_numpy(self.data[ix.numpy()[:, None] + self._offsets].astype(np.int64))
        return rows[:, :-1], rows[:, 1:]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
