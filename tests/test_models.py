"""Model sources: the "scratch" body of the CPU recipe (a BPE learnt from public text + a random small GPT-2)."""

from __future__ import annotations

import torch

from lit_dprl.data.imdb import load_rotten_tomatoes
from lit_dprl.models import (
    SCRATCH_VOCAB_SIZE,
    load_causal_lm,
    load_tokenizer,
    resolve_source,
    train_bpe_tokenizer,
)


def test_bpe_training_is_deterministic_and_round_trips():
    texts = [f"a film number {i} that is good, bad or wonderful" for i in range(200)]
    first, second = train_bpe_tokenizer(texts, 300), train_bpe_tokenizer(texts, 300)
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    assert len(first) == 300
    text = "A wonderful film, not a bad one!"
    assert first.decode(first(text)["input_ids"]) == text
    assert first.pad_token_id != first.eos_token_id and first.padding_side == "left"


def test_scratch_source_is_a_public_bpe_and_a_small_random_gpt2():
    assert resolve_source("scratch") == ("scratch", None)
    tokenizer = load_tokenizer("scratch")
    assert len(tokenizer) == SCRATCH_VOCAB_SIZE
    sentence = load_rotten_tomatoes()["text"][0]
    ids = tokenizer(sentence)["input_ids"]
    assert tokenizer.decode(ids) == sentence
    assert len(ids) < len(sentence.encode()) / 2.5  # merges learnt from the sentences compress them
    model = load_causal_lm("scratch", tokenizer, seed=3)
    assert model.config.n_layer == 4 and model.config.n_embd == 128
    assert 1.0e6 < sum(p.numel() for p in model.parameters()) < 2.0e6
    again = load_causal_lm("scratch", tokenizer, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters(), strict=True))
