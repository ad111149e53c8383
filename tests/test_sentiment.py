"""The public sentiment reward: trained on public reviews only, accurate on held-out IMDb, scored per row."""

import pytest

from lit_dprl.data.imdb import load_imdb_reviews, split_imdb
from lit_dprl.sentiment import accuracy_report, imdb_sentiment


def test_reward_measures_sentiment_and_scores_each_row_on_its_own():
    good = "This film was wonderful, a moving and beautifully acted story."
    bad = "This film was awful, a boring and badly acted mess."
    scores = imdb_sentiment(["", ""], [good, bad])
    assert scores[0] > 0 > scores[1]
    # one row's score does not depend on the other rows of the call
    assert imdb_sentiment([""], [good]) == pytest.approx([scores[0]])
    assert imdb_sentiment(["", "", ""], [bad, "ok", good])[2] == pytest.approx(scores[0])
    with pytest.raises(ValueError, match="prompts"):
        imdb_sentiment(["a"], ["b", "c"])


def test_accurate_on_held_out_reviews_and_on_short_snippets():
    splits = split_imdb(load_imdb_reviews(), seed=0)
    report = accuracy_report()
    assert report["test_reviews"] == len(splits["test"])
    assert report["accuracy"] >= 0.85
    assert report["accuracy_first_25_words"] > 0.65  # short snippets carry less sentiment
