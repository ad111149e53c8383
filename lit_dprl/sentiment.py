"""A public sentiment reward that measures sentiment: TF-IDF + logistic regression on public reviews.

The paper rewards DP-PPO with a sentiment classifier trained on IMDb. Here the classifier is trained on
public text only: the public split of the shipped IMDb reviews (``lit_dprl.data.imdb.split_imdb``'s
``"public"``, disjoint from the private sets D1/D2/D3 and from the held-out test split) plus the Rotten
Tomatoes sentences. A bag of uni- and bigrams with logistic regression scores about 0.89 on the held-out IMDb
reviews and trains in seconds on a CPU, so rollouts are not slowed by scoring. Its weakness is the one of
every lexical model: repeating positive words raises the score; the KL penalty and the distinct-2 column
of the evaluation watch for that.

The reward of a response is the classifier's logit (log-odds of "positive") of prompt + response; each
response is scored on its own (no batch statistics), as the DP contract of reward functions requires.
The fitted classifier is cached in ``lit_dprl.models.CACHE_DIR`` by its settings.
"""

from __future__ import annotations

import functools
import hashlib
import json
import pickle
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from lit_dprl.data.imdb import load_imdb_reviews, load_public_sources, split_imdb
from lit_dprl.models import CACHE_DIR


@dataclass(frozen=True)
class SentimentSettings:
    """What the public classifier is trained on and how (the cache key)."""

    seed: int = 0  # the IMDb split seed (same as the stages', so "public" is the same reviews)
    include_rotten_tomatoes: bool = True
    ngram_max: int = 2
    min_df: int = 2
    max_features: int = 200_000
    inverse_regularization: float = 1.0


def _fit(settings: SentimentSettings) -> Any:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    sources = "imdb_public+rotten_tomatoes" if settings.include_rotten_tomatoes else "imdb_public"
    public = load_public_sources(sources, seed=settings.seed)
    texts, labels = list(public["text"]), list(public["label"])
    classifier = make_pipeline(
        TfidfVectorizer(
            ngram_range=(1, settings.ngram_max),
            min_df=settings.min_df,
            sublinear_tf=True,
            max_features=settings.max_features,
        ),
        LogisticRegression(C=settings.inverse_regularization, max_iter=2000),
    )
    return classifier.fit(texts, labels)


@functools.cache
def public_sentiment_classifier(settings: SentimentSettings = SentimentSettings()) -> Any:
    """The fitted scikit-learn pipeline (trained once per settings, then loaded from the cache)."""
    key = hashlib.sha1(json.dumps(asdict(settings), sort_keys=True).encode()).hexdigest()[:12]
    path = CACHE_DIR / f"public-sentiment-{key}.pkl"
    if path.is_file():
        with path.open("rb") as file:
            return pickle.load(file)
    classifier = _fit(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    with partial.open("wb") as file:
        pickle.dump(classifier, file)
    partial.replace(path)
    return classifier


def sentiment_logits(texts: list[str]) -> np.ndarray:
    """Log-odds that each text is positive, ``[N]``, one text at a time (no batch statistics)."""
    return public_sentiment_classifier().decision_function(list(texts))


def imdb_sentiment(prompts: list[str], responses: list[str]) -> list[float]:
    """Reward: the public classifier's logit of ``prompt + response`` (positive sentiment ↑)."""
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
    return sentiment_logits([p + r for p, r in zip(prompts, responses, strict=True)]).tolist()


def accuracy_report(seed: int = 0, snippet_words: tuple[int, ...] = (12, 25, 40)) -> dict[str, float]:
    """Accuracy on the held-out IMDb test reviews, whole and cut to their first k words (what RL scores)."""
    test = split_imdb(load_imdb_reviews(), seed=seed)["test"]
    texts, labels = list(test["text"]), np.asarray(test["label"])
    report = {"test_reviews": len(texts), "accuracy": float(((sentiment_logits(texts) > 0) == labels).mean())}
    for words in snippet_words:
        snippets = [" ".join(t.split()[:words]) for t in texts]
        report[f"accuracy_first_{words}_words"] = float(((sentiment_logits(snippets) > 0) == labels).mean())
    return report
