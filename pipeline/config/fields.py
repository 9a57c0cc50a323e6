"""Dataclass fields that carry their allowed values, so that one checker (`problem`) enforces them wherever a
schema is used: at composition (pipeline/config/checks.py) and when a tool builds a dataclass directly."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import field
from typing import Any


def at_least(minimum: float, default: Any):
    """A field whose value must be >= minimum."""
    return field(default=default, metadata={"min": minimum})


def greater_than(bound: float, default: Any):
    """A field whose value must be > bound."""
    return field(default=default, metadata={"gt": bound})


def in_range(minimum: float, maximum: float, default: Any):
    """A field whose value must lie in [minimum, maximum]."""
    return field(default=default, metadata={"min": minimum, "max": maximum})


def multiple_of(step: int, default: Any):
    """A field whose value must be a non-negative multiple of `step`."""
    return field(default=default, metadata={"min": 0, "step": step})


def one_of(choices: tuple, default: Any):
    """A field whose value must be one of `choices` (for sets that live in code, e.g. the backbone registry)."""
    return field(default=default, metadata={"choices": tuple(choices)})


def matching(pattern: str, allowed: str, default: Any):
    """A string field that must match the regular expression `pattern`; `allowed` says so to a person."""
    return field(default=default, metadata={"pattern": pattern, "allowed": allowed})


def problem(f: dataclasses.Field, value: Any) -> str | None:
    """What is wrong with `value` for field `f` ("must be > 0"), or None when it is allowed."""
    meta = f.metadata
    if "choices" in meta and value not in meta["choices"]:
        return f"must be one of {', '.join(map(str, meta['choices']))}"
    if "pattern" in meta and not re.fullmatch(meta["pattern"], str(value)):
        return f"must be {meta['allowed']}"
    if "step" in meta and value % meta["step"]:
        return f"must be a multiple of {meta['step']}"
    if "gt" in meta and not value > meta["gt"]:
        return f"must be > {meta['gt']}"
    if "min" in meta and "max" in meta and not meta["min"] <= value <= meta["max"]:
        return f"must be between {meta['min']} and {meta['max']}"
    if "min" in meta and not value >= meta["min"]:
        return f"must be >= {meta['min']}"
    return None


def problems(obj: Any, prefix: str = "") -> list[str]:
    """Every field of the dataclass instance `obj` (and of the dataclasses it nests) whose value is not allowed, as
    one line each: "prefix.key=value: must be ..."."""
    found = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            found += problems(value, f"{prefix}{f.name}.")
        elif (why := problem(f, value)) is not None:
            found.append(f"{prefix}{f.name}={value}: {why}")
    return found
