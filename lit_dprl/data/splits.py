"""Seeded, disjoint splits of a ``datasets.Dataset``, by row or by user.

The paper's privacy argument (parallel composition over D1, D2, D3) needs every privacy unit in at most
one of the stage datasets. When a dataset has a user column, all rows of one user go to the same split;
otherwise every row is its own unit.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from datasets import Dataset, DatasetDict

USER_COLUMN = "user_id"


def split_sizes(n: int, fractions: Mapping[str, float]) -> dict[str, int]:
    """Cut ``n`` units at ``round(n · cumsum(fractions))``: sizes are non-negative and sum to ``n``."""
    if not fractions:
        raise ValueError(
            "fractions is empty: give at least one split name with its share, e.g. {'train': 1.0}"
        )
    shares = np.array(list(fractions.values()), dtype=float)
    if (shares < 0).any() or not np.isclose(shares.sum(), 1.0, atol=1e-6):
        raise ValueError(
            f"split fractions must be >= 0 and sum to 1, got {dict(fractions)} (sum {shares.sum():.6g})"
        )
    bounds = np.rint(np.cumsum(shares) * n).astype(int)
    bounds[-1] = n
    sizes = np.diff(bounds, prepend=0)
    return dict(zip(fractions, sizes.tolist(), strict=True))


def assign_splits(
    dataset: Dataset, fractions: Mapping[str, float], seed: int, user_column: str | None = USER_COLUMN
) -> DatasetDict:
    """Split ``dataset`` into disjoint named parts holding ``fractions`` of its units.

    A unit is a user (the distinct values of ``user_column``, when the dataset has that column) or else a
    row. Units are put in a random order drawn from ``seed`` and cut by :func:`split_sizes`, so the result
    depends only on the dataset, the fractions and the seed. Each part lists its rows in that random order,
    so the first ``n`` rows of a part are a uniform random sample of its units.
    """
    if user_column is not None and user_column in dataset.column_names:
        users = dataset[user_column]
        rows_of_user: dict[object, list[int]] = {}
        for row, user in enumerate(users):
            rows_of_user.setdefault(user, []).append(row)
        units = list(rows_of_user.values())
    else:
        units = [[row] for row in range(len(dataset))]
    order = np.random.default_rng(seed).permutation(len(units))
    parts, start = {}, 0
    for name, size in split_sizes(len(units), fractions).items():
        rows = [row for unit in order[start : start + size] for row in units[unit]]
        parts[name] = dataset.select(rows)
        start += size
    return DatasetDict(parts)


def split_test_and_private(
    dataset: Dataset,
    private_fractions: Mapping[str, float],
    test_size: float,
    seed: int,
    user_column: str | None = USER_COLUMN,
) -> DatasetDict:
    """A held-out ``"test"`` split first, then the rest cut into disjoint private sets.

    The test split depends only on ``(dataset, test_size, seed)``, so changing ``private_fractions``
    never moves an example in or out of it. Returns ``{"test": ..., **private sets}``.
    """
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size must be a fraction in (0, 1), got {test_size}")
    if "test" in private_fractions:
        raise ValueError("'test' is reserved for the held-out split; give the private sets other names")
    held_out = assign_splits(dataset, {"test": test_size, "private": 1.0 - test_size}, seed, user_column)
    private = assign_splits(held_out["private"], private_fractions, seed + 1, user_column)
    return DatasetDict({"test": held_out["test"], **private})
