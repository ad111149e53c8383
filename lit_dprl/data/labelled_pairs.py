"""Preference pairs built from human-labelled texts (IMDb reviews rated by their authors): one pair per
private text, against a partner of the other label from a PUBLIC pool, so that one text is one privacy unit.

No human-preference pairs ship offline; the RLHF path on IMDb builds its reward set D2 with these.
"""

from __future__ import annotations

from collections.abc import Sequence

from lit_dprl.data.imdb import PUBLIC_FRACTION, PUBLIC_SPLIT, load_imdb_reviews, split_imdb
from lit_dprl.data.splits import UNIT_COLUMN, keyed_choice, keyed_uniform, split_key


class PairingError(ValueError):
    """Labelled texts that cannot be turned into preference pairs."""


PARTNER_PURPOSE = "pair_partner"
PROMPT_OWNER_PURPOSE = "pair_prompt_owner"


def pairs_from_labelled_texts(
    texts: Sequence[str],
    labels: Sequence[int],
    unit_ids: Sequence[str],
    partner_texts: Sequence[str],
    partner_labels: Sequence[int],
    prompt_words: int,
    key: bytes,
    response_words: int | None = None,
) -> list[dict]:
    """One preference pair per labelled text (label 1 = positive, 0 = negative), e.g. a private IMDb review,
    against a partner of the other label from a PUBLIC pool (e.g. the public IMDb split).

    Each pair depends on its own text and on public data only, so one text is one privacy unit and adding
    or removing a text changes no other pair (nothing is re-paired). How a pair is built:

    1. Words are whitespace-separated tokens; texts (and partners) with at most ``prompt_words`` words
       give no pair (they have no continuation); texts with other labels are skipped.
    2. The partner of the text with unit id ``i`` is the ``keyed_choice(key, i, "pair_partner", n)``-th of
       the ``n`` usable partners of the other label.
    3. A keyed coin, ``keyed_uniform(key, i, "pair_prompt_owner") < 0.5``, picks whose opening is the
       prompt: the first ``prompt_words`` words of the text or of its partner (so that "the response
       continues the prompt's own text" does not give the answer away).
    4. ``chosen`` = ``" "`` + the positive one's words ``[prompt_words : prompt_words + response_words]``,
       ``rejected`` = the same span of the negative one (``response_words=None``: to the end).

    Returns ``{prompt, chosen, rejected, unit_id}`` dicts in the order of ``texts``.
    """
    if prompt_words < 1:
        raise ValueError(f"prompt_words must be >= 1, got {prompt_words}")
    if not len(texts) == len(labels) == len(unit_ids):
        raise ValueError(f"{len(texts)} texts, {len(labels)} labels and {len(unit_ids)} unit ids")
    pool = {label: [] for label in (0, 1)}
    for text, label in zip(partner_texts, partner_labels, strict=True):
        if label in pool and len(words := text.split()) > prompt_words:
            pool[label].append(words)
    end = None if response_words is None else prompt_words + response_words
    pairs = []
    for text, label, unit in zip(texts, labels, unit_ids, strict=True):
        words = text.split()
        if label not in pool or len(words) <= prompt_words:
            continue
        partners = pool[1 - label]
        if not partners:
            raise PairingError(f"the partner pool has no usable text of label {1 - label}")
        partner = partners[keyed_choice(key, unit, PARTNER_PURPOSE, len(partners))]
        positive, negative = (words, partner) if label == 1 else (partner, words)
        opening = words if keyed_uniform(key, unit, PROMPT_OWNER_PURPOSE) < 0.5 else partner
        pairs.append(
            {
                "prompt": " ".join(opening[:prompt_words]),
                "chosen": " " + " ".join(positive[prompt_words:end]),
                "rejected": " " + " ".join(negative[prompt_words:end]),
                "unit_id": unit,
            }
        )
    return pairs


IMDB_PROMPT_WORDS = 8
IMDB_RESPONSE_WORDS = 24


def imdb_preference_pairs(
    seed: int, reward_fraction: float, public_fraction: float = PUBLIC_FRACTION
) -> tuple[list[dict], list[dict]]:
    """Real preference pairs from the IMDb reviews: ``(train, validation)``.

    ``split_imdb(seed, reward_fraction, public_fraction)``: one training pair per review of the private
    reward set D2, one validation pair per review of the held-out test split, each against a partner
    from the public split (``pairs_from_labelled_texts``: an 8-word prompt, 24-word continuations; the
    authors' ratings decide the preference). A training pair's privacy unit is its D2 review.
    """
    if reward_fraction <= 0:
        raise PairingError("train_file='imdb' needs reward_fraction > 0 (the share of reviews in D2)")
    if public_fraction <= 0:
        raise PairingError("train_file='imdb' needs public_fraction > 0 (the pairs' public partners)")
    splits = split_imdb(
        load_imdb_reviews(), seed=seed, reward_fraction=reward_fraction, public_fraction=public_fraction
    )
    public = splits[PUBLIC_SPLIT]

    def pairs(part) -> list[dict]:
        return pairs_from_labelled_texts(
            part["text"], part["label"], part[UNIT_COLUMN], public["text"], public["label"],
            IMDB_PROMPT_WORDS, split_key(seed), IMDB_RESPONSE_WORDS,
        )  # fmt: skip

    return pairs(splits["reward"]), pairs(splits["test"])
