"""Sampling: the KV-cached per-row sampler draws from ``generate``'s distribution, with its own stream per row;
sampling log-probs are those of that distribution (PPO ratios, KL, evaluation)."""

from __future__ import annotations

import pytest
import torch

from lit_dprl.generation import (
    join_prompts_and_responses,
    response_logits,
    row_generators,
    sample_with_logprobs,
    sampling_logprobs,
)
from lit_dprl.losses import token_logprobs
from lit_dprl.models import load_causal_lm, load_tokenizer
from lit_dprl.rl import response_mask

SAMPLING = dict(temperature=0.7, min_new_tokens=3, max_new_tokens=6)
PROMPTS = ["a b", "the film was", "x", "great plot, awful actors and a long", "so"]


@pytest.fixture(scope="module")
def tiny():
    tokenizer = load_tokenizer("tiny")
    return load_causal_lm("tiny", tokenizer).eval(), tokenizer


def generate(model, tokenizer, encoded):
    """Hugging Face ``generate`` with the sampling settings of ``sample_with_logprobs``, and its processed
    scores as log-probs of the sampled tokens."""
    out = model.generate(
        **encoded, do_sample=True, top_k=0, top_p=1.0, temperature=SAMPLING["temperature"],
        min_new_tokens=SAMPLING["min_new_tokens"], max_new_tokens=SAMPLING["max_new_tokens"],
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        suppress_tokens=[tokenizer.pad_token_id], output_scores=True, return_dict_in_generate=True,
    )  # fmt: skip
    tokens = out.sequences[:, encoded["input_ids"].shape[1] :]
    return tokens, token_logprobs(torch.stack(out.scores, dim=1), tokens)


def encode(tokenizer, prompts):
    return tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)


def test_one_row_draws_generates_tokens_and_log_probs_with_the_same_seed(tiny):
    model, tokenizer = tiny
    for seed, prompt in enumerate(PROMPTS * 2):
        encoded = encode(tokenizer, [prompt])
        torch.manual_seed(seed)
        expected_tokens, expected_logprobs = generate(model, tokenizer, encoded)
        ours = sample_with_logprobs(
            model,
            tokenizer,
            encoded["input_ids"],
            encoded["attention_mask"],
            row_generators([seed]),
            **SAMPLING,
        )
        assert torch.equal(ours.tokens, expected_tokens), prompt
        valid = response_mask(ours.tokens, tokenizer.eos_token_id)
        torch.testing.assert_close(ours.logprobs[valid], expected_logprobs[valid], atol=1e-5, rtol=1e-5)
        assert (ours.logprobs[~valid] == 0).all()
        assert ours.tokens[:, : SAMPLING["min_new_tokens"]].ne(tokenizer.eos_token_id).all()


def test_teacher_forced_sampling_logprobs_equal_generates_processed_scores(tiny):
    model, tokenizer = tiny
    encoded = encode(tokenizer, PROMPTS * 3)
    torch.manual_seed(0)
    raw, expected = generate(model, tokenizer, encoded)
    context = encoded["input_ids"].shape[1]
    query_responses, attention_mask, responses, mask, _ = join_prompts_and_responses(
        encoded["input_ids"], encoded["attention_mask"], raw, tokenizer
    )
    logits, _ = response_logits(model, query_responses, attention_mask, context, SAMPLING["temperature"])
    plain = token_logprobs(logits, responses)  # the softmax over all tokens: what this guards against
    ours = sampling_logprobs(logits, responses, tokenizer, SAMPLING["min_new_tokens"])
    valid = response_mask(raw, tokenizer.eos_token_id)
    assert torch.equal(valid, mask) and torch.isfinite(ours).all()
    torch.testing.assert_close(ours[valid], expected[valid], atol=1e-5, rtol=1e-5)
    assert (plain[valid] - expected[valid]).abs().max() > 1e-3


def test_each_row_samples_from_its_own_stream_whatever_the_batch(tiny):
    """Removing an interior row, reordering, or adding a longer prompt (more left padding) leaves every other
    row's tokens identical and its log-probs equal up to float rounding."""
    model, tokenizer = tiny
    seeds = dict(zip(PROMPTS, [11, 12, 13, 14, 15], strict=True))

    def sample(prompts):
        encoded = encode(tokenizer, prompts)
        generators = row_generators([seeds.get(p, 99) for p in prompts])
        out = sample_with_logprobs(model, tokenizer, encoded["input_ids"], encoded["attention_mask"], generators, **SAMPLING)  # fmt: skip
        return {p: (out.tokens[i], out.logprobs[i]) for i, p in enumerate(prompts)}

    full = sample(PROMPTS)
    for prompts in (
        [PROMPTS[0], *PROMPTS[2:]],  # interior row removed
        PROMPTS[::-1],
        [*PROMPTS[:2], "a much longer prompt than any other in this batch, by far", *PROMPTS[2:]],
    ):
        for prompt, (tokens, logprobs) in sample(prompts).items():
            if prompt in full:
                width = min(len(tokens), len(full[prompt][0]))  # the loop stops when every row is done
                assert torch.equal(tokens[:width], full[prompt][0][:width])
                torch.testing.assert_close(logprobs[:width], full[prompt][1][:width], atol=1e-5, rtol=0)
    assert len({tuple(t.tolist()) for t, _ in full.values()}) > 1
