"""Packed copies of weights (a kernel's own layout, made once for inference) must never outlive
the weight they were made from: `stamp` records the weight when it is packed, and `is_current`
says whether it is still that tensor, unchanged (same version counter and storage)."""

from __future__ import annotations

from torch import Tensor


def stamp(weight: Tensor) -> tuple:
    return (weight, weight._version, weight.data_ptr())


def is_current(stamped: tuple, weight: Tensor) -> bool:
    """Whether `weight` is the tensor `stamped` recorded, not replaced or written in place since."""
    return (
        bool(stamped)
        and stamped[0] is weight
        and stamped[1] == weight._version
        and stamped[2] == weight.data_ptr()
    )
