"""torchrun / DistributedDataParallel plumbing. Without torchrun's environment everything here is
a no-op for a single process, so the training loop reads the same either way."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from gpt.device import resolve_device

from .config import ConfigError


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")  # where collectives' tensors live (nccl needs CUDA)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str) -> tuple[Dist, torch.device]:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA) and pick this
    rank's device: `auto` means cuda:<local rank> when CUDA is available, else cpu."""
    d = Dist(
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("LOCAL_RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
    )
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = resolve_device(device)
    except ValueError as e:  # a ConfigError: gpt-train reports it in one line, exit code 2
        raise ConfigError(f"--device {e}") from None
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", d.local_rank if d.enabled else torch.cuda.current_device())
        torch.cuda.set_device(dev)
    d.device = dev
    if d.enabled and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return d, dev


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def mean(value: float, d: Dist) -> float:
    """The average of `value` over ranks."""
    if not d.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return float(t.item()) / d.world_size


def any_rank(flag: bool, d: Dist) -> bool:
    """True on every rank if it is true on any (e.g. one rank got SIGTERM: all stop together)."""
    if not d.enabled:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather(obj: Any, d: Dist) -> list:
    """Every rank's `obj`, in rank order (on every rank)."""
    if not d.enabled:
        return [obj]
    out: list = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()
