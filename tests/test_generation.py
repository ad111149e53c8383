"""Sampling: the KV-cached per-row sampler draws from ``generate``'s distribution, with its own stream per row;
sampling log-probs are those of that distribution (PPO ratios, KL, evaluation)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
)

from lit_dprl.generation import (
    draw_tokens,
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


def test_draw_tokens_samples_each_row_from_its_probabilities():
    probs = torch.tensor([0.5, 0.0, 0.3, 0.2, 0.0])
    draws = 20000
    tokens = draw_tokens(probs.expand(draws, -1), row_generators(range(draws)))
    counts = torch.bincount(tokens, minlength=5).double()
    assert counts[1] == counts[4] == 0  # probability 0: never drawn
    sigma = (draws * probs * (1 - probs)).sqrt()
    assert ((counts - draws * probs).abs() <= 5 * sigma + 1e-9).all()
    again = draw_tokens(probs.expand(draws, -1), row_generators(range(draws)))
    assert torch.equal(tokens, again)  # a function of each row's generator
    assert draw_tokens(torch.tensor([[0.0, 0.0, 1.0]]), row_generators([0])).item() == 2


def test_the_loop_log_probs_are_those_of_generates_processed_distribution(tiny):
    """The sampler's log-probs, teacher-forced ``sampling_logprobs`` and Hugging Face's own logits processors (those
    ``generate`` applies for these settings) agree on the sampled tokens; pad and early EOS are never sampled."""
    model, tokenizer = tiny
    encoded = encode(tokenizer, PROMPTS * 2)
    samples = sample_with_logprobs(
        model,
        tokenizer,
        encoded["input_ids"],
        encoded["attention_mask"],
        row_generators(range(10)),
        **SAMPLING,
    )
    valid = response_mask(samples.tokens, tokenizer.eos_token_id)
    assert samples.tokens[valid].ne(tokenizer.pad_token_id).all() and (samples.logprobs[~valid] == 0).all()
    assert samples.tokens[:, : SAMPLING["min_new_tokens"]].ne(tokenizer.eos_token_id).all()
    context = encoded["input_ids"].shape[1]
    query_responses, attention_mask, responses, _, _ = join_prompts_and_responses(
        encoded["input_ids"], encoded["attention_mask"], samples.tokens, tokenizer
    )
    logits, out = response_logits(model, query_responses, attention_mask, context, SAMPLING["temperature"])
    processors = LogitsProcessorList([
        MinNewTokensLengthLogitsProcessor(context, SAMPLING["min_new_tokens"], tokenizer.eos_token_id),
        SuppressTokensLogitsProcessor([tokenizer.pad_token_id]),
        TemperatureLogitsWarper(SAMPLING["temperature"]),
    ])  # fmt: skip
    raw = out.logits.float()
    processed = torch.stack(
        [processors(query_responses[:, : context + t], raw[:, t].clone()) for t in range(responses.shape[1])],
        1,
    )
    expected = token_logprobs(processed, responses)
    teacher_forced = sampling_logprobs(logits, responses, tokenizer, SAMPLING["min_new_tokens"])
    torch.testing.assert_close(samples.logprobs[valid], expected[valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(teacher_forced[valid], expected[valid], atol=1e-5, rtol=1e-5)


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


def test_several_samples_per_prompt_encode_the_prompt_once_and_match_repeated_prompts(tiny):
    model, tokenizer = tiny
    encoded = encode(tokenizer, PROMPTS)
    seeds = list(range(100, 100 + 3 * len(PROMPTS)))
    once = sample_with_logprobs(
        model, tokenizer, encoded["input_ids"], encoded["attention_mask"], row_generators(seeds),
        samples_per_prompt=3, **SAMPLING,
    )  # fmt: skip
    repeated = sample_with_logprobs(
        model, tokenizer, encoded["input_ids"].repeat_interleave(3, 0),
        encoded["attention_mask"].repeat_interleave(3, 0), row_generators(seeds), **SAMPLING,
    )  # fmt: skip
    assert torch.equal(once.tokens, repeated.tokens)
    torch.testing.assert_close(once.logprobs, repeated.logprobs, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="one generator per row"):
        sample_with_logprobs(model, tokenizer, encoded["input_ids"], encoded["attention_mask"], row_generators(seeds), **SAMPLING)  # fmt: skip
