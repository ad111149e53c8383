"""Disjoint splits by a keyed hash of each privacy unit, and the provenance that proves them disjoint.

Every unit (a user, when the data has a ``user_id`` column, else one row identified by a hash of its
content) is assigned on its own: ``u = HMAC-SHA256(key, purpose ‖ unit id)`` read as a number in [0, 1),
and the unit goes to the split whose interval of cumulative fractions holds ``u``. Adding or removing one
unit therefore moves no other unit between splits, and per-unit choices (an IMDb prompt's word count, a
preference pair's partner) are drawn the same way, from that unit's own hash under another ``purpose``.
Stages that split the same dataset with the same key, fractions and unit but train on different splits
see disjoint units: parallel composition holds (``lit_dprl.privacy.composition`` checks it from the provenance).

The key is public metadata (``split_key(seed)`` from the data modules' ``seed``): it fixes which split
holds a unit, which the DP guarantee does not hide. The guarantee is about the training set of a stage.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping, Sequence
from typing import Any

from datasets import Dataset, DatasetDict, Features, Value

from lit_dprl.privacy.report import DATA_SPLIT_KEY

USER_COLUMN = "user_id"
UNIT_COLUMN = "unit_id"  # added to every split: the stable id of the row's privacy unit
SPLIT_PURPOSE = "split"
ORDER_PURPOSE = "order"
HOLDOUT_PURPOSE = "holdout"  # train/validation split of one source (nests inside any SPLIT_PURPOSE split)
KEY_PREFIX = "lit_dprl-split-v1"
PROVENANCE_KEY = DATA_SPLIT_KEY  # where a privacy.json carries a data module's split_provenance()
ASSIGNMENT = "u = HMAC-SHA256(key, purpose ‖ 0x00 ‖ unit id)[:8] / 2^64; a unit goes to the split whose interval of cumulative fractions holds u"


def split_key(seed: int | str) -> bytes:
    """The HMAC key of the data modules' ``seed``: ``b"lit_dprl-split-v1:<seed>"`` (public, like the seed)."""
    return f"{KEY_PREFIX}:{seed}".encode()


def key_fingerprint(key: bytes) -> str:
    """First 16 hex digits of SHA-256(key): names the key in reports without repeating it."""
    return hashlib.sha256(key).hexdigest()[:16]


def content_id(row: Mapping[str, Any]) -> str:
    """``"sha256:<hex>"`` of the row's canonical JSON (sorted keys; user and unit columns left out)."""
    content = {k: v for k, v in row.items() if k not in (USER_COLUMN, UNIT_COLUMN)}
    text = json.dumps(content, sort_keys=True, ensure_ascii=False, default=str)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def unit_id(row: Mapping[str, Any], user_column: str | None = USER_COLUMN) -> str:
    """``"user:<id>"`` when ``row[user_column]`` is set, else the row's :func:`content_id`."""
    user = row.get(user_column) if user_column is not None else None
    return f"user:{user}" if user is not None else content_id(row)


def unit_kind(unit_ids: Sequence[str]) -> str:
    """Words for the privacy unit behind ``unit_ids`` (for reports)."""
    users = sum(u.startswith("user:") for u in unit_ids)
    if users == len(unit_ids):
        return f"user (all rows of one {USER_COLUMN})"
    if users == 0:
        return "row (identified by a SHA-256 of its content)"
    return f"user where {USER_COLUMN} is set, else row (content hash)"


def keyed_uniform(key: bytes, unit: str, purpose: str) -> float:
    """``u = int(HMAC-SHA256(key, purpose ‖ 0x00 ‖ unit)[:8]) / 2^64``, uniform in [0, 1) for a random key."""
    digest = hmac.new(key, f"{purpose}\x00{unit}".encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def keyed_choice(key: bytes, unit: str, purpose: str, n: int) -> int:
    """``floor(u · n)`` of :func:`keyed_uniform`: one of ``0 .. n-1`` that depends on this unit only."""
    if n < 1:
        raise ValueError(f"cannot choose among {n} options")
    return min(int(keyed_uniform(key, unit, purpose) * n), n - 1)


def check_fractions(fractions: Mapping[str, float]) -> None:
    """``ValueError`` unless the fractions are non-empty, >= 0 and sum to 1."""
    if not fractions:
        raise ValueError(
            "fractions is empty: give at least one split name with its share, e.g. {'train': 1.0}"
        )
    total = sum(fractions.values())
    if any(share < 0 for share in fractions.values()) or abs(total - 1.0) > 1e-6:
        raise ValueError(
            f"split fractions must be >= 0 and sum to 1, got {dict(fractions)} (sum {total:.6g})"
        )


def bucket(u: float, fractions: Mapping[str, float]) -> str:
    """The first split ``s`` with ``u < Σ_{t ≤ s} fractions[t]`` (the last split takes any rounding rest)."""
    bound = 0.0
    for name, share in fractions.items():
        bound += share
        if u < bound and share > 0:
            return name
    return next(name for name in reversed(list(fractions)) if fractions[name] > 0)


def assign_units(
    unit_ids: Sequence[str], fractions: Mapping[str, float], key: bytes, purpose: str = SPLIT_PURPOSE
) -> list[str]:
    """The split of every unit id: ``bucket(keyed_uniform(key, id, purpose), fractions)``."""
    check_fractions(fractions)
    return [bucket(keyed_uniform(key, unit, purpose), fractions) for unit in unit_ids]


def assign_splits(
    dataset: Dataset,
    fractions: Mapping[str, float],
    key: bytes,
    user_column: str | None = USER_COLUMN,
    purpose: str = SPLIT_PURPOSE,
) -> DatasetDict:
    """Split ``dataset`` into disjoint named parts by :func:`assign_units`, one part per fraction.

    A unit is a user (rows sharing ``user_column``, when the dataset has it) or one row (its content
    hash); all rows of a unit land in one part. Each part gets a ``unit_id`` column and lists its rows in
    the order of ``keyed_uniform(key, unit, "order")``: its first ``n`` rows are the ``n`` units of
    smallest keyed value (a sample that no position decides; adding or removing another unit changes it
    by at most one unit). Nested splits need their own ``purpose``.
    """
    if user_column is not None and user_column not in dataset.column_names:
        user_column = None
    columns = dataset.to_dict()
    ids = [
        unit_id(dict(zip(columns, row, strict=True)), user_column)
        for row in zip(*columns.values(), strict=True)
    ]
    names = assign_units(ids, fractions, key, purpose)
    rows_of: dict[str, list[int]] = {name: [] for name in fractions}
    for row, name in enumerate(names):
        rows_of[name].append(row)
    order = {unit: keyed_uniform(key, unit, ORDER_PURPOSE) for unit in set(ids)}
    features = Features({**dataset.features, UNIT_COLUMN: Value("string")})
    with_ids = Dataset.from_dict({**columns, UNIT_COLUMN: ids}, features=features)
    return DatasetDict(
        {
            name: with_ids.select(sorted(rows, key=lambda row: (order[ids[row]], row)))
            for name, rows in rows_of.items()
        }
    )


def split_provenance(
    dataset: str,
    split: str,
    fractions: Mapping[str, float],
    key: bytes,
    unit: str,
    public: bool,
    purpose: str = SPLIT_PURPOSE,
) -> dict[str, Any]:
    """Where a stage's training data comes from, enough to prove two stages' data disjoint.

    Two stages whose provenance agrees in ``dataset``, ``key_fingerprint``, ``fractions``, ``unit`` and
    ``assignment`` and differs in ``split`` train on disjoint units.
    """
    return {
        "dataset": dataset,
        "split": split,
        "fractions": dict(fractions),
        "unit": unit,
        "key_fingerprint": key_fingerprint(key),
        "assignment": f"{ASSIGNMENT} (purpose {purpose!r})",
        "public": public,
        "key_is_public": "the split key is a public config value (the data seed): which split holds a unit is "
        "public metadata, not protected by ε",
    }


def parts_provenance(
    dataset: str,
    parts: DatasetDict,
    split: str,
    fractions: Mapping[str, float],
    key: bytes,
    public: bool,
    purpose: str = SPLIT_PURPOSE,
) -> dict[str, Any]:
    """:func:`split_provenance` of ``parts[split]`` from :func:`assign_splits`, its unit read off every part."""
    ids = [unit for part in parts.values() for unit in part[UNIT_COLUMN]]
    return split_provenance(dataset, split, fractions, key, unit_kind(ids), public, purpose)


def holdout(
    dataset: Dataset, val_fraction: float, key: bytes, name: str, public: bool
) -> tuple[DatasetDict, dict[str, Any]]:
    """``train``/``validation`` parts of ``dataset`` (keyed hash, purpose "holdout") and the provenance of
    the ``train`` part; ``name`` names the dataset in the provenance."""
    fractions = {"train": 1.0 - val_fraction, "validation": val_fraction}
    parts = assign_splits(dataset, fractions, key, purpose=HOLDOUT_PURPOSE)
    return parts, parts_provenance(name, parts, "train", fractions, key, public, HOLDOUT_PURPOSE)
