"""File I/O shared by checkpoints, Hugging Face directories and the trainer's run directories.

- atomic writes: `atomic_write_bytes` for one file, `atomic_directory` for a whole directory;
  readers see the old version or the new one, never a mixture or a part; `remove_directory`
  and `recover_interrupted_writes` for what a process killed midway leaves behind;
- safe reads: `read_json` and `read_safetensors`, every failure a `CheckpointError` naming the
  file (weights are only read with safetensors, so reading cannot run code as unpickling can);
- tensors <-> model: `tied_names`, `load_tensors_into` and `stored_dtype`.

This module imports nothing from `gpt`, so every other module can use it without a cycle.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import safetensors.torch
import torch
import torch.nn as nn

# Our checkpoints and Hugging Face directories both describe themselves in this file.
CONFIG_FILE = "config.json"

PathLike = str | os.PathLike


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not match its config."""


# --- atomic writes ---------------------------------------------------------------------------

# tempfile creates private (0600/0700) files and directories; published checkpoints should get
# the permissions an ordinary write would, so a server running as another user can read them.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def fsync_path(path: Path) -> None:
    """Flush a file, or a directory's entries, to disk."""
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
    fsync_path(path.parent)
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
    checkpoint intact under `.{name}.old-*` next to `path`. An existing `path` that is neither
    empty nor holds a config.json is refused, as it is not a previous checkpoint."""
    path = Path(path)
    if path.exists() and not _looks_replaceable(path):
        raise CheckpointError(
            f"{path}: refusing to replace it, it exists and does not look like a "
            f"checkpoint directory (no {CONFIG_FILE})"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~_UMASK)
        yield tmp
        for f in tmp.iterdir():
            if f.is_file():
                os.chmod(f, 0o666 & ~_UMASK)  # safetensors writes its files private
            fsync_path(f)
        fsync_path(tmp)
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
        fsync_path(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_directory(path: PathLike) -> None:
    """Delete a directory so that a crash midway never leaves a half-deleted one under its name:
    it is renamed to a temporary name first (which `recover_interrupted_writes` removes)."""
    path = Path(path)
    doomed = path.parent / f".{path.name}.tmp-{secrets.token_hex(4)}"
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


# The names the writers above give their temporary and set-aside entries.
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-[A-Za-z0-9_]+$")


def recover_interrupted_writes(directory: PathLike) -> list[str]:
    """Undo what a process killed in the middle of the writes above left in `directory`; a
    description of each repair.

    A set-aside `.NAME.old-*` whose NAME is missing (a kill between the two renames of
    `atomic_directory`) is the last complete version: it is renamed back. Every other leftover
    (temporary files and directories, set-aside copies already replaced) is deleted. Only call
    this while no other process is writing in `directory`: its temporaries look the same."""
    directory = Path(directory)
    leftovers = []
    for entry in directory.iterdir() if directory.is_dir() else ():
        m = _LEFTOVER.match(entry.name)
        if m:
            leftovers.append((m.group("kind"), m.group("name"), entry))
    done = []
    # the newest set-aside copy first, should a name have several
    for kind, name, entry in sorted(leftovers, key=lambda t: (t[0], -t[2].lstat().st_mtime_ns)):
        target = directory / name
        if kind == "old" and not target.exists():
            os.rename(entry, target)
            done.append(f"restored {target} from an interrupted save")
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        done.append(f"removed {entry.name}, left by an interrupted write")
    if done:
        fsync_path(directory)
    return done


# --- reading -----------------------------------------------------------------------------------


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file on the CPU, with any failure as a CheckpointError."""
    if not file.is_file():
        raise CheckpointError(f"{file}: missing weights file")
    try:
        return safetensors.torch.load_file(str(file), device="cpu")
    except Exception as e:  # SafetensorError for truncated/corrupt files, OSError, ...
        raise CheckpointError(
            f"{file}: cannot read safetensors weights, the file is truncated or "
            f"corrupt ({type(e).__name__}: {e})"
        ) from e


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


def load_tensors_into(
    model: nn.Module, tensors: dict[str, torch.Tensor], source: PathLike, config_file: str = CONFIG_FILE
) -> None:
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
        raise CheckpointError(
            f"{source}: unexpected tensor{'s' if len(unexpected) > 1 else ''} {_list(unexpected)}"
        )
    for k, want in expected.items():
        if tuple(tensors[k].shape) != tuple(want.shape):
            raise CheckpointError(
                f"{source}: {k} has shape {_shape(tensors[k].shape)}, {config_file} says {_shape(want.shape)}"
            )
        if not (tensors[k].is_floating_point() or tensors[k].dtype == want.dtype):
            raise CheckpointError(f"{source}: {k} has dtype {tensors[k].dtype}, expected {want.dtype}")
    full = dict(tensors)
    full.update({alias: tensors[name] for alias, name in aliases.items()})
    with torch.no_grad():
        model.load_state_dict(full, strict=True)


def stored_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype | None:
    """The dtype the weights were saved in (that of the first floating-point tensor), or None."""
    return next((t.dtype for t in tensors.values() if t.is_floating_point()), None)
