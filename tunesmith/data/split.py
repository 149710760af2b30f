"""Deterministic train / validation / test splits that never cut a group of near-duplicates in two.

    parts = split_indices(n, validation=0.1, test=100, seed=0, strata=labels, groups=near_dup_group_ids)
    parts["train"], parts["validation"], parts["test"]   # lists of row indices, each sorted

A size below 1 is a fraction of the rows, 1 or more a count. With `strata` (a label or task per row), each
stratum is split in proportion. With `groups` (a group id per row, e.g. near-duplicate clusters), whole groups
go to one side, so a near-duplicate planted in train and test ends up in one split only.

`split_arrays` does the same on integer codes and returns arrays: per-row state is a few numpy arrays, so a
split of millions of rows needs no Python object per row.
"""

from __future__ import annotations

import random
from typing import Hashable, Sequence

import numpy as np

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
    parts = split_arrays(num_rows, validation, test, seed, stratum_codes(strata) if strata is not None else None,
                         _first_seen_codes(groups) if groups is not None else None)
    return {name: rows.tolist() for name, rows in parts.items()}


def split_arrays(
    num_rows: int,
    validation: float = 0.0,
    test: float = 0.0,
    seed: int = 0,
    strata: np.ndarray | None = None,
    groups: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """`split_indices` on codes.

    Args:
        strata: (N,) int stratum of each row; strata are dealt in ascending code order (see `stratum_codes`).
        groups: (N,) int group of each row; rows with equal codes stay together.
    Returns:
        Sorted (K,) int64 row indices of each split.
    """
    want = {"validation": _size(validation, num_rows, "validation"), "test": _size(test, num_rows, "test")}
    if want["validation"] + want["test"] >= num_rows and num_rows:
        raise DataError(f"data.split: validation ({want['validation']}) + test ({want['test']}) rows leave no "
                        f"training rows out of {num_rows}")
    unit_of_row, first_rows = _units(num_rows, groups)  # units: rows that must stay together
    sizes = np.bincount(unit_of_row, minlength=len(first_rows))
    unit_stratum = strata[first_rows] if strata is not None else np.zeros(len(first_rows), dtype=np.int64)
    rng = random.Random(seed)
    dealt: dict[str, list[np.ndarray]] = {name: [] for name in SPLITS}
    for members in _by_stratum(unit_stratum):
        order = list(range(len(members)))
        rng.shuffle(order)  # the permutation random.shuffle gives any sequence of this length
        members = members[order]
        share = int(sizes[members].sum())
        for side, units in _deal(members, sizes, {k: round(v * share / num_rows) for k, v in want.items()}).items():
            dealt[side].append(units)
    side_of_unit = np.zeros(len(first_rows), dtype=np.int8)
    for code, side in enumerate(SPLITS):
        side_of_unit[_top_up(dealt, sizes, want)[side]] = code
    side_of_row = side_of_unit[unit_of_row]
    return {side: np.flatnonzero(side_of_row == code) for code, side in enumerate(SPLITS)}


def stratum_codes(values: Sequence[Hashable]) -> np.ndarray:
    """(N,) int code of each row's stratum, ascending in the order strata are dealt: sorted by `repr`."""
    distinct = sorted(set(values), key=repr)
    code = {value: i for i, value in enumerate(distinct)}
    return np.fromiter((code[v] for v in values), dtype=np.int64, count=len(values))


def _first_seen_codes(values: Sequence[Hashable]) -> np.ndarray:
    code: dict[Hashable, int] = {}
    return np.fromiter((code.setdefault(v, len(code)) for v in values), dtype=np.int64, count=len(values))


def _size(value: float, num_rows: int, name: str) -> int:
    if value < 0:
        raise DataError(f"data.split.{name}: must not be negative, got {value}")
    if value < 1:
        return round(value * num_rows)
    if value != int(value):
        raise DataError(f"data.split.{name}: a count must be a whole number, got {value}")
    return int(value)


def _units(num_rows: int, groups: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(N,) unit of each row, units numbered in order of their first row; and (U,) the first row of each."""
    if groups is None:
        rows = np.arange(num_rows)
        return rows, rows
    _, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inverse.reshape(-1)], np.sort(first)


def _by_stratum(unit_stratum: np.ndarray) -> list[np.ndarray]:
    """The units of each stratum, strata in ascending code order, units in their own order."""
    order = np.argsort(unit_stratum, kind="stable")
    cuts = np.flatnonzero(np.diff(unit_stratum[order])) + 1
    return np.split(order, cuts) if len(order) else []


def _deal(units: np.ndarray, sizes: np.ndarray, targets: dict[str, int]) -> dict[str, np.ndarray]:
    """Test first, then validation, then train: each takes whole units, in order, until it reaches its target
    (a side takes a unit while the rows it holds are below its target)."""
    out = {}
    for side in ("test", "validation"):
        held_before = np.cumsum(sizes[units]) - sizes[units]  # rows the side holds before each unit
        take = int(np.searchsorted(held_before, targets[side], side="left"))
        out[side], units = units[:take], units[take:]
    out["train"] = units
    return out


def _top_up(dealt: dict[str, list[np.ndarray]], sizes: np.ndarray, want: dict[str, int]) -> dict[str, np.ndarray]:
    """Rounding per stratum can leave a split short of its size: move whole units over from the end of train,
    one at a time, until it is not short any more or one training unit is left."""
    out = {side: np.concatenate(units or [np.zeros(0, dtype=np.int64)]) for side, units in dealt.items()}
    for side in ("test", "validation"):
        short = want[side] - int(sizes[out[side]].sum())
        if short <= 0:
            continue
        tail = out["train"][::-1][: len(out["train"]) - 1]  # the units train can give, in the order it gives them
        count = min(int(np.searchsorted(np.cumsum(sizes[tail]), short, side="left")) + 1, len(tail))
        out[side] = np.concatenate((out[side], tail[:count]))
        out["train"] = out["train"][: len(out["train"]) - count]
    return out
