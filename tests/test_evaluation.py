"""Held-out evaluation metrics checked against an independent computation."""

from __future__ import annotations

import math

import pytest
import torch

from lit_dprl.evaluation import distinct_n, response_perplexity
from lit_dprl.models import load_causal_lm, load_tokenizer


def test_response_perplexity_equals_the_language_model_loss_on_response_tokens_only():
    tokenizer = load_tokenizer("tiny")
    model = load_causal_lm("tiny", tokenizer).eval()
    prompts = ["the film was", "a b", "great plot, awful"]
    responses = [" very good indeed", " c d e", " actors and a long night"]
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for prompt, response in zip(prompts, responses, strict=True):
            context = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
            ids = tokenizer(prompt + response, add_special_tokens=False, return_tensors="pt")["input_ids"]
            labels = ids.clone()
            labels[:, :context] = -100  # Hugging Face's ignore index: the prompt is not scored
            count = int((labels[:, 1:] != -100).sum())
            nll += float(model(input_ids=ids, labels=labels).loss) * count
            tokens += count
    assert response_perplexity(model, tokenizer, prompts, responses) == pytest.approx(
        math.exp(nll / tokens), rel=1e-5
    )


def test_distinct_n_counts_unique_word_ngrams():
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert distinct_n(["a b", "c d"], 2) == 1.0
