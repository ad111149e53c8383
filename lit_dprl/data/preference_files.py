"""Reading preference files: the two layouts, their conversion to pairs, and the checks, with errors that name
the line of the offending record.

One record is one preference pair ``(prompt, chosen, rejected)`` and is one privacy unit. Two file
layouts are read (JSONL / JSON / CSV / parquet, through ``datasets``):

- the plain layout: fields ``prompt``, ``chosen``, ``rejected`` and optionally ``user_id``;
- OpenAI ``summarize_from_feedback`` comparisons: ``info`` (a dict with ``post``, ``title``,
  ``subreddit``), ``summaries`` (a list of two dicts with ``text``) and ``choice`` (0 or 1, the index of
  the preferred summary); see :func:`summarize_from_feedback_to_pair`.

Files are read by ``lit_dprl.data.files.load_local_dataset`` (local files only, UTF-8 checked).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import datasets

from lit_dprl.data.files import load_local_dataset

PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")
SUMMARIZE_FROM_FEEDBACK_FIELDS = ("info", "summaries", "choice")
MAX_LISTED_LINES = 20


class PreferenceDataError(ValueError):
    """A preference file that cannot be used as it is."""


# ---------------------------------------------------------------------------------------------------
# Naming records in error messages
# ---------------------------------------------------------------------------------------------------


def record_location(path: Path, index: int) -> str:
    """Where record ``index`` (0-based) is: its line in a JSONL/CSV file (one line per row), else its number."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return f"line {index + 1}"
    if suffix == ".csv":
        return f"line {index + 2}"  # line 1 is the header
    return f"record {index + 1}"


def _listed(locations: list[str]) -> str:
    shown = ", ".join(locations[:MAX_LISTED_LINES])
    more = len(locations) - MAX_LISTED_LINES
    return shown + (f" and {more} more" if more > 0 else "")


# ---------------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------------


def summarize_from_feedback_prompt(info: dict) -> str:
    """The TL;DR query of the N+ recipe for one ``info`` dict.

    Reddit posts: ``"SUBREDDIT: r/{subreddit}\\n\\nTITLE: {title}\\n\\nPOST: {post}\\n\\nTL;DR:"``;
    news items (CNN/DM rows have ``article`` instead of ``post``): ``"{article}\\n\\nTL;DR:"``.
    """
    if info.get("post"):
        return (
            f"SUBREDDIT: r/{info.get('subreddit') or ''}\n\nTITLE: {(info.get('title') or '').strip()}\n\n"
            f"POST: {info['post'].strip()}\n\nTL;DR:"
        )
    if info.get("article"):
        return f"{info['article'].strip()}\n\nTL;DR:"
    raise PreferenceDataError(f"comparison info has neither 'post' nor 'article' (keys: {sorted(info)})")


def summarize_from_feedback_to_pair(row: dict) -> dict:
    """Convert one OpenAI ``summarize_from_feedback`` comparison into ``{prompt, chosen, rejected, user_id}``.

    ``chosen = " " + summaries[choice].text.strip()``, ``rejected = " " + summaries[1 - choice].text.strip()``
    (one space after "TL;DR:", as in the N+ recipe); ``user_id`` is the labeller (``worker``) when present.
    """
    summaries, choice = row["summaries"], row["choice"]
    if not isinstance(summaries, list) or len(summaries) != 2:
        raise PreferenceDataError(f"'summaries' must be a list of two summaries, got {summaries!r}")
    if choice not in (0, 1):
        raise PreferenceDataError(f"'choice' must be 0 or 1 (the preferred summary), got {choice!r}")
    return {
        "prompt": summarize_from_feedback_prompt(row["info"]),
        "chosen": " " + summaries[choice]["text"].strip(),
        "rejected": " " + summaries[1 - choice]["text"].strip(),
        "user_id": row.get("worker"),
    }


def preference_rows(records: datasets.Dataset, path: Path) -> list[dict]:
    """Records in either supported layout as ``{prompt, chosen, rejected, user_id}`` dicts (user_id may be None)."""
    fields = set(records.column_names)
    if set(PREFERENCE_FIELDS) <= fields:
        has_user = "user_id" in fields
        return [
            {
                **{name: row[name] for name in PREFERENCE_FIELDS},
                "user_id": row["user_id"] if has_user else None,
            }
            for row in records
        ]
    if set(SUMMARIZE_FROM_FEEDBACK_FIELDS) <= fields:
        rows = []
        for index, row in enumerate(records):
            try:
                rows.append(summarize_from_feedback_to_pair(row))
            except PreferenceDataError as err:
                raise PreferenceDataError(f"{path}, {record_location(path, index)}: {err}") from None
        return rows
    missing = [name for name in PREFERENCE_FIELDS if name not in fields]
    raise PreferenceDataError(
        f"{path} lacks the field(s) {missing}; fields present: {sorted(fields)}. Expected 'prompt', 'chosen', "
        "'rejected' (optional 'user_id'), or the summarize_from_feedback comparison layout "
        "('info', 'summaries', 'choice')."
    )


def check_preference_rows(rows: Sequence[dict], path: Path) -> None:
    """Refuse non-text or empty fields and pairs whose chosen text equals the rejected text."""
    not_text = [
        record_location(path, i)
        for i, row in enumerate(rows)
        if not all(isinstance(row[name], str) for name in PREFERENCE_FIELDS)
    ]
    if not_text:
        raise PreferenceDataError(
            f"{path}: {len(not_text)} row(s) have a missing or non-text prompt/chosen/rejected: {_listed(not_text)}."
        )
    empty = [
        record_location(path, i) for i, row in enumerate(rows) if not (row["chosen"] and row["rejected"])
    ]
    if empty:
        raise PreferenceDataError(
            f"{path}: {len(empty)} row(s) have an empty chosen or rejected response: {_listed(empty)}."
        )
    ties = [record_location(path, i) for i, row in enumerate(rows) if row["chosen"] == row["rejected"]]
    if ties:
        raise PreferenceDataError(
            f"{path}: {len(ties)} row(s) have chosen identical to rejected, which carries no preference: "
            f"{_listed(ties)}. Remove these rows."
        )


def read_preference_file(path: str | Path) -> list[dict]:
    """Load, convert and check a preference file; returns ``{prompt, chosen, rejected, user_id}`` dicts."""
    path = Path(path).expanduser()
    rows = preference_rows(load_local_dataset(path), path)
    check_preference_rows(rows, path)
    return rows
