"""Judging the cells of a column once per distinct value. Pure."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

T = TypeVar("T")


def once_per_value(values: Iterable[Any], judge: Callable[[Any], T]) -> list[T]:
    """``judge`` of each value, computed once per distinct value: a table's column repeats its labels. Values
    are told apart by type too (1, 1.0 and True are equal keys but read differently); an unhashable value is
    judged on its own."""
    memo: dict[tuple[type, Any], T] = {}
    out: list[T] = []
    for v in values:
        key = (type(v), v)
        try:
            found = key in memo
        except TypeError:  # an unhashable value
            out.append(judge(v))
            continue
        if not found:
            memo[key] = judge(v)
        out.append(memo[key])
    return out
