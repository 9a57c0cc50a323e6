"""argparse types for the tools' numbers: a value that makes no sense is argparse's one line and exit 2, never a
ZeroDivisionError or a table of negative times. argparse names the option and the type's name in its message."""

from __future__ import annotations

import math


def _number(kind: type, name: str, ok):
    def parse(text: str):
        value = kind(text)  # ValueError: argparse says "invalid <name> value"
        if not ((kind is int or math.isfinite(value)) and ok(value)):  # an int has no float range to overflow
            raise ValueError(text)
        return value

    parse.__name__ = name
    return parse


positive_int = _number(int, "positive int", lambda v: v > 0)
non_negative_int = _number(int, "int at least 0", lambda v: v >= 0)
positive_float = _number(float, "positive number", lambda v: v > 0)
non_negative_float = _number(float, "number at least 0", lambda v: v >= 0)
fraction = _number(float, "fraction between 0 and 1", lambda v: 0 <= v <= 1)
