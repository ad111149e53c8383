"""Sampling responses and scoring their tokens — shared by PPO rollouts and evaluation.

The sampling distribution is that of Hugging Face ``generate(do_sample=True, top_k=0, top_p=1.0,
temperature=τ, min_new_tokens=m, suppress_tokens=[pad])``: at response step ``t``, with logits ``z_t``,

    q_t(v) = exp(z_t[v] / τ) / Σ_{u ∈ A_t} exp(z_t[u] / τ)   for v ∈ A_t, 0 otherwise,
    A_t = vocabulary \\ {pad} \\ ({EOS} if t < m),

and a response ends after its first EOS. Every log-prob used for PPO ratios and KL is ``log q_t``.

Each row draws its tokens with its own ``torch.Generator``: row ``b``'s tokens are a function of its prompt and
its generator only, never of the other rows or of the global RNG (the DP rollout gives every prompt its own
secret stream).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from transformers import PreTrainedTokenizerBase

from lit_dprl.models import position_ids_from_mask
from lit_dprl.rl import response_mask, truncate_after_eos


def block_disallowed_(
    scores: torch.Tensor, tokenizer: PreTrainedTokenizerBase, min_new_tokens: int, first_step: int = 0
) -> torch.Tensor:
    """Set the tokens outside ``A_t`` to ``-inf`` in place and return ``scores`` (``[..., T, V]``, step ``t`` of
    index ``i`` along ``T`` being ``first_step + i``): pad everywhere, EOS at steps ``t < min_new_tokens``."""
    scores[..., tokenizer.pad_token_id] = float("-inf")
    scores[..., : max(0, min_new_tokens - first_step), tokenizer.eos_token_id] = float("-inf")
    return scores


def row_generators(seeds: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One ``torch.Generator`` per row, seeded with ``seeds[b]``."""
    return [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]


def draw_tokens(probs: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One token per row of ``probs`` ``[R, V]`` by inverse-CDF sampling with one uniform ``u_r`` from row ``r``'s
    own generator: ``token_r = min{v : C_{r,v} > u_r · C_{r,V}}`` with ``C`` the cumulative sum (float64).
    Exactly ``P(token = v) = probs_v / Σ probs``; a token of probability 0 is never drawn."""
    cdf = probs.double().cumsum(-1)
    total = cdf[:, -1:]
    uniforms = torch.cat(
        [torch.rand(1, generator=g, dtype=torch.float64, device=probs.device) for g in generators]
    )
    target = torch.minimum(uniforms.unsqueeze(-1) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(-1)


class Samples(NamedTuple):
    """Sampled responses, both ``[B, T]`` with ``T <= max_new_tokens``."""

    tokens: torch.Tensor
    """Response tokens; pad after the first EOS."""
    logprobs: torch.Tensor
    """``log q_t`` of each sampled token; 0 after the first EOS."""


@torch.no_grad()
def sample_with_logprobs(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    generators: Sequence[torch.Generator],
    *,
    temperature: float,
    min_new_tokens: int,
    max_new_tokens: int,
    samples_per_prompt: int = 1,
) -> Samples:
    """Sample ``samples_per_prompt`` continuations of each left-padded prompt with a KV cache; row
    ``b = p·G + g`` (continuation ``g`` of prompt ``p``) draws from ``generators[b]``.

    Each prompt is encoded once and its cache repeated ``G`` times. Each step draws every unfinished row's token
    from ``q_t`` with one uniform of the row's own generator (:func:`draw_tokens`; ``generate`` draws the same
    distribution with ``torch.multinomial`` on the global RNG). The loop stops when every row has sampled EOS;
    finished rows are fed the pad token, as in ``generate``.
    """
    batch = input_ids.shape[0] * samples_per_prompt
    if len(generators) != batch:
        raise ValueError(f"need one generator per row: got {len(generators)} for {batch} rows")
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    positions = position_ids_from_mask(attention_mask)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
    )
    if samples_per_prompt > 1:
        out.cache.batch_repeat_interleave(samples_per_prompt)
        out.logits = out.logits.repeat_interleave(samples_per_prompt, dim=0)
        attention_mask = attention_mask.repeat_interleave(samples_per_prompt, dim=0)
        positions = positions.repeat_interleave(samples_per_prompt, dim=0)
    next_position = positions[:, -1:] + 1
    unfinished = torch.ones(batch, dtype=torch.bool, device=input_ids.device)
    tokens, logprobs = [], []
    for step in range(max_new_tokens):
        scores = out.logits[:, -1].float() / temperature
        block_disallowed_(scores.unsqueeze(1), tokenizer, min_new_tokens, first_step=step)
        logq = torch.log_softmax(scores, dim=-1)
        drawn = torch.full((batch,), pad, dtype=torch.long, device=input_ids.device)
        rows = unfinished.nonzero().flatten()
        drawn[rows] = draw_tokens(logq[rows].exp(), [generators[r] for r in rows.tolist()])
        logq = logq.gather(-1, drawn.unsqueeze(-1)).squeeze(-1)
        tokens.append(drawn)
        logprobs.append(torch.where(unfinished, logq, 0.0))
        unfinished &= drawn != eos
        if not unfinished.any() or step + 1 == max_new_tokens:
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)
        out = model(
            input_ids=drawn.unsqueeze(-1),
            attention_mask=attention_mask,
            position_ids=next_position,
            cache=out.cache,
            use_cache=True,
        )
        next_position = next_position + 1
    return Samples(torch.stack(tokens, dim=1), torch.stack(logprobs, dim=1))


def sample_responses(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    temperature: float,
    min_new_tokens: int,
    max_new_tokens: int,
) -> torch.Tensor:
    """Sampled continuations ``[B, T]`` (pad after EOS), each row's generator seeded from the global torch RNG
    (evaluation of public prompts; a DP rollout passes secret per-row generators to :func:`sample_with_logprobs`)."""
    seeds = torch.randint(2**62, (input_ids.shape[0],)).tolist()
    return sample_with_logprobs(
        model, tokenizer, input_ids, attention_mask, row_generators(seeds, input_ids.device),
        temperature=temperature, min_new_tokens=min_new_tokens, max_new_tokens=max_new_tokens,
    ).tokens  # fmt: skip


def join_prompts_and_responses(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    raw_responses: torch.Tensor,
    tokenizer: PreTrainedTokenizerBase,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(query_responses, attention_mask, responses, response_mask, contains_eos)`` with responses cut after EOS."""
    responses, contains_eos = truncate_after_eos(
        raw_responses, tokenizer.eos_token_id, tokenizer.pad_token_id
    )
    mask = response_mask(raw_responses, tokenizer.eos_token_id)
    query_responses = torch.cat([input_ids, responses], dim=1)
    full_mask = torch.cat([attention_mask, mask.long()], dim=1)
    return query_responses, full_mask, responses, mask, contains_eos


def response_logits(
    model: torch.nn.Module,
    query_responses: torch.Tensor,
    attention_mask: torch.Tensor,
    context_length: int,
    temperature: float = 1.0,
    output_hidden_states: bool = False,
):
    """``logits / temperature`` at the positions that predict the response tokens ``[B, T, V]`` (the only
    logits computed), and the model output (for hidden states)."""
    keep = torch.arange(context_length - 1, query_responses.shape[1] - 1, device=query_responses.device)
    out = model(
        input_ids=query_responses,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        output_hidden_states=output_hidden_states,
        logits_to_keep=keep,
    )
    return out.logits / temperature, out


def sampling_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, tokenizer: PreTrainedTokenizerBase, min_new_tokens: int
) -> torch.Tensor:
    """Log-probs ``log q_t(y_t)`` of response ``tokens`` ``[..., T]`` under the sampling distribution, from
    temperature-scaled ``logits`` ``[..., T, V]``: ``z_t[y_t] − log Σ_{v ∈ A_t} exp z_t[v]``.

    Scoring with the plain softmax instead biases the policy gradient (its ``∇ log(1 − q_blocked)`` term) and
    the KL estimates. To keep a single ``[..., T, V]`` tensor, ``logits`` is overwritten (blocked tokens set to
    ``-inf``): pass logits that are not needed afterwards. Positions after the first EOS read an allowed token,
    so the padding there (masked out downstream) stays finite.
    """
    logits = block_disallowed_(logits.float(), tokenizer, min_new_tokens)
    allowed = next(i for i in range(3) if i not in (tokenizer.pad_token_id, tokenizer.eos_token_id))
    targets = torch.where(response_mask(tokens, tokenizer.eos_token_id), tokens, allowed)
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(dim=-1)


def response_logprobs(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    query_responses: torch.Tensor,
    attention_mask: torch.Tensor,
    context_length: int,
    *,
    temperature: float,
    min_new_tokens: int,
) -> torch.Tensor:
    """Sampling log-probs (``sampling_logprobs``) of the response tokens under ``model``, ``[B, T]``."""
    logits, _ = response_logits(model, query_responses, attention_mask, context_length, temperature)
    return sampling_logprobs(logits, query_responses[:, context_length:], tokenizer, min_new_tokens)
