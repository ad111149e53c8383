"""Sampling log-probs are those of the distribution ``generate`` samples from (PPO ratios, KL, evaluation)."""

from __future__ import annotations

import torch

from lit_dprl.generation import (
    join_prompts_and_responses,
    response_logits,
    sample_responses,
    sampling_logprobs,
)
from lit_dprl.losses import token_logprobs
from lit_dprl.models import load_causal_lm, load_tokenizer
from lit_dprl.rl import response_mask

SAMPLING = dict(temperature=0.7, min_new_tokens=3, max_new_tokens=6)


def test_sampling_logprobs_equal_the_log_softmax_of_generates_processed_scores():
    tokenizer = load_tokenizer("tiny")
    model = load_causal_lm("tiny", tokenizer).eval()
    encoded = tokenizer(
        ["a b", "the film was", "x"] * 4, return_tensors="pt", padding=True, add_special_tokens=False
    )
    original_generate, scores = model.generate, []

    def generate_keeping_scores(**kwargs):  # sample_responses's own call, plus the processed scores
        out = original_generate(**kwargs, output_scores=True, return_dict_in_generate=True)
        scores.extend(out.scores)
        return out.sequences

    model.generate = generate_keeping_scores
    torch.manual_seed(0)
    raw = sample_responses(model, tokenizer, encoded["input_ids"], encoded["attention_mask"], **SAMPLING)
    context = encoded["input_ids"].shape[1]
    expected = token_logprobs(torch.stack(scores, dim=1), raw)
    query_responses, attention_mask, responses, mask, _ = join_prompts_and_responses(
        encoded["input_ids"], encoded["attention_mask"], raw, tokenizer
    )
    logits, _ = response_logits(model, query_responses, attention_mask, context, SAMPLING["temperature"])
    ours = sampling_logprobs(logits, responses, tokenizer, SAMPLING["min_new_tokens"])
    valid = response_mask(raw, tokenizer.eos_token_id)
    assert torch.equal(valid, mask) and torch.isfinite(ours).all()
    torch.testing.assert_close(ours[valid], expected[valid], atol=1e-5, rtol=1e-5)
    plain = token_logprobs(logits, responses)  # the softmax over all tokens: what this guards against
    assert (plain[valid] - expected[valid]).abs().max() > 1e-3
