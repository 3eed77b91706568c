"""The base of every request body: strict types (no "5" for 5, no true for 1, no NaN or
infinity), unknown fields ignored, whole floats taken as integers."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, model_validator


def _integral(v):
    """JSON Schema counts 1.0 as an integer, and some clients send whole numbers so: take them as
    ints (in lists too: token ids). Strict float fields still accept the int."""
    if type(v) is float and v.is_integer():
        return int(v)
    if isinstance(v, list):
        return [_integral(x) for x in v]
    return v


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _whole_numbers(cls, data):
        if isinstance(data, dict):
            return {k: _integral(v) for k, v in data.items()}
        return data
