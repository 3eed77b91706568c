"""Run directories: step checkpoints with the trainer's state, the best model, and `latest`.

    OUT/ckpt-0000500/   a gpt checkpoint (config.json, model.safetensors) plus
                        train_state.json and train_state.safetensors: optimizer, grad scaler,
                        every rank's RNG and data-sampler state, step, best loss, the TrainConfig
    OUT/best/           the model with the lowest validation loss so far (no trainer state)
    OUT/latest          the name of the newest step checkpoint

The trainer state is split into JSON and tensors (safetensors), so nothing is ever unpickled.
Every write is atomic (gpt.files.atomic_directory / atomic_write_bytes), and old checkpoints
are renamed away before they are deleted: a crash mid-save leaves the previous checkpoint in
place, and `recover` (run before a run starts) tidies up what the crash left.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any

import torch

import gpt
from gpt.files import (
    CONFIG_FILE,
    CheckpointError,
    atomic_write_bytes,
    read_json,
    read_safetensors,
    recover_interrupted_writes,
    remove_directory,
)

STATE_JSON = "train_state.json"
STATE_TENSORS = "train_state.safetensors"
LATEST = "latest"
BEST = "best"
_CKPT = re.compile(r"^ckpt-(\d+)$")


def ckpt_name(step: int) -> str:
    return f"ckpt-{step:07d}"


# --- nested state <-> (JSON, tensors) ---------------------------------------------------------


def split_tensors(obj: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """A JSON-able copy of `obj` with every tensor moved into `tensors` and replaced by a
    {"__tensor__": key} placeholder. Dict keys must be strings."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        return {str(k): split_tensors(v, tensors, f"{path}.{k}" if path else str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [split_tensors(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    return obj


def join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        return {k: join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [join_tensors(v, tensors) for v in obj]
    return obj


def optimizer_state(opt: torch.optim.Optimizer) -> dict:
    sd = opt.state_dict()
    # JSON keys are strings; keep the parameter indices as a list of pairs instead.
    return {"state": [[int(k), v] for k, v in sd["state"].items()], "param_groups": sd["param_groups"]}


def load_optimizer_state(opt: torch.optim.Optimizer, saved: dict) -> None:
    opt.load_state_dict(
        {"state": {int(k): v for k, v in saved["state"]}, "param_groups": saved["param_groups"]}
    )


# --- writing ----------------------------------------------------------------------------------


def save_step(
    out: Path,
    model: torch.nn.Module,
    state: dict,
    metadata: dict,
    keep_last: int,
    tokenizer: gpt.Tokenizer | None = None,
) -> Path:
    """Write OUT/ckpt-<step>/ (model + trainer state), point `latest` at it, drop old ones."""
    tensors: dict[str, torch.Tensor] = {}
    # no best loss yet is stored as null: JSON has no Infinity
    best = state["best_val_loss"]
    as_json = split_tensors({**state, "best_val_loss": best if math.isfinite(best) else None}, tensors)
    files = {STATE_JSON: (json.dumps(as_json, allow_nan=False) + "\n").encode()}
    name = ckpt_name(state["step"])
    path = gpt.save(
        model,
        out / name,
        tokenizer=tokenizer,
        metadata=metadata,
        extra_files=files,
        extra_tensors={STATE_TENSORS: tensors},
    )
    atomic_write_bytes(out / LATEST, (name + "\n").encode())
    for old in step_checkpoints(out)[:-keep_last]:
        if old.name != name:
            remove_directory(old)
    return path


def save_best(
    out: Path, model: torch.nn.Module, metadata: dict, tokenizer: gpt.Tokenizer | None = None
) -> Path:
    return gpt.save(model, out / BEST, tokenizer=tokenizer, metadata=metadata)


# --- reading ----------------------------------------------------------------------------------


def step_checkpoints(out: Path) -> list[Path]:
    """Complete step checkpoints in OUT, oldest first."""
    found = []
    for p in out.iterdir() if out.is_dir() else ():
        m = _CKPT.match(p.name)
        if m and (p / STATE_JSON).is_file() and (p / CONFIG_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(out: Path) -> Path | None:
    """What `latest` names, or (if it is missing or dangling) the newest step checkpoint."""
    pointer = out / LATEST
    if pointer.is_file():
        p = out / pointer.read_text().strip()
        if (p / STATE_JSON).is_file():
            return p
    found = step_checkpoints(out)
    return found[-1] if found else None


def load_state(ckpt: Path) -> dict:
    """The trainer state saved in a step checkpoint (tensors restored in place)."""
    as_json = read_json(ckpt / STATE_JSON)
    tensors = read_safetensors(ckpt / STATE_TENSORS)
    try:
        state = join_tensors(as_json, tensors)
    except KeyError as e:
        raise CheckpointError(f"{ckpt / STATE_TENSORS}: missing tensor {e}") from None
    if state.get("best_val_loss") is None:
        state["best_val_loss"] = math.inf
    return state


def recover(out: Path) -> list[str]:
    """Repair what a run killed mid-write left in OUT: temporary checkpoint directories and
    files are deleted, and a best/ caught between its two renames is put back. What was done."""
    return recover_interrupted_writes(out)


def has_run(out: Path) -> bool:
    """Whether OUT already holds checkpoints that starting afresh would overwrite."""
    return bool(step_checkpoints(out)) or (out / BEST).is_dir()


def last_good_hint(out: Path) -> str:
    """Where a failed run can be continued from, for its error message."""
    latest = latest_checkpoint(out)
    if latest is None:
        return "no checkpoint had been written yet"
    hint = f"continue with --resume --out {out}, perhaps with a lower --lr"
    return f"the last good checkpoint is {latest} ({hint})"


def weights_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy())  # hashed in place, not copied
    return h.hexdigest()
