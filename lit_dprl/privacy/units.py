"""The privacy unit (a row or a user), the training set size N in units, and δ.

Row-level DP protects one training row; user-level DP protects every row of one user (the rows
sharing a user id). N counts units, the Poisson rate is q = batch_size / N, and the default δ is
N^-1.1, strictly below 1/N: δ = 1/N would be met by a mechanism that publishes one whole unit.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lit_dprl.privacy.refusals import DPConfigurationError
from lit_dprl.privacy.report import ROW_UNIT, user_unit

DELTA_EXPONENT = 1.1


def default_delta(num_units: int) -> float:
    """``δ = N^-1.1``: strictly below 1/N for N ≥ 2."""
    return num_units**-DELTA_EXPONENT


def dataset_user_ids(dataset: Any, user_id_field: str) -> list[Any] | None:
    """The user id of every row, or None if the dataset has none.

    Looked up as a column ``user_id_field`` (🤗 ``datasets``), a sequence attribute ``<user_id_field>s``
    with one id per row (e.g. ``PreferenceDataset.user_ids``), or the key ``user_id_field`` of mapping
    rows. A row whose id is None has no user: then the dataset is treated as having no user ids.
    """
    n = len(dataset)
    ids: Sequence[Any] | None = None
    if user_id_field in (getattr(dataset, "column_names", None) or ()):
        ids = dataset[user_id_field]
    elif isinstance(getattr(dataset, f"{user_id_field}s", None), Sequence):
        ids = getattr(dataset, f"{user_id_field}s")
    elif n > 0 and isinstance(dataset[0], Mapping) and user_id_field in dataset[0]:
        ids = [dataset[i][user_id_field] for i in range(n)]
    if ids is None or len(ids) != n or any(i is None for i in ids):
        return None
    return list(ids)


def units_from_ids(ids: Sequence[Any], max_rows_per_unit: int | None = None) -> list[list[int]]:
    """The row indices of each distinct id, in order of first appearance; each unit keeps its first
    ``max_rows_per_unit`` rows (in dataset order) when that is set, a choice that depends on no other unit."""
    rows: dict[Any, list[int]] = {}
    for index, unit_id in enumerate(ids):
        rows.setdefault(unit_id, []).append(index)
    return [r[:max_rows_per_unit] if max_rows_per_unit else r for r in rows.values()]


@dataclass
class TrainingUnits:
    """What the accountant needs to know about the training set."""

    privacy_unit: str  # "row" or "user"
    description: str  # the unit in words, for the report
    num_units: int  # N
    num_rows: int
    batch_size: int  # expected units per (global) batch
    delta: float
    delta_rule: str
    rows_of_unit: list[list[int]] | None  # the rows of each user (None: each row is a unit)
    warnings: list[str] = field(default_factory=list)

    @property
    def sample_rate(self) -> float:
        """q = batch_size / N."""
        return self.batch_size / self.num_units

    def report_fields(self) -> dict[str, Any]:
        """This part of ``privacy.json``: δ and its rule, the unit and the neighbouring relation, N and q."""
        return {
            "delta": self.delta,
            "delta_rule": self.delta_rule,
            "privacy_unit": self.description,
            "neighbouring_relation": f"add or remove one privacy unit ({self.privacy_unit}) with all its rows",
            "dataset_size": self.num_units,
            "dataset_rows": self.num_rows,
            "expected_batch_size": self.batch_size,
            "sample_rate": self.sample_rate,
        }


def training_units(
    dataset: Any,
    batch_size: int,
    *,
    privacy_unit: str,
    user_id_field: str,
    max_rows_per_user: int | None,
    target_delta: float | None,
) -> TrainingUnits:
    """N, the user grouping, δ and its rule, and warnings (weak δ, group privacy only) for a training set."""
    try:
        num_rows = len(dataset)
    except TypeError as err:
        raise DPConfigurationError("the training dataset must be map-style with a length") from err
    ids = dataset_user_ids(dataset, user_id_field)
    warnings = []
    rows_of_unit = None
    if privacy_unit == "user":
        if ids is None:
            raise DPConfigurationError(
                f"privacy_unit='user' needs a user id for every row: a column {user_id_field!r}, an attribute "
                f"{user_id_field + 's'!r} on the dataset or that key in each row (set user_id_field to the "
                "column that names the user)"
            )
        rows_of_unit = units_from_ids(ids, max_rows_per_user)
        description, words = user_unit(user_id_field, max_rows_per_user), "users"
    else:
        description, words = ROW_UNIT, "training examples"
        largest = max(Counter(ids).values()) if ids else 1
        if largest > 1:
            warnings.append(
                f"the training data has a user id column {user_id_field!r} and a user has up to {largest} rows, "
                "but the privacy unit is one row: a user with m rows is protected only by group privacy, about "
                f"(m·ε, m·e^((m-1)·ε)·δ) (here up to m = {largest}). Use privacy_unit='user' to protect users."
            )
    n = num_rows if rows_of_unit is None else len(rows_of_unit)
    if n < 2:
        raise DPConfigurationError(f"DP training needs at least 2 privacy units ({words}), got {n}")
    if not 1 <= batch_size <= n:
        raise DPConfigurationError(
            f"the expected batch size {batch_size} does not fit the {n} {words}: the Poisson rate q = batch_size / N "
            f"= {batch_size / n:.3g} must be in (0, 1]; set batch_size between 1 and {n}"
        )
    if target_delta is None:
        delta = default_delta(n)
        rule = f"default: δ = N^-{DELTA_EXPONENT} with N = {n} {words}, strictly below 1/N"
    else:
        delta, rule = target_delta, "target_delta given by the user"
        if target_delta >= 1.0 / n:
            warnings.append(
                f"target_delta={target_delta:g} is at least 1/N = {1.0 / n:g} (N = {n} {words}): a mechanism "
                f"that publishes one whole {privacy_unit} at random meets such a δ, so this guarantee is weak; "
                f"the default is N^-{DELTA_EXPONENT}"
            )
    return TrainingUnits(
        privacy_unit, description, n, num_rows, batch_size, delta, rule, rows_of_unit, warnings
    )


def chunk_bounds(size: int, limit: int, row_units: Sequence[int] | None) -> list[tuple[int, int]]:
    """``[begin, end)`` chunks of at most ``limit`` rows covering ``size`` rows; with ``row_units`` a unit's
    (consecutive) rows stay in one chunk, which may then exceed ``limit`` if the unit alone does."""
    if row_units is None:
        return [(s, min(s + limit, size)) for s in range(0, size, limit)]
    starts = [i for i in range(size) if i == 0 or row_units[i] != row_units[i - 1]]
    bounds, begin = [], 0
    for start, end in zip(starts, [*starts[1:], size], strict=True):
        if end - begin > limit and start > begin:
            bounds.append((begin, start))
            begin = start
    return [*bounds, (begin, size)] if size else []
