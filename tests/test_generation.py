"""Sampling log-probs are those of the distribution ``generate`` samples from (PPO ratios, KL, evaluation)."""

from __future__ import annotations

import torch

from lit_dprl.generation import join_prompts_and_responses, response_logits, sampling_logprobs
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
    torch.manual_seed(0)
    out = model.generate(  # the call of sample_responses, keeping the processed scores
        **encoded, do_sample=True, top_k=0, top_p=1.0,
        temperature=SAMPLING["temperature"], min_new_tokens=SAMPLING["min_new_tokens"],
        max_new_tokens=SAMPLING["max_new_tokens"], eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, suppress_tokens=[tokenizer.pad_token_id],
        output_scores=True, return_dict_in_generate=True,
    )  # fmt: skip
    context = encoded["input_ids"].shape[1]
    raw = out.sequences[:, context:]
    expected = token_logprobs(torch.stack(out.scores, dim=1), raw)
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
