"""Splits: sizes, determinism, stratification, and near-duplicate groups never straddling two splits."""

from __future__ import annotations

import pytest

from tunesmith.data.split import split_indices
from tunesmith.errors import DataError


def test_sizes_by_fraction_and_by_count_cover_every_row_once():
    parts = split_indices(100, validation=0.1, test=25, seed=3)
    assert [len(parts[s]) for s in ("train", "validation", "test")] == [65, 10, 25]
    assert sorted(parts["train"] + parts["validation"] + parts["test"]) == list(range(100))


def test_same_seed_same_split_other_seed_other_split():
    assert split_indices(50, 0.2, 0.2, seed=1) == split_indices(50, 0.2, 0.2, seed=1)
    assert split_indices(50, 0.2, 0.2, seed=1) != split_indices(50, 0.2, 0.2, seed=2)


def test_stratified_split_keeps_label_proportions():
    labels = ["pos"] * 80 + ["neg"] * 20
    parts = split_indices(100, validation=0.1, test=0.1, seed=0, strata=labels)
    for side in ("validation", "test"):
        got = [labels[i] for i in parts[side]]
        assert got.count("pos") == 8 and got.count("neg") == 2


def test_groups_stay_in_one_split():
    """Rows 0 and 99 are near-duplicates (group 'dup'); wherever they go, they go together."""
    groups = ["dup"] + [f"g{i}" for i in range(1, 99)] + ["dup"]
    for seed in range(20):
        parts = split_indices(100, validation=0.2, test=0.2, seed=seed, groups=groups)
        sides = {side for side, rows in parts.items() if 0 in rows or 99 in rows}
        assert len(sides) == 1, (seed, sides)


def test_large_groups_move_whole():
    groups = [i // 10 for i in range(100)]  # ten groups of ten
    parts = split_indices(100, validation=0.2, test=0.1, seed=0, groups=groups)
    for side, rows in parts.items():
        assert len({groups[i] for i in rows}) * 10 == len(rows), side
    assert (len(parts["validation"]), len(parts["test"])) == (20, 10)


@pytest.mark.parametrize("kwargs,message", [
    ({"validation": 0.6, "test": 0.5}, "leave no training rows"),
    ({"validation": -0.1}, "data.split.validation: must not be negative"),
    ({"test": 2.5}, "data.split.test: a count must be a whole number"),
])
def test_bad_sizes_are_refused(kwargs, message):
    with pytest.raises(DataError, match=message):
        split_indices(10, **kwargs)
