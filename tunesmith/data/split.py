"""Deterministic train / validation / test splits that never cut a group of near-duplicates in two.

    parts = split_indices(n, validation=0.1, test=100, seed=0, strata=labels, groups=near_dup_group_ids)
    parts["train"], parts["validation"], parts["test"]   # lists of row indices, each sorted

A size below 1 is a fraction of the rows, 1 or more a count. With `strata` (a label or task per row), each
stratum is split in proportion. With `groups` (a group id per row, e.g. near-duplicate clusters), whole groups
go to one side, so a near-duplicate planted in train and test ends up in one split only.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Hashable, Sequence

from tunesmith.errors import DataError

SPLITS = ("train", "validation", "test")


def split_indices(
    num_rows: int,
    validation: float = 0.0,
    test: float = 0.0,
    seed: int = 0,
    strata: Sequence[Hashable] | None = None,
    groups: Sequence[Hashable] | None = None,
) -> dict[str, list[int]]:
    """Row indices of each split. Deterministic for the same arguments."""
    want = {"validation": _size(validation, num_rows, "validation"), "test": _size(test, num_rows, "test")}
    if want["validation"] + want["test"] >= num_rows and num_rows:
        raise DataError(f"data.split: validation ({want['validation']}) + test ({want['test']}) rows leave no "
                        f"training rows out of {num_rows}")
    units = _units(num_rows, groups)  # lists of row indices that must stay together
    by_stratum: dict[Hashable, list[list[int]]] = defaultdict(list)
    for unit in units:
        by_stratum[strata[unit[0]] if strata is not None else None].append(unit)
    rng = random.Random(seed)
    parts: dict[str, list[list[int]]] = {name: [] for name in SPLITS}
    for stratum in sorted(by_stratum, key=repr):
        members = by_stratum[stratum]
        rng.shuffle(members)
        size = sum(len(u) for u in members)
        _deal(members, {k: round(v * size / num_rows) for k, v in want.items()}, parts)
    _top_up(parts, want)
    return {name: sorted(i for unit in units for i in unit) for name, units in parts.items()}


def _size(value: float, num_rows: int, name: str) -> int:
    if value < 0:
        raise DataError(f"data.split.{name}: must not be negative, got {value}")
    if value < 1:
        return round(value * num_rows)
    if value != int(value):
        raise DataError(f"data.split.{name}: a count must be a whole number, got {value}")
    return int(value)


def _units(num_rows: int, groups: Sequence[Hashable] | None) -> list[list[int]]:
    if groups is None:
        return [[i] for i in range(num_rows)]
    members: dict[Hashable, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    return list(members.values())


def _deal(units: list[list[int]], targets: dict[str, int], parts: dict[str, list[list[int]]]) -> None:
    """Test first, then validation, then train: each takes whole units until it reaches its target."""
    got = {"validation": 0, "test": 0}
    for unit in units:
        side = next((s for s in ("test", "validation") if got[s] < targets[s]), "train")
        parts[side].append(unit)
        if side != "train":
            got[side] += len(unit)


def _top_up(parts: dict[str, list[list[int]]], want: dict[str, int]) -> None:
    """Rounding per stratum can leave a split short of its size: move whole units over from train."""
    for side in ("test", "validation"):
        while sum(map(len, parts[side])) < want[side] and len(parts["train"]) > 1:
            parts[side].append(parts["train"].pop())
